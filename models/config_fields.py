"""The model's settings, defined once: name, type, default, allowed range and meaning of each key of
`model_params.yaml`.

MoEEncoderConfig (configuration.py) takes its fields from this table and validates against it, and the config
loader (config_utils/schema.py) builds the model_params.yaml schema from it, so the two cannot drift apart.
Standard library only: the file is copied into every exported model, and config loading reads it by path
without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, make_dataclass


@dataclass(frozen=True)
class ModelField:
    kind: str  # int | float | bool | str
    default: object  # MoEEncoderConfig's default
    help: str
    required: bool = False  # model_params.yaml must give it (the first release's keys); else the default
    nullable: bool = False
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False  # min itself is not allowed
    max_exclusive: bool = False  # max itself is not allowed
    choices: tuple | None = None

    @property
    def annotation(self) -> type:
        python_type = {"int": int, "float": float, "bool": bool, "str": str}[self.kind]
        return python_type | None if self.nullable else python_type

    def allowed(self) -> str:
        """What the range allows, in words: 'in [0, 1)', '>= 1', 'one of topk, expert_choice' (+ ' or null')."""
        if self.choices:
            words = "one of " + ", ".join(map(str, self.choices))
        elif self.min is not None and self.max is not None:
            words = f"in {'(' if self.min_exclusive else '['}{self.min}, {self.max}{')' if self.max_exclusive else ']'}"
        elif self.min is not None:
            words = f"{'>' if self.min_exclusive else '>='} {self.min}"
        else:
            words = f"a {self.kind}"
        return words + (" or null" if self.nullable else "")

    def accepts(self, value) -> bool:
        """Whether value is within the choices and range (types are the config loader's business)."""
        if value is None:
            return self.nullable
        if self.choices:
            return value in self.choices
        if self.min is not None and (value < self.min or self.min_exclusive and value == self.min):
            return False
        return self.max is None or value < self.max or not self.max_exclusive and value == self.max


MODEL_FIELDS = {
    "vocab_size": ModelField("int", None, "null = the tokenizer's", required=True, nullable=True, min=1),
    "embedding_dim": ModelField("int", 256, "model width", required=True, min=1),
    "seq_len": ModelField("int", 64, "tokens per sequence, [CLS] and [SEP] included", required=True, min=4),
    "num_head": ModelField("int", 8, "attention heads", required=True, min=1),
    "attention": ModelField(
        "str",
        "bidirectional",
        "self-attention: bidirectional (an encoder) or causal (each token sees only earlier ones; the earlier "
        "study's defect, or a decoder-style comparison)",
        choices=("bidirectional", "causal"),
    ),
    "n_encoder_blocks": ModelField("int", 3, "Transformer blocks", required=True, min=1),
    "n_experts": ModelField("int", 4, "experts per MoE layer (1 = dense)", required=True, min=1),
    "top_k_experts": ModelField("int", 1, "experts chosen per token", required=True, min=1),
    "moe_dim": ModelField("int", 512, "hidden size of each expert", required=True, min=1),
    "dropout": ModelField("float", 0.1, "dropout rate", required=True, min=0.0, max=1.0),
    # a separate rate because attention dropout is costly on the CPU: the fused attention kernel has none, so any
    # rate above 0 falls back to the unfused path, which materializes [batch, heads, T, T] probabilities
    "attention_dropout": ModelField(
        "float",
        None,
        "dropout on the attention probabilities; null = dropout (0 keeps the fused attention kernel on the CPU)",
        nullable=True,
        min=0.0,
        max=1.0,
    ),
    "moe_every": ModelField("int", 1, "every n-th block is MoE, the rest dense", min=1),
    "router_type": ModelField(
        "str",
        "topk",
        "topk = each token picks k experts; expert_choice = each expert picks its tokens",
        choices=("topk", "expert_choice"),
    ),
    "router_gate": ModelField(
        "str",
        "switch",
        "gate weights: softmax over all experts, then top-k (switch) or over the k chosen logits (mixtral, k >= 2)",
        choices=("switch", "mixtral"),
    ),
    "normalize_top_k": ModelField("bool", True, "switch gate: renormalize the k gate weights (k >= 2)"),
    # below 1 the noise factor stays positive: it scales the router input, never flips or zeroes it
    "router_jitter": ModelField(
        "float",
        0.0,
        "training only: router input times uniform noise in [1-eps, 1+eps]; 0 = off",
        min=0.0,
        max=1.0,
        max_exclusive=True,
    ),
    # any positive factor gives each expert at least one slot (the capacity is rounded up)
    "capacity_factor": ModelField(
        "float",
        None,
        "capacity = ceil(factor * tokens * k / E), overflow dropped; null = dropless (expert_choice: 1.0)",
        nullable=True,
        min=0.0,
        min_exclusive=True,
    ),
    "expert_type": ModelField("str", "mlp", "GELU MLP or SwiGLU experts", choices=("mlp", "swiglu")),
    "n_shared_experts": ModelField("int", 0, "always-on experts of size moe_dim (DeepSeekMoE)", min=0),
    "load_balance_coef": ModelField("float", 0.01, "weight of the Switch balancing loss", min=0.0),
    "router_z_loss_coef": ModelField("float", 0.0, "weight of the router z-loss", min=0.0),
}

# The table as dataclass fields, for MoEEncoderConfig to inherit (transformers 5 configs are dataclasses).
ModelFields = make_dataclass(
    "ModelFields",
    [(name, field.annotation, field.default) for name, field in MODEL_FIELDS.items()],
    kw_only=True,
    repr=False,
    eq=False,
)
