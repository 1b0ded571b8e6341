"""One typed config for the whole model (Megablocks' `Arguments`, as a Hugging Face config).

Its fields are the keys of `configs/*/model_params.yaml`, defined once in config_fields.MODEL_FIELDS.
"""

from transformers import PretrainedConfig

from .config_fields import MODEL_FIELDS, ModelFields


class MoEEncoderConfig(PretrainedConfig, ModelFields):
    """Encoder with sparse Mixture-of-Experts feed-forward blocks, trained with MLM.

    transformers 5 turns config subclasses into keyword-only dataclasses: the fields are those of
    ModelFields (model_params.yaml's keys, from MODEL_FIELDS) and the annotated class attributes below
    (set by step 3 or left at their defaults), and `__post_init__` runs after they are set.
    """

    model_type = "moe_encoder"
    # Standard HF names, so generic tooling (and our own code) can read them either way.
    attribute_map = {
        "hidden_size": "embedding_dim",
        "num_attention_heads": "num_head",
        "num_hidden_layers": "n_encoder_blocks",
        "max_position_embeddings": "seq_len",
    }

    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    # Base PretrainedConfig in transformers 5 has no such field; without it nothing gets tied.
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        self._check_values()
        super().__post_init__(**kwargs)

    def _check_values(self) -> None:
        if self.vocab_size is None or self.vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int (take it from the tokenizer), got {self.vocab_size}")
        for name, field in MODEL_FIELDS.items():  # the ranges model_params.yaml is checked against
            if name != "vocab_size" and not field.accepts(getattr(self, name)):
                raise ValueError(f"{name} must be {field.allowed()} ({field.help}), got {getattr(self, name)!r}")
        if self.embedding_dim % self.num_head != 0:
            raise ValueError(f"embedding_dim ({self.embedding_dim}) must be divisible by num_head ({self.num_head})")
        if self.top_k_experts > self.n_experts:
            raise ValueError(
                f"top_k_experts must be between 1 and n_experts ({self.n_experts}), got {self.top_k_experts}"
            )
        if self.router_gate == "mixtral":
            if self.router_type != "topk":
                raise ValueError(
                    "router_gate=mixtral applies to router_type: topk only; expert choice always gates with "
                    "the softmax over all experts: use router_gate: switch"
                )
            if self.top_k_experts < 2:
                raise ValueError(
                    "router_gate=mixtral needs top_k_experts >= 2: with k=1 the softmax over one logit is always 1 "
                    "and the router gets no gradient; use router_gate: switch"
                )
            if not self.normalize_top_k:
                raise ValueError(
                    "router_gate=mixtral always sums the k gate weights to 1 (softmax over the chosen logits); "
                    "normalize_top_k: false only applies to router_gate: switch"
                )
        if self.n_experts == 1 and self.n_shared_experts > 0:
            raise ValueError(
                "n_experts: 1 is the dense baseline (one plain FFN); shared experts only make sense next to routed "
                "ones: set n_shared_experts: 0 (or raise moe_dim for a wider dense FFN)"
            )

    @property
    def is_dense_baseline(self) -> bool:
        """n_experts=1: the MoE blocks are plain FFNs (no router, no aux loss)."""
        return self.n_experts == 1

    def is_moe_block(self, block_index: int) -> bool:
        return (block_index + 1) % self.moe_every == 0

    @property
    def moe_layer_indices(self) -> list[int]:
        """Indices of the encoder blocks whose feed-forward is an MoE layer."""
        return [i for i in range(self.n_encoder_blocks) if self.is_moe_block(i)]
