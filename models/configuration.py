"""One typed config for the whole model (Megablocks' `Arguments`, as a Hugging Face config).

Field names are the keys of `configs/*/model_params.yaml`; keep them in sync.
"""

from transformers import PretrainedConfig


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
    n_experts: int = 4
    top_k_experts: int = 1
    moe_dim: int = 512  # hidden size of each expert (and of the dense FFN blocks)
    dropout: float = 0.1
    moe_every: int = 1  # block i is MoE when (i + 1) % moe_every == 0
    normalize_top_k: bool = True  # renormalize the k gate weights to sum 1 (only when k >= 2)
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

    def is_moe_block(self, block_index: int) -> bool:
        return (block_index + 1) % self.moe_every == 0

    @property
    def moe_layer_indices(self) -> list[int]:
        """Indices of the encoder blocks whose feed-forward is an MoE layer."""
        return [i for i in range(self.n_encoder_blocks) if self.is_moe_block(i)]
