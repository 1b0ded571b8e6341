"""What a training run records: routing statistics gathered on the device, and the Aim run.

Aim metrics (`aim up` in the folder holding .aim shows them; README "What Aim records" has the table).
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
                  subset=train|valid + layer + expert: expert_load
"""
from __future__ import annotations

import platform
from functools import partial
from importlib import metadata

import numpy as np
import torch

from models import MoELayer
from train.evaluation import count_experts

# per-layer sums kept by RoutingRecorder, one column each
LAYER_SUMS = ("aux_loss_global", "z_loss_x_tokens", "entropy_bits_x_tokens", "dropped_x_tokens", "real_tokens")
# numbers of the optimizer, not measured on a data subset: tracked without a context
OPTIMIZER_METRICS = ("learning_rate", "grad_norm", "tokens_per_s")
# the packages whose versions a run records (with python's)
RECORDED_PACKAGES = ("torch", "transformers", "datasets", "tokenizers", "accelerate", "aim")


class RoutingRecorder:
    """Per-MoE-layer routing sums of the current step, filled by forward hooks, kept on the device.

    Only counts and sums accumulate (bincount into a preallocated tensor): nothing grows with the run.
    """

    def __init__(self, model: torch.nn.Module, n_experts: int, device: torch.device):
        self.moe_layers = [module for module in model.modules() if isinstance(module, MoELayer)]
        self.n_experts = n_experts
        self.step_sums = torch.zeros(len(self.moe_layers), len(LAYER_SUMS), dtype=torch.float64, device=device)
        self.expert_counts = torch.zeros(len(self.moe_layers), n_experts, dtype=torch.long, device=device)
        self.step_counts = torch.zeros_like(self.expert_counts)  # this step's, for the training-health checks
        self.enabled = True  # off during evaluation, which runs the same modules
        self.router_outputs: list = [None] * len(self.moe_layers)  # this forward's, with gradients
        self.router_inputs: list = [None] * len(self.moe_layers)  # this forward's [real tokens, d]
        for row, layer in enumerate(self.moe_layers):
            layer.register_forward_hook(partial(self._record, row))
            if hasattr(layer, "router"):  # the dense baseline (n_experts: 1) has no router
                layer.router.register_forward_hook(partial(self._keep_router_output, row))

    def _keep_router_output(self, row: int, module, inputs, output) -> None:
        if self.enabled:  # RouterOutput (token choice) or ExpertChoiceOutput
            self.router_outputs[row], self.router_inputs[row] = output, inputs[0]

    @torch.no_grad()
    def _record(self, row: int, module, inputs, output) -> None:
        if not self.enabled:
            return
        stats = output[1]
        chosen = stats.expert_index.reshape(-1, stats.expert_index.shape[-1])
        real = (chosen[:, 0] >= 0).sum().double()
        probs = stats.router_probs.double()
        entropy = -(probs * probs.clamp_min(1e-30).log2()).sum()  # bits; padding rows are all 0 and add nothing
        # None until the MoE layer reports it: the default layer is dropless (every token is routed)
        dropped = getattr(stats, "dropped_fraction", None)
        dropped = real.new_zeros(()) if dropped is None else dropped.detach().double()
        # column 0 (balancing loss) is filled by the loop, over the global micro-batch
        self.step_sums[row] += torch.stack([real.new_zeros(()),
                                            stats.z_loss.detach().double() * real, entropy, dropped * real, real])
        counts = count_experts((chosen,), self.n_experts)[0]
        self.expert_counts[row] += counts
        self.step_counts[row] += counts

    def release(self) -> None:
        """Drop the last forward's router outputs and inputs (and the graph they hold)."""
        self.router_outputs = [None] * len(self.moe_layers)
        self.router_inputs = [None] * len(self.moe_layers)

    def take_step_counts(self) -> torch.Tensor:
        counts = self.step_counts.clone()
        self.step_counts.zero_()
        return counts

    def take_step_sums(self) -> torch.Tensor:
        sums = self.step_sums.clone()
        self.step_sums.zero_()
        return sums


def start_aim_run(accelerator, tag: str, experiment: str, hparams: dict, run_hash: str | None):
    """The Aim run (main process only; None elsewhere); a resumed run continues its earlier Aim run."""
    init = {"experiment": experiment, **({"run_hash": run_hash} if run_hash else {})}
    accelerator.init_trackers(tag, config=hparams, init_kwargs={"aim": init})
    if not accelerator.is_main_process:
        return None
    run = accelerator.get_tracker("aim", unwrap=True)
    if tag not in run.tags:
        run.add_tag(tag)
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
    if config.load_balance_coef > 0 and config.router_type != "expert_choice":  # expert choice: balanced by construction
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
        for row in np.flatnonzero((self.streak >= self.COLLAPSE_STEPS)
                                  & (step - self.last_warning >= self.COLLAPSE_STEPS)):
            self.last_warning[row] = step
            warnings.append(f"warning: step {step}: {self.layer_names[row]} has collapsed: expert "
                            f"{int(counts[row].argmax())} took more than half of its tokens for {int(self.streak[row])} "
                            f"steps in a row; raise model.load_balance_coef or lower train.learning_rate")
        return warnings

    def take_window(self) -> dict[str, list[float]]:
        """The window's per-layer metrics, then a new window."""
        shares = self.window / np.maximum(self.window.sum(axis=1, keepdims=True), 1)
        ideal = 1.0 / self.n_experts
        metrics = {"max_load_over_ideal": (shares.max(axis=1) / ideal).tolist(),
                   "dead_experts": (shares < self.DEAD_SHARE * ideal).sum(axis=1).astype(float).tolist()}
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


def track_step(run, step: int, subset: str, metrics: dict[str, float], layer_metrics: dict[str, list[float]],
               moe_layers: list[int]) -> None:
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


def track_expert_load(run, expert_counts: torch.Tensor, moe_layers: list[int], step: int, subset: str) -> None:
    """Per-layer share of real tokens sent to each expert, as Aim contexts (subset, layer, expert)."""
    if run is None:
        return
    shares = expert_counts.float() / expert_counts.sum(dim=1, keepdim=True).clamp(min=1)
    for row, layer in enumerate(moe_layers):
        for expert, share in enumerate(shares[row].tolist()):
            run.track(share, name="expert_load", step=step,
                      context={"subset": subset, "layer": layer_name(layer), "expert": expert})
