"""The MoE encoder: config, router, experts, dispatch, aux losses, and the masked-LM model.

Importing this package registers the model with the Auto classes, so a saved checkpoint loads
with `AutoModelForMaskedLM.from_pretrained(path)` once `models` has been imported. It also marks the
classes as custom code: `save_pretrained` then copies this package's modeling files (encoder.py and
everything it imports relatively) into the saved folder and writes `auto_map` into config.json, so the
folder loads without this repository with `trust_remote_code=True`. Where `models` is imported, these
registered classes win over the copied files (transformers prefers explicitly registered local code).
"""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from .configuration import MoEEncoderConfig
from .encoder import (
    MoEEncoderForMaskedLM,
    MoEEncoderModel,
    MoEEncoderOutput,
    MoEEncoderPreTrainedModel,
    MoEMaskedLMOutput,
)
from .experts import DenseFFN, StackedExperts
from .losses import BalancingSums, count_assignments, load_balancing_loss, router_z_loss, switch_balancing_loss
from .moe import DenseBaselineLayer, ExpertChoiceLayer, MoELayer, MoELayerStats, RealTokens, TokenChoiceLayer
from .router import ExpertChoiceOutput, ExpertChoiceRouter, RouterOutput, TopKRouter, expert_capacity

# exist_ok: re-importing (pytest, notebooks, importlib.reload) must not raise "already used".
AutoConfig.register(MoEEncoderConfig.model_type, MoEEncoderConfig, exist_ok=True)
AutoModel.register(MoEEncoderConfig, MoEEncoderModel, exist_ok=True)
AutoModelForMaskedLM.register(MoEEncoderConfig, MoEEncoderForMaskedLM, exist_ok=True)
# For the exported folder: auto_map in config.json + the modeling files copied beside the weights.
MoEEncoderConfig.register_for_auto_class("AutoConfig")
MoEEncoderModel.register_for_auto_class("AutoModel")
MoEEncoderForMaskedLM.register_for_auto_class("AutoModelForMaskedLM")

__all__ = [
    "BalancingSums",
    "DenseBaselineLayer",
    "DenseFFN",
    "ExpertChoiceLayer",
    "ExpertChoiceOutput",
    "ExpertChoiceRouter",
    "MoEEncoderConfig",
    "MoEEncoderForMaskedLM",
    "MoEEncoderModel",
    "MoEEncoderOutput",
    "MoEEncoderPreTrainedModel",
    "MoEMaskedLMOutput",
    "MoELayer",
    "MoELayerStats",
    "RealTokens",
    "RouterOutput",
    "StackedExperts",
    "TokenChoiceLayer",
    "TopKRouter",
    "count_assignments",
    "expert_capacity",
    "load_balancing_loss",
    "router_z_loss",
    "switch_balancing_loss",
]
