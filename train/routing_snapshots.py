"""Routing over training: where a fixed probe of validation tokens goes at every evaluation, and how settled it is.

At every evaluation step train.py runs the model (eval mode) on the probe, the first PROBE_SEQUENCES
validation sequences with their unmasked ids, and writes the top-k experts of every real token per MoE
layer to run_dir/routing_snapshots/step-NNNNNN.npy ([n_layers, n_tokens, k], int16, -1 = no expert).
The last snapshot is the final model's, so step 4 reads the run's saturation (OLMoE's "router
saturation") off these files alone: per snapshot and layer, the share of probe tokens whose top-1
expert equals the final model's, and the mean top-k overlap / k.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from config_utils import atomic_file

SNAPSHOT_DIR = "routing_snapshots"
PROBE_SEQUENCES = 256
SETTLED_AGREEMENT = 0.9  # routing has settled from the first step after which top-1 agreement stays >= this


def probe_batches(valid_set, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """The probe: the first PROBE_SEQUENCES validation sequences (all if fewer), the text as it is (unmasked)."""
    probe = valid_set.select(range(min(PROBE_SEQUENCES, len(valid_set))))
    ids_column = "unmasked_ids" if "unmasked_ids" in probe.column_names else "input_ids"
    probe = probe.with_format("torch", columns=[ids_column, "attention_mask"])
    return [
        {"input_ids": batch[ids_column].long(), "attention_mask": batch["attention_mask"].bool()}
        for batch in probe.iter(batch_size=batch_size)
    ]


@torch.no_grad()
def routing_snapshot(model, batches: list[dict[str, torch.Tensor]], device: torch.device) -> np.ndarray:
    """[n_moe_layers, n_real_tokens, k] int16: the experts each real probe token goes to, best first."""
    was_training = model.training
    model.eval()  # no dropout, no router jitter: the routing the model would use
    try:
        per_batch = []
        for batch in batches:
            mask = batch["attention_mask"].to(device)
            output = model.encoder(batch["input_ids"].to(device), mask)
            per_batch.append(torch.stack([experts[mask] for experts in output.expert_indices]).cpu())
    finally:
        model.train(was_training)
    return torch.cat(per_batch, dim=1).numpy().astype(np.int16)


def snapshot_path(run_dir: Path, step: int) -> Path:
    return run_dir / SNAPSHOT_DIR / f"step-{step:06d}.npy"


def save_snapshot(run_dir: Path, step: int, snapshot: np.ndarray) -> Path:
    """Written under a temporary name and renamed: a killed run never leaves a truncated snapshot."""
    path = snapshot_path(run_dir, step)
    with atomic_file(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, snapshot)
    return path


def snapshot_steps(run_dir: Path) -> list[int]:
    """The steps a run has snapshots of, oldest first; empty for a run trained before snapshots were recorded."""
    return sorted(int(path.stem.split("-")[1]) for path in (run_dir / SNAPSHOT_DIR).glob("step-*.npy"))


def last_snapshot(run_dir: Path) -> np.ndarray | None:
    """The newest snapshot of a run (what a resumed run's next agreement compares with), None if there is none."""
    steps = snapshot_steps(run_dir)
    return np.load(snapshot_path(run_dir, steps[-1])) if steps else None


def load_snapshots(run_dir: Path) -> tuple[list[int], list[np.ndarray]]:
    """(steps, snapshots) of a run, oldest first."""
    steps = snapshot_steps(run_dir)
    return steps, [np.load(snapshot_path(run_dir, step)) for step in steps]


def top1_agreement(previous: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Per layer, the share of probe tokens whose top-1 expert is the same in both snapshots."""
    return (previous[:, :, 0] == current[:, :, 0]).mean(axis=1)


def topk_overlap(previous: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Per layer, the mean over probe tokens of |top-k here & top-k there| / k (no-expert slots never match)."""
    shared = (previous[:, :, :, None] == current[:, :, None, :]) & (previous[:, :, :, None] >= 0)
    return shared.any(axis=3).sum(axis=2).mean(axis=1) / previous.shape[2]


def settled_at(steps: list[int], agreement: list[float], threshold: float = SETTLED_AGREEMENT) -> int | None:
    """The first step from which agreement with the final model stays >= threshold; None if it never did
    before the final snapshot (which agrees with itself and proves nothing)."""
    first = None
    for step, value in zip(steps[:-1], agreement[:-1]):
        if value >= threshold:
            first = step if first is None else first
        else:
            first = None
    return first


def saturation(run_dir: Path, layer_names: list[str], until_step: int | None = None) -> dict | None:
    """Per layer: agreement of every snapshot with the final one, and the step from which it stays settled.
    until_step: the model is the run's checkpoint at that step: its snapshot is the final one, later ones unseen."""
    steps, snapshots = load_snapshots(run_dir)
    if until_step is not None:
        if until_step not in steps:  # no snapshot of that model: its routing cannot be compared
            return None
        kept = [index for index, step in enumerate(steps) if step <= until_step]
        steps, snapshots = [steps[index] for index in kept], [snapshots[index] for index in kept]
    if len(snapshots) < 2:
        return None
    final = snapshots[-1]
    result = {}
    for row, name in enumerate(layer_names):
        top1 = [float(top1_agreement(snapshot, final)[row]) for snapshot in snapshots]
        topk = [float(topk_overlap(snapshot, final)[row]) for snapshot in snapshots]
        result[name] = {"steps": steps, "top1": top1, "topk": topk, "settled_at": settled_at(steps, top1)}
    return result
