"""The MoE encoder: config, router, experts, dispatch, aux losses, and the masked-LM model.

Importing this package registers the model with the Auto classes, so a saved checkpoint loads
with `AutoModelForMaskedLM.from_pretrained(path)` once `models` has been imported.
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
from .losses import load_balancing_loss, router_z_loss
from .moe import MoELayer, MoELayerStats
from .router import ExpertChoiceOutput, ExpertChoiceRouter, RouterOutput, TopKRouter, expert_capacity

# exist_ok: re-importing (pytest, notebooks, importlib.reload) must not raise "already used".
AutoConfig.register(MoEEncoderConfig.model_type, MoEEncoderConfig, exist_ok=True)
AutoModel.register(MoEEncoderConfig, MoEEncoderModel, exist_ok=True)
AutoModelForMaskedLM.register(MoEEncoderConfig, MoEEncoderForMaskedLM, exist_ok=True)

__all__ = [
    "DenseFFN",
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
    "RouterOutput",
    "StackedExperts",
    "TopKRouter",
    "expert_capacity",
    "load_balancing_loss",
    "router_z_loss",
]
