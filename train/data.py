"""Training batches: one global order per (seed, epoch), split across processes, optionally re-masked.

`batch_size` is the global micro-batch: every process takes an equal contiguous share of it, so N
processes see exactly the samples one process sees, and a run resumed at step N skips exactly the
batches it consumed (the order is recomputed from (seed, epoch), nothing else).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from data_processors.masking import document_rng, mask_tokens, maskable_tokens
from train.evaluation import MODEL_COLUMNS, collate_mlm


class EpochBatches(torch.utils.data.Sampler):
    """This process's share of each global batch of one epoch, from batch `start_batch` on."""

    def __init__(
        self, n_rows: int, batch_size: int, seed: int, epoch: int, rank: int, world_size: int, start_batch: int = 0
    ):
        self.n_rows, self.batch_size, self.seed, self.epoch = n_rows, batch_size, seed, epoch
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch

    @staticmethod
    def batches_per_epoch(n_rows: int, batch_size: int, world_size: int) -> int:
        """Full batches, plus the last partial one if every process gets at least one row of it."""
        full, rest = divmod(n_rows, batch_size)
        return full + (rest >= world_size)

    def __len__(self) -> int:
        return self.batches_per_epoch(self.n_rows, self.batch_size, self.world_size) - self.start_batch

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_rows)
        for batch in range(self.start_batch, self.batches_per_epoch(self.n_rows, self.batch_size, self.world_size)):
            rows = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            yield np.array_split(rows, self.world_size)[self.rank].tolist()


@dataclass
class DynamicMasking:
    """Re-mask `unmasked_ids` with step 2's rule; the generator is seeded by (seed, doc_id, epoch)."""

    seed: int
    epoch: int
    mask_prob: float
    mask_token_id: int
    special_token_ids: np.ndarray
    random_token_ids: np.ndarray  # regular tokens: what the 10% random replacements draw from

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        remasked = []
        for row in rows:
            ids = row["unmasked_ids"].astype(np.int64)
            maskable = maskable_tokens(ids, row["attention_mask"], self.special_token_ids)  # step 2's rule
            masked_ids, labels = mask_tokens(
                ids,
                maskable,
                document_rng(self.seed, int(row["doc_id"]), self.epoch),
                self.mask_prob,
                self.mask_token_id,
                self.random_token_ids,
            )
            remasked.append({"input_ids": masked_ids, "attention_mask": row["attention_mask"], "labels": labels})
        return collate_mlm(remasked)


def with_router_target(collate, rows: list[dict]) -> dict[str, torch.Tensor]:
    """collate(rows) plus each sequence's target expert (train.router_supervision)."""
    batch = collate(rows)
    batch["router_target"] = torch.as_tensor(np.array([row["router_target"] for row in rows]), dtype=torch.long)
    return batch


class TrainBatches:
    """Micro-batches of the train split for this process, grouped into optimizer steps.

    A dataset with a "router_target" column (train.router_supervision) hands it on with every batch."""

    def __init__(
        self,
        dataset,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        masking: str,
        tokenizer_info: dict,
        mask_prob: float,
    ):
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.masking, self.tokenizer_info, self.mask_prob = masking, tokenizer_info, mask_prob
        columns = MODEL_COLUMNS if masking == "static" else ["unmasked_ids", "attention_mask", "doc_id"]
        self.router_target = "router_target" in dataset.column_names
        if self.router_target:
            columns = [*columns, "router_target"]
        self.dataset = dataset.with_format("numpy", columns=columns)
        self.per_epoch = EpochBatches.batches_per_epoch(len(dataset), batch_size, world_size)

    def collate_for(self, epoch: int):
        if self.masking == "static":
            collate = collate_mlm
        else:
            info = self.tokenizer_info
            special = np.array(info["special_token_ids"])
            collate = DynamicMasking(
                self.seed,
                epoch,
                self.mask_prob,
                info["mask_token_id"],
                special,
                np.setdiff1d(np.arange(info["vocab_size"]), special),
            )
        return partial(with_router_target, collate) if self.router_target else collate

    def steps(self, epoch: int, batch_in_epoch: int, accumulation: int):
        """Yield ([micro-batches], (epoch, batch) position after them) forever, from the given position."""
        while True:
            sampler = EpochBatches(
                len(self.dataset),
                self.batch_size,
                self.seed,
                epoch,
                self.rank,
                self.world_size,
                start_batch=batch_in_epoch,
            )
            # its own generator: a DataLoader draws a seed from the global RNG, which dropout must own alone
            loader = iter(
                torch.utils.data.DataLoader(
                    self.dataset, batch_sampler=sampler, generator=torch.Generator(), collate_fn=self.collate_for(epoch)
                )
            )
            while micro_batches := list(itertools.islice(loader, accumulation)):
                batch_in_epoch += len(micro_batches)  # the epoch's last step may hold fewer micro-batches
                done = batch_in_epoch >= self.per_epoch
                yield micro_batches, (epoch + 1, 0) if done else (epoch, batch_in_epoch)
            epoch, batch_in_epoch = epoch + 1, 0
