"""What a training run records: routing statistics gathered on the device, and the Aim run.

Aim metrics (`aim up` in the folder holding .aim shows them; docs/training-at-scale.md, "What Aim records", has the table).
One naming convention, Aim's: a metric measured on data has the same name for every subset and says
which in its context, {"subset": "train" | "valid"} (mlm_loss, accuracy, expert_load); per MoE layer
a context `layer` named as in step 4's CSVs ("block 0"); a sum over layers has its own name
(aux_loss_total beside the per-layer aux_loss). Numbers of the optimizer rather than of a subset
(learning_rate, grad_norm, tokens_per_s) have no context. Router metrics appear only where they can
say something: the balancing and z losses when their coefficient is > 0, dropped_fraction where the
layer can drop, none for the dense baseline. Entropies are in bits, as in step 4's report.
  every log_steps, subset=train:  loss, mlm_loss, accuracy (masked tokens), aux_loss_total, z_loss_total,
                                  router_supervision_loss (when on)
                  + layer:        router_entropy, aux_loss, z_loss, dropped_fraction, max_load_over_ideal and
                                  dead_experts (token choice: over the logging window)
                  no context:     learning_rate, grad_norm, tokens_per_s
  every eval,     subset=valid:   mlm_loss, accuracy; + layer: routing_agreement (top-1 of the probe tokens vs
                                  the previous evaluation's, train/routing_snapshots.py)
                  subset=train|valid + layer + expert: expert_load (token choice: share of the (token, expert)
                                  assignments) or best_expert_share (expert choice; see expert_load_name)
"""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import broadcast_object_list

from config_utils import PipelineError, first_line
from models import MoELayer, count_assignments

# per-layer sums kept by RoutingRecorder, one column each
LAYER_SUMS = ("aux_loss_global", "z_loss_x_tokens", "entropy_bits_x_tokens", "dropped_x_tokens", "real_tokens")
# numbers of the optimizer, not measured on a data subset: tracked without a context
OPTIMIZER_METRICS = ("learning_rate", "grad_norm", "tokens_per_s")
# the packages whose versions a run records (with python's)
RECORDED_PACKAGES = ("torch", "transformers", "datasets", "tokenizers", "accelerate", "aim")


class RoutingRecorder:
    """Per-MoE-layer routing sums of the current step, taken from the model output's layer stats, on the device.

    Only counts and sums accumulate (scatter-adds into preallocated tensors): nothing grows with the run, and
    nothing waits on the host. train_step records every training micro-batch; evaluation records nothing.
    """

    def __init__(self, model: torch.nn.Module, n_experts: int, device: torch.device):
        self.moe_layers = [module for module in model.modules() if isinstance(module, MoELayer)]
        self.n_experts = n_experts
        self.step_sums = torch.zeros(len(self.moe_layers), len(LAYER_SUMS), dtype=torch.float64, device=device)
        self.expert_counts = torch.zeros(len(self.moe_layers), n_experts, dtype=torch.long, device=device)
        self.step_counts = torch.zeros_like(self.expert_counts)  # this step's, for the training-health checks

    @torch.no_grad()
    def record(self, layer_stats) -> None:
        """Add one forward's MoELayerStats (one per MoE layer). Means are weighted by the layer's real tokens,
        counted from the mask: an expert-choice token that no expert picked is real too."""
        for row, stats in enumerate(layer_stats):
            real = stats.real_tokens.double()
            probs = stats.router_probs.double()
            entropy = -(probs * probs.clamp_min(1e-30).log2()).sum()  # bits; padding rows are all 0 and add nothing
            # column 0 (balancing loss) is filled by the loop, over the global micro-batch
            self.step_sums[row] += torch.stack(
                [
                    real.new_zeros(()),
                    stats.z_loss.detach().double() * real,
                    entropy,
                    stats.dropped_fraction.detach().double() * real,
                    real,
                ]
            )
            counts = count_assignments(stats.expert_index, self.n_experts)
            self.expert_counts[row] += counts
            self.step_counts[row] += counts

    def take_step_counts(self) -> torch.Tensor:
        counts = self.step_counts.clone()
        self.step_counts.zero_()
        return counts

    def take_step_sums(self) -> torch.Tensor:
        sums = self.step_sums.clone()
        self.step_sums.zero_()
        return sums


def start_aim_run(accelerator, tag: str, experiment: str, hparams: dict, run_hash: str | None, aim_repo: str):
    """The Aim run (main process only; None elsewhere); a resumed run continues its earlier Aim run.

    A repository Aim cannot open (damaged, or its database locked by another program) stops the run in one line
    before its first step, in every process: an untracked run is not what the configs asked for."""
    init = {"experiment": experiment, **({"run_hash": run_hash} if run_hash else {})}
    problem, run = None, None
    try:
        accelerator.init_trackers(tag, config=hparams, init_kwargs={"aim": init})
        if accelerator.is_main_process:
            run = accelerator.get_tracker("aim", unwrap=True)
            if tag not in run.tags:
                run.add_tag(tag)
    except Exception as error:  # sqlite, rocksdb and decoding errors all mean the same to the user
        repository = Path(aim_repo) / ".aim"
        problem = (
            f"the Aim repository {repository} cannot be used ({type(error).__name__}: {first_line(error, 120)}): "
            f"if another program holds it, wait for it; if it is damaged, move it aside (mv {repository} "
            f"{repository}.broken) or set train.aim_repo to another folder, and run again"
        )
    problem = broadcast_object_list([problem])[0]  # the other processes must not wait for a main that has stopped
    if problem:
        raise PipelineError(problem)
    return run


def layer_name(index: int) -> str:
    """A block's name in Aim contexts, as in step 4's CSVs and figures."""
    return f"block {index}"


def routing_metric_names(config) -> set[str]:
    """The per-MoE-layer metrics worth tracking for this model: a loss whose coefficient is 0 or a share
    that is 0 by construction would only add flat lines."""
    if config.is_dense_baseline:  # no router at all
        return set()
    names = {"router_entropy"}
    if (
        config.load_balance_coef > 0 and config.router_type != "expert_choice"
    ):  # expert choice: balanced by construction
        names.add("aux_loss")
    if config.router_z_loss_coef > 0:
        names.add("z_loss")
    if config.router_type == "expert_choice" or config.capacity_factor is not None:  # dropless layers drop nothing
        names.add("dropped_fraction")
    return names


class RoutingHealth:
    """What users of large MoE trainers watch: per layer, over each logging window, the busiest expert's load over
    the ideal 1/E (max_load_over_ideal) and the experts below DEAD_SHARE of the ideal load (dead_experts); and a
    console warning when a layer collapses, one expert taking more than half of its tokens for COLLAPSE_STEPS steps
    in a row (repeated at most every COLLAPSE_STEPS steps)."""

    DEAD_SHARE = 0.01
    COLLAPSE_SHARE = 0.5
    COLLAPSE_STEPS = 100

    def __init__(self, n_layers: int, n_experts: int, layer_names: list[str]):
        self.n_experts, self.layer_names = n_experts, layer_names
        self.window = np.zeros((n_layers, n_experts), dtype=np.int64)
        self.streak = np.zeros(n_layers, dtype=np.int64)  # steps in a row with one expert above COLLAPSE_SHARE
        self.last_warning = np.full(n_layers, -self.COLLAPSE_STEPS, dtype=np.int64)

    def add_step(self, step: int, counts: np.ndarray) -> list[str]:
        """Add one step's [n_layers, n_experts] counts; return the warning lines due now."""
        self.window += counts
        top_share = counts.max(axis=1) / np.maximum(counts.sum(axis=1), 1)
        self.streak = np.where(top_share > self.COLLAPSE_SHARE, self.streak + 1, 0)
        warnings = []
        for row in np.flatnonzero(
            (self.streak >= self.COLLAPSE_STEPS) & (step - self.last_warning >= self.COLLAPSE_STEPS)
        ):
            self.last_warning[row] = step
            warnings.append(
                f"warning: step {step}: {self.layer_names[row]} has collapsed: expert "
                f"{int(counts[row].argmax())} took more than half of its tokens for {int(self.streak[row])} "
                f"steps in a row; raise model.load_balance_coef or lower train.learning_rate"
            )
        return warnings

    def take_window(self) -> dict[str, list[float]]:
        """The window's per-layer metrics, then a new window."""
        shares = self.window / np.maximum(self.window.sum(axis=1, keepdims=True), 1)
        ideal = 1.0 / self.n_experts
        metrics = {
            "max_load_over_ideal": (shares.max(axis=1) / ideal).tolist(),
            "dead_experts": (shares < self.DEAD_SHARE * ideal).sum(axis=1).astype(float).tolist(),
        }
        self.window[:] = 0
        return metrics


def package_versions() -> dict[str, str | None]:
    """Versions of python and of the packages that decide what a run computes (None: not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in RECORDED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def track_step(
    run, step: int, subset: str, metrics: dict[str, float], layer_metrics: dict[str, list[float]], moe_layers: list[int]
) -> None:
    """Metrics measured on `subset` (train or valid) get context {"subset": subset}, per-layer ones also
    {"layer": "block N"}; OPTIMIZER_METRICS get none."""
    if run is None:
        return
    shared = set(metrics) & set(layer_metrics)
    if shared:  # one name must not hold both a per-layer series and a total
        raise ValueError(f"metric names used both per layer and as a total: {sorted(shared)}")
    for name, value in metrics.items():
        run.track(value, name=name, step=step, context={} if name in OPTIMIZER_METRICS else {"subset": subset})
    for name, values in layer_metrics.items():
        for layer, value in zip(moe_layers, values):
            run.track(value, name=name, step=step, context={"subset": subset, "layer": layer_name(layer)})


def expert_load_name(config) -> str:
    """What the per-expert shares of the routing counts are, for this router: token choice counts the (token,
    expert) assignments the router made, expert_load. Under expert choice every expert processes exactly its
    capacity (a constant 1/E); what varies is each picked token's highest-gate expert, best_expert_share."""
    return "best_expert_share" if config.router_type == "expert_choice" else "expert_load"


def track_expert_load(
    run, expert_counts: torch.Tensor, moe_layers: list[int], step: int, subset: str, name: str = "expert_load"
) -> None:
    """Per-layer shares of the routing counts per expert, as Aim contexts (subset, layer, expert); name from
    expert_load_name(config)."""
    if run is None:
        return
    shares = expert_counts.float() / expert_counts.sum(dim=1, keepdim=True).clamp(min=1)
    for row, layer in enumerate(moe_layers):
        for expert, share in enumerate(shares[row].tolist()):
            run.track(
                share, name=name, step=step, context={"subset": subset, "layer": layer_name(layer), "expert": expert}
            )
