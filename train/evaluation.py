"""MLM evaluation with routing counts, shared by training (valid split) and step 4 (test, topics)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data_processors.masking import IGNORE_INDEX
from models.losses import count_assignments

MODEL_COLUMNS = ["input_ids", "attention_mask", "labels"]


def collate_mlm(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Arrow stores ids as int32 and the mask as int8; the model wants int64 ids and a bool mask."""
    batch = {key: torch.stack([torch.as_tensor(row[key]) for row in rows]) for key in MODEL_COLUMNS}
    return {
        "input_ids": batch["input_ids"].long(),
        "attention_mask": batch["attention_mask"].bool(),
        "labels": batch["labels"].long(),
    }


def mlm_loader(dataset, batch_size: int, shuffle: bool = False, seed: int = 0) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(seed)  # same seed, same data order
    return torch.utils.data.DataLoader(
        dataset.with_format("numpy", columns=MODEL_COLUMNS),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=collate_mlm,
    )


def perplexity(mlm_loss: float) -> float:
    """exp(mean cross-entropy in nats), capped at exp(50) so a diverged loss stays a finite number."""
    return math.exp(min(mlm_loss, 50.0))


@dataclass
class EvalResult:
    mlm_loss: float
    accuracy: float
    masked_tokens: int
    real_tokens: int
    expert_counts: torch.Tensor  # [n_moe_layers, n_experts], real tokens, on the CPU
    majority_accuracy: float  # always predicting the split's most frequent masked token

    @property
    def perplexity(self) -> float:
        return perplexity(self.mlm_loss)

    def as_dict(self) -> dict:
        return {
            "mlm_loss": self.mlm_loss,
            "accuracy": self.accuracy,
            "perplexity": self.perplexity,
            "majority_accuracy": self.majority_accuracy,
            "masked_tokens": self.masked_tokens,
            "real_tokens": self.real_tokens,
        }


@torch.no_grad()
def evaluate_mlm(
    model, loader, device: torch.device, max_batches: int | None = None, progress_desc: str | None = None
) -> EvalResult:
    """Token-weighted MLM loss and accuracy over masked tokens; expert counts over real tokens."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    n_experts = model.config.n_experts
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    masked = torch.zeros((), dtype=torch.long, device=device)
    real = torch.zeros((), dtype=torch.long, device=device)
    label_counts = torch.zeros(model.config.vocab_size, dtype=torch.long, device=device)
    expert_counts = torch.zeros(len(model.config.moe_layer_indices), n_experts, dtype=torch.long, device=device)
    total = len(loader) if max_batches is None else min(len(loader), max_batches)
    batches = tqdm(loader, total=total, desc=progress_desc, leave=False, disable=progress_desc is None)
    for batch_index, batch in enumerate(batches):
        if max_batches is not None and batch_index >= max_batches:
            break
        batch = {key: value.to(device) for key, value in batch.items()}
        labels = batch["labels"]
        output = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, masked_logits_only=True
        )
        is_masked = labels != IGNORE_INDEX
        logits = output.logits.float()  # [n_masked, V]
        targets = labels[is_masked]
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").double()
        correct += (logits.argmax(-1) == targets).sum()
        masked += is_masked.sum()
        real += batch["attention_mask"].sum()
        label_counts += torch.bincount(targets, minlength=label_counts.numel())
        for row, expert_index in enumerate(output.expert_indices):  # each token's expert(s); -1 skipped
            expert_counts[row] += count_assignments(expert_index, n_experts)
    model.train(was_training)
    n_masked = max(int(masked), 1)
    return EvalResult(
        mlm_loss=float(loss_sum) / n_masked,
        accuracy=int(correct) / n_masked,
        masked_tokens=int(masked),
        real_tokens=int(real),
        expert_counts=expert_counts.cpu(),
        majority_accuracy=int(label_counts.max()) / n_masked,
    )
