"""The three config schemas (dataset, model, train): every key, its type, its default and its range.

A key without a default is required. Keys added after the first release get defaults, so older
config files keep working. The names follow DESIGN.md; users and scripts rely on them. The model section
is built from models/config_fields.py, the table MoEEncoderConfig itself is made of and checks against.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REQUIRED = object()


@dataclass(frozen=True)
class Field:
    kind: str  # int | float | bool | str | list[str]
    default: Any = REQUIRED
    nullable: bool = False
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None
    help: str = ""
    min_exclusive: bool = False  # min itself is not allowed: (min, max]
    max_exclusive: bool = False  # max itself is not allowed: [min, max)
    strip: bool = False  # list[str] of labels: compared without surrounding whitespace, as step 1 writes them

    def describe(self) -> str:
        """What is allowed, in words, for error messages."""
        words = {
            "int": "an integer",
            "float": "a number",
            "bool": "true or false",
            "str": "a string",
            "list[str]": "a list of strings",
        }[self.kind]
        if self.choices:
            words = "one of " + ", ".join(map(str, self.choices))
        opening, closing = "(" if self.min_exclusive else "[", ")" if self.max_exclusive else "]"
        if self.min is not None and self.max is not None:
            words += f" in {opening}{self.min}, {self.max}{closing}"
        elif self.min is not None:
            words += f" {'>' if self.min_exclusive else '>='} {self.min}"
        if self.nullable:
            words += " or null"
        return words


DATASET_SCHEMA = {
    "seed": Field("int", min=0, help="seed for shuffling, splitting, the builtin corpus and masking"),
    "load_params": {
        "source": Field("str", choices=("hub", "files", "builtin"), help="where the corpus comes from"),
        "dataset_url": Field("str", help="hub dataset name (source=hub)"),
        "data_files": Field("list[str]", default=[], help="paths or globs of .csv/.jsonl/.parquet (source=files)"),
        "text_field": Field("str", help="column holding the text"),
        "topic_field": Field("str", help="column holding the topic label"),
        "train_len": Field("int", min=1, help="documents in the train split"),
        "valid_len": Field("int", min=1, help="documents in the validation split"),
        "test_len": Field("int", min=1, help="documents in the test split"),
        "topic_len": Field("int", min=1, help="documents kept per evaluation topic"),
        "builtin": {
            "n_topics": Field("int", default=4, min=1, max=8, help="topics of the builtin corpus"),
            "topic_overlap": Field(
                "float",
                default=0.0,
                min=0.0,
                max=1.0,
                help="0 = disjoint topical words, 1 = labels carry no information",
            ),
            "n_docs": Field("int", default=20000, min=1, help="documents generated"),
        },
    },
    "data_params": {
        "eval_topics": Field("list[str]", strip=True, help="topics held out of train/valid/test, evaluated one by one"),
        "train_topics": Field(
            "list[str]", default=[], strip=True, help="if set: train/valid/test balanced over these topics"
        ),
        "mask_prob": Field(
            "float",
            min=0.0,
            max=1.0,
            min_exclusive=True,
            help="share of real tokens picked for MLM (0 would leave nothing to learn or score)",
        ),
        "tokenizer_name": Field("str", nullable=True, help="hub name or local dir; null = train WordPiece"),
        "tokenizer_vocab_size": Field("int", default=8192, min=100, help="vocabulary when training one"),
        "processed_dir": Field("str", default="data/processed", help="step 1 output"),
        "masked_dir": Field("str", default="data/masked", help="step 2 output"),
        "num_proc": Field("int", default=2, min=1, help="processes for tokenizing and masking"),
    },
}


def _load_model_fields():
    """models/config_fields.py, by path: importing it as models.config_fields would first run models/__init__.py,
    which loads torch and the encoder (seconds), for steps that only read their configs."""
    path = Path(__file__).resolve().parents[1] / "models" / "config_fields.py"
    spec = importlib.util.spec_from_file_location("_model_config_fields", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building ModelField
    spec.loader.exec_module(module)
    return module


def _model_schema(model_fields: dict) -> dict:
    """The model_params.yaml schema: MoEEncoderConfig's fields, with its defaults and ranges."""
    return {
        name: Field(
            field.kind,
            default=REQUIRED if field.required else field.default,
            nullable=field.nullable,
            min=field.min,
            max=field.max,
            choices=field.choices,
            help=field.help,
            min_exclusive=field.min_exclusive,
            max_exclusive=field.max_exclusive,
        )
        for name, field in model_fields.items()
    }


MODEL_SCHEMA = _model_schema(_load_model_fields().MODEL_FIELDS)

TRAIN_SCHEMA = {
    "batch_size": Field(
        "int", min=1, help="sequences per micro-batch, all processes together (each gets an equal share)"
    ),
    "n_epochs": Field("int", min=1, help="passes over the train split"),
    "max_steps": Field("int", default=None, nullable=True, min=1, help="if set, overrides n_epochs"),
    "learning_rate": Field("float", min=0.0, help="peak AdamW learning rate"),
    "weight_decay": Field("float", min=0.0, help="AdamW weight decay"),
    "warmup_proportion": Field("float", min=0.0, max=1.0, help="share of steps with linear warmup"),
    "lr_schedule": Field(
        "str",
        default="linear",
        choices=("linear", "cosine"),
        help="after the warmup, the learning rate falls to 0 at the last step: linear, or along a half cosine",
    ),
    "gradient_accumulation_steps": Field("int", default=1, min=1, help="micro-batches per optimizer step"),
    "max_grad_norm": Field("float", default=1.0, nullable=True, min=0.0, help="gradient clipping; null = off"),
    "masking": Field(
        "str",
        default="static",
        choices=("static", "dynamic"),
        help="static = step 2's masks; dynamic = re-mask every epoch (RoBERTa)",
    ),
    "mixed_precision": Field(
        "str",
        default="auto",
        choices=("auto", "no", "bf16", "fp16"),
        help="auto = bf16 where it is faster: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX for embedding_dim >= 256 (train/precision.py); else no",
    ),
    "compile": Field("bool", default=False, help="torch.compile the model"),
    "eval_steps": Field("int", min=1, help="evaluate on valid every n steps"),
    "eval_batches": Field("int", default=None, nullable=True, min=1, help="cap on valid batches; null = all"),
    "log_steps": Field("int", default=1, min=1, help="write train metrics to Aim every n steps"),
    "save_steps": Field("int", min=1, help="checkpoint every n steps"),
    "keep_checkpoints": Field("int", default=3, min=1, help="newest checkpoints kept; older ones are deleted"),
    "save_path": Field("str", help="runs are written to save_path/<tag>"),
    "experiment_name": Field("str", help="Aim experiment"),
    "random_seed": Field("int", min=0, help="seed for init, data order, dynamic masks and dropout"),
    "freeze_router": Field(
        "bool",
        default=False,
        help="keep every MoE router at its random initialisation (a control: routing not learned)",
    ),
    "router_supervision": Field(
        "str",
        default=None,
        nullable=True,
        choices=("topic", "family"),
        help="a control, off by default: topic = a cross-entropy term on every router that "
        "sends the train split's topic t (sorted) to expert t mod n_experts; family = the same for the "
        "topics' families (train.router_topic_map), each family f to expert f mod n_experts",
    ),
    "router_topic_map": Field(
        "str",
        default=None,
        nullable=True,
        help="router_supervision=family: a YAML file whose coarse_topics names each topic's family "
        "(e.g. configs/corpora/20newsgroups.yaml)",
    ),
    "router_supervision_coef": Field("float", default=1.0, min=0.0, help="weight of that term"),
    "router_refit_batches": Field(
        "int",
        default=0,
        min=0,
        help="router_supervision: after training, fit the routers alone to its target on the final representation "
        "(the rest frozen, no dropout), by L-BFGS on their inputs from this many training batches",
    ),
    "routing_snapshots": Field(
        "bool",
        default=True,
        help="record where a validation probe's tokens go at every evaluation (step 4's router saturation)",
    ),
    "device": Field("str", default="auto", choices=("auto", "cpu", "cuda"), help="auto = cuda if present"),
    "aim_repo": Field("str", default=".", help="folder holding the .aim repository"),
}

SCHEMAS = {"dataset": DATASET_SCHEMA, "model": MODEL_SCHEMA, "train": TRAIN_SCHEMA}


def recorded_setting(role: str, key: str, recorded: dict, now):
    """A setting as a manifest or checkpoint recorded it. A key added to the schema after it was written ran with
    its default; a required one (no default) cannot be told, and is taken as `now`."""
    if key in recorded:
        return recorded[key]
    field = SCHEMAS[role].get(key)
    return now if field is None or field.default is REQUIRED else field.default
