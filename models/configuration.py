"""One typed config for the whole model (Megablocks' `Arguments`, as a Hugging Face config).

Field names are the keys of `configs/*/model_params.yaml`; keep them in sync.
"""

from transformers import PretrainedConfig

ROUTER_TYPES = ("topk", "expert_choice")
ROUTER_GATES = ("switch", "mixtral")
EXPERT_TYPES = ("mlp", "swiglu")


class MoEEncoderConfig(PretrainedConfig):
    """Encoder with sparse Mixture-of-Experts feed-forward blocks, trained with MLM.

    transformers 5 turns config subclasses into keyword-only dataclasses: the annotated class
    attributes below are the fields, and `__post_init__` runs after they are set.
    """

    model_type = "moe_encoder"
    # Standard HF names, so generic tooling (and our own code) can read them either way.
    attribute_map = {
        "hidden_size": "embedding_dim",
        "num_attention_heads": "num_head",
        "num_hidden_layers": "n_encoder_blocks",
        "max_position_embeddings": "seq_len",
    }

    vocab_size: int | None = None  # None only until resolved from the tokenizer; validated below
    embedding_dim: int = 256
    seq_len: int = 64  # maximum number of positions
    num_head: int = 8
    n_encoder_blocks: int = 3
    n_experts: int = 4  # 1 = dense baseline: a plain FFN, no router
    top_k_experts: int = 1  # experts per token (expert choice: average experts per token)
    moe_dim: int = 512  # hidden size of each expert (and of the dense FFN blocks)
    dropout: float = 0.1
    moe_every: int = 1  # block i is MoE when (i + 1) % moe_every == 0
    router_type: str = "topk"  # topk = token choice; expert_choice = each expert picks its tokens
    router_gate: str = "switch"  # switch = softmax over all experts; mixtral = softmax over the k chosen
    normalize_top_k: bool = True  # switch gate: renormalize the k gate weights to sum 1 (only when k >= 2)
    router_jitter: float = 0.0  # training only: router input times uniform noise in [1 - eps, 1 + eps]
    capacity_factor: float | None = None  # None = dropless (token choice), 1.0 (expert choice)
    expert_type: str = "mlp"  # mlp = GELU MLP with biases; swiglu = SiLU-gated, no biases
    n_shared_experts: int = 0  # always-on experts of size moe_dim added to every token (DeepSeekMoE)
    load_balance_coef: float = 0.01
    router_z_loss_coef: float = 0.0
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
        if self.embedding_dim % self.num_head != 0:
            raise ValueError(
                f"embedding_dim ({self.embedding_dim}) must be divisible by num_head ({self.num_head})"
            )
        if not 1 <= self.top_k_experts <= self.n_experts:
            raise ValueError(
                f"top_k_experts must be between 1 and n_experts ({self.n_experts}), got {self.top_k_experts}"
            )
        if self.moe_every < 1:
            raise ValueError(f"moe_every must be >= 1, got {self.moe_every}")
        for name, choices in (("router_type", ROUTER_TYPES), ("router_gate", ROUTER_GATES), ("expert_type", EXPERT_TYPES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
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
        if not 0.0 <= self.router_jitter < 1.0:
            raise ValueError(
                f"router_jitter must be in [0, 1) (noise factor in [1 - eps, 1 + eps]; 0 = off), got {self.router_jitter}"
            )
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(
                f"capacity_factor must be > 0, or null for dropless routing, got {self.capacity_factor}"
            )
        if self.n_shared_experts < 0:
            raise ValueError(f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
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
