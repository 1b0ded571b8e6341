"""Pre-LayerNorm Transformer encoder (bidirectional, or causal with `attention: causal`) with MoE feed-forward
blocks and an MLM head.

Classes appear in forward order: attention, block (its FFN: models/experts.py or models/moe.py), base encoder, masked-LM model.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration import MoEEncoderConfig
from .experts import DenseFFN, StackedExperts
from .moe import MoELayer, MoELayerStats, RealTokens


class SelfAttention(nn.Module):
    def __init__(self, config: MoEEncoderConfig):
        super().__init__()
        self.num_head = config.num_head
        self.dropout = config.dropout if config.attention_dropout is None else config.attention_dropout
        self.causal = config.attention == "causal"
        self.qkv = nn.Linear(config.embedding_dim, 3 * config.embedding_dim)  # fused: one matmul for q, k, v
        self.out_proj = nn.Linear(config.embedding_dim, config.embedding_dim)

    def forward(self, x: torch.Tensor, real_token_mask: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len, d_model = x.shape
        q, k, v = self.qkv(x).view(batch_size, seq_len, 3, self.num_head, -1).permute(2, 0, 3, 1, 4)
        # An all-padding sequence would mask every key (NaN); let it attend everywhere instead.
        key_mask = real_token_mask | ~real_token_mask.any(dim=-1, keepdim=True)
        attn_mask = key_mask[:, None, None, :]  # [B, 1, 1, T], True = attend
        if self.causal:  # one boolean mask, as SDPA refuses attn_mask with is_causal=True
            earlier = torch.ones(seq_len, seq_len, dtype=torch.bool, device=x.device).tril()
            # each query keeps itself, so a padding query before every real token still has a key (no NaN)
            attn_mask = (attn_mask & earlier) | torch.eye(seq_len, dtype=torch.bool, device=x.device)
        dropout_p = self.dropout if self.training else 0.0
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # The CPU's fused attention runs forward + backward faster in float32 than in bfloat16 (22 vs 32 ms at
            # 32 x 4 heads x 128 x 64, measured): only the projections around it run in bfloat16.
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(
                    q.float(), k.float(), v.float(), attn_mask=attn_mask, dropout_p=dropout_p
                )
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        return self.out_proj(y.transpose(1, 2).reshape(batch_size, seq_len, d_model))


class EncoderBlock(nn.Module):
    def __init__(self, config: MoEEncoderConfig, use_moe: bool):
        super().__init__()
        self.use_moe = use_moe
        self.ln1 = nn.LayerNorm(config.embedding_dim)
        self.attn = SelfAttention(config)
        self.ln2 = nn.LayerNorm(config.embedding_dim)
        self.ffn = MoELayer(config) if use_moe else DenseFFN(config.embedding_dim, config.moe_dim, config.expert_type)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, real: RealTokens) -> tuple[torch.Tensor, MoELayerStats | None]:
        x = x + self.resid_dropout(self.attn(self.ln1(x), real.mask))
        return self.feed_forward(x, real)

    def feed_forward(self, x: torch.Tensor, real: RealTokens) -> tuple[torch.Tensor, MoELayerStats | None]:
        """The block's second half, x + FFN(LN(x)), on the attention's residual output (the expert ablation reruns
        only this half of the ablated block: its attention does not see the experts)."""
        stats = None
        if self.use_moe:
            ffn_out, stats = self.ffn(self.ln2(x), real)
        else:
            ffn_out = self.ffn(self.ln2(x))
        return x + self.resid_dropout(ffn_out), stats


@dataclass
class MoEEncoderOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None  # [B, T, d], after the final LayerNorm
    aux_loss: torch.Tensor | None = None  # sum over MoE layers of the load-balancing loss
    z_loss: torch.Tensor | None = None  # sum over MoE layers of the router z-loss
    expert_indices: tuple[torch.Tensor, ...] | None = None  # per MoE layer [B, T, k], -1 at padding
    router_probs: tuple[torch.Tensor, ...] | None = None  # per MoE layer [B, T, E], 0 at padding
    dropped_fraction: tuple[torch.Tensor, ...] | None = None  # per MoE layer, share of assignments dropped
    layer_stats: tuple[MoELayerStats, ...] | None = None  # per MoE layer, everything above and what training needs


@dataclass
class MoEMaskedLMOutput(ModelOutput):
    loss: torch.Tensor | None = None  # mlm_loss + coefs * aux losses; None without labels
    mlm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # unscaled
    z_loss: torch.Tensor | None = None  # unscaled
    logits: torch.Tensor | None = None  # [B, T, V]; [n_masked, V] with masked_logits_only
    expert_indices: tuple[torch.Tensor, ...] | None = None
    router_probs: tuple[torch.Tensor, ...] | None = None
    dropped_fraction: tuple[torch.Tensor, ...] | None = None  # per MoE layer (0 when dropless)
    layer_stats: tuple[MoELayerStats, ...] | None = None  # per MoE layer (models/moe.py MoELayerStats)


class MoEEncoderPreTrainedModel(PreTrainedModel):
    config_class = MoEEncoderConfig
    base_model_prefix = "encoder"
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        # transformers.initialization skips tensors already loaded from a checkpoint.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, StackedExperts):
            init.normal_(module.w_in, mean=0.0, std=std)
            init.normal_(module.w_out, mean=0.0, std=std)
            if module.b_in is not None:  # swiglu experts have no biases
                init.zeros_(module.b_in)
                init.zeros_(module.b_out)


class MoEEncoderModel(MoEEncoderPreTrainedModel):
    """Embeddings + encoder blocks + final LayerNorm; returns hidden states and routing."""

    def __init__(self, config: MoEEncoderConfig):
        super().__init__(config)
        self.token_embedding = nn.Embedding(config.vocab_size, config.embedding_dim)
        self.position_embedding = nn.Embedding(config.seq_len, config.embedding_dim)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            EncoderBlock(config, use_moe=config.is_moe_block(i)) for i in range(config.n_encoder_blocks)
        )
        self.final_norm = nn.LayerNorm(config.embedding_dim)
        self.post_init()

    @property
    def moe_layer_indices(self) -> list[int]:
        return self.config.moe_layer_indices

    def get_input_embeddings(self) -> nn.Embedding:
        return self.token_embedding

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.token_embedding = new_embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> MoEEncoderOutput:
        seq_len = input_ids.shape[1]
        if seq_len > self.config.seq_len:
            raise ValueError(f"input has {seq_len} positions, the model was built for seq_len={self.config.seq_len}")
        if attention_mask is None:
            attention_mask = input_ids != self.config.pad_token_id
        real = RealTokens.of(attention_mask.bool())  # once for all MoE layers: its nonzero() is a host sync

        positions = torch.arange(seq_len, device=input_ids.device)
        x = self.embedding_dropout(self.token_embedding(input_ids) + self.position_embedding(positions))
        layer_stats = []
        for block in self.blocks:
            x, stats = block(x, real)
            if stats is not None:
                layer_stats.append(stats)

        zero = x.new_zeros((), dtype=torch.promote_types(x.dtype, torch.float32))  # when no block is MoE
        return MoEEncoderOutput(
            last_hidden_state=self.final_norm(x),
            aux_loss=sum((s.load_balance_loss for s in layer_stats), zero),
            z_loss=sum((s.z_loss for s in layer_stats), zero),
            expert_indices=tuple(s.expert_index for s in layer_stats),
            router_probs=tuple(s.router_probs for s in layer_stats),
            dropped_fraction=tuple(s.dropped_fraction for s in layer_stats),
            layer_stats=tuple(layer_stats),
        )


class MaskedLMHead(nn.Module):
    """BERT-style head: transform, then a decoder whose weight is the input embedding matrix."""

    def __init__(self, config: MoEEncoderConfig):
        super().__init__()
        self.dense = nn.Linear(config.embedding_dim, config.embedding_dim)
        self.norm = nn.LayerNorm(config.embedding_dim)
        self.decoder = nn.Linear(config.embedding_dim, config.vocab_size)  # weight tied, bias its own

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(hidden))))


class MoEEncoderForMaskedLM(MoEEncoderPreTrainedModel):
    # transformers 5: a {tied parameter: source parameter} dict (it was a list in v4). Only the
    # source is written to model.safetensors; loading re-ties the decoder weight to it.
    _tied_weights_keys = {"lm_head.decoder.weight": "encoder.token_embedding.weight"}

    def __init__(self, config: MoEEncoderConfig):
        super().__init__(config)
        self.encoder = MoEEncoderModel(config)
        self.lm_head = MaskedLMHead(config)
        self.post_init()  # initializes weights, then ties lm_head.decoder.weight to the embedding

    @property
    def moe_layer_indices(self) -> list[int]:
        return self.config.moe_layer_indices

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.token_embedding

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.encoder.token_embedding = new_embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head.decoder = new_embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        masked_logits_only: bool = False,
        return_dict: bool = True,
    ) -> MoEMaskedLMOutput | tuple:
        """masked_logits_only=True (needs labels): the head runs only where labels != -100, and logits are those
        rows, [n_masked, V], in row-major order of the mask. Same loss and gradients; the vocabulary projection,
        the largest matmul of a small encoder, shrinks to the ~15% of positions the loss reads (as in NVIDIA's
        and MosaicML's BERT)."""
        encoded = self.encoder(input_ids, attention_mask)
        hidden = encoded.last_hidden_state
        if masked_logits_only:
            if labels is None:
                raise ValueError("masked_logits_only=True needs labels: they say which positions are masked")
            is_masked = labels != -100
            hidden, labels = hidden[is_masked], labels[is_masked]
        logits = self.lm_head(hidden)

        mlm_loss = loss = None
        if labels is not None:
            token_losses = F.cross_entropy(
                logits.view(-1, logits.shape[-1]).to(encoded.aux_loss.dtype),
                labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            # Mean over masked tokens; clamp so a batch with no masked token gives 0, not NaN.
            mlm_loss = token_losses / (labels != -100).sum().clamp(min=1)
            loss = (
                mlm_loss
                + self.config.load_balance_coef * encoded.aux_loss
                + self.config.router_z_loss_coef * encoded.z_loss
            )

        output = MoEMaskedLMOutput(
            loss=loss,
            mlm_loss=mlm_loss,
            aux_loss=encoded.aux_loss,
            z_loss=encoded.z_loss,
            logits=logits,
            expert_indices=encoded.expert_indices,
            router_probs=encoded.router_probs,
            dropped_fraction=encoded.dropped_fraction,
            layer_stats=encoded.layer_stats,
        )
        return output if return_dict else output.to_tuple()
