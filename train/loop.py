"""One optimizer step over the global batch, sharded evaluation, and the process-wide pieces
(accelerator, RNG states) that checkpoints need.

Loss weighting, so N processes compute what one process computes on the same global batch:
the MLM loss is the mean over every masked token of the step (all micro-batches, all processes),
not a mean of per-process means; the z-loss likewise over every real token. The Switch balancing
loss n_experts * sum_i f_i * P_i of each micro-batch is taken over the global micro-batch: f_i (no
gradient) and P_i from counts and probability sums summed over processes, each process
differentiating its own tokens' share of P_i. DDP averages gradients over processes, so each
process scales its share by N. The router-supervision control (train.router_supervision) is, like
the z-loss, a mean over every real token of the step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from config_utils import PipelineError
from data_processors.masking import IGNORE_INDEX
from models.losses import BalancingSums, switch_balancing_loss
from train.evaluation import EvalResult, evaluate_mlm, mlm_loader
from train.precision import bf16_is_fast
from train.tracking import LAYER_SUMS, RoutingRecorder, routing_metric_names


def make_accelerator(train_config: dict, model_width: int) -> Accelerator:
    """train.py's Accelerator; mixed_precision "auto" follows train/precision.py's rule for the device and the
    model's width (embedding_dim)."""
    precision = train_config["mixed_precision"]
    cuda = train_config["device"] != "cpu" and torch.cuda.is_available()
    launched = launched_world_size()
    mps = train_config["device"] != "cpu" and torch.backends.mps.is_available() and launched == 1
    # accelerate forms a multi-process CPU world only when told cpu=True: with device auto and no GPU it would
    # give each launched process a world of its own, and N processes would each train the whole run alone
    cpu = not (cuda or mps)
    if precision == "auto":  # bf16 where the device multiplies it natively and it pays at this width
        precision = "bf16" if bf16_is_fast("cuda" if cuda else "cpu", model_width) else "no"
    if precision == "fp16" and not (cuda or mps):  # accelerate would train in float32 and still report fp16
        raise PipelineError(
            "train.mixed_precision=fp16 needs a GPU, and this run is on the CPU, where it would "
            "silently train in float32: use mixed_precision: no (or auto), or bf16, which runs "
            "on the CPU under bfloat16 autocast"
        )
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=precision,
        log_with="aim",
        project_dir=train_config["aim_repo"],
        dynamo_backend="inductor" if train_config["compile"] else "no",
    )
    if accelerator.num_processes != launched:  # each would train the whole run alone, into one folder
        raise PipelineError(
            f"the launcher started {launched} processes but accelerate joined {accelerator.num_processes} on "
            f"{accelerator.device} (distributed type {accelerator.distributed_type}): launch with torchrun, or "
            f"set train.device=cpu to train on the CPUs"
        )
    return accelerator


def launched_world_size() -> int:
    """How many processes the launcher (torchrun, accelerate launch, mpirun) says make up this run; 1 if none."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def no_decay_parameter(module: torch.nn.Module, name: str) -> bool:
    """BERT's recipe: biases and LayerNorm weights are not decayed. A bias is any parameter its module names so:
    nn.Linear's `bias`, and StackedExperts' per-expert biases b_in [E, h] / b_out [E, d], which are 2-D."""
    return isinstance(module, torch.nn.LayerNorm) or name in getattr(module, "bias_names", ("bias",))


def parameter_groups(model: torch.nn.Module) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """The trainable parameters (frozen ones left out), named, split into "decay" and "no_decay"; a tied weight once."""
    groups, seen = {"decay": [], "no_decay": []}, set()
    for module_name, module in model.named_modules():
        for name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            group = "no_decay" if no_decay_parameter(module, name) else "decay"
            groups[group].append((f"{module_name}.{name}" if module_name else name, parameter))
    return groups


def optimizer_for(
    model: torch.nn.Module, learning_rate: float, weight_decay: float, fused: bool = True
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; biases and LayerNorm weights are not decayed.

    fused: one kernel for the whole update, on the CPU as on CUDA (5x faster than the per-tensor loop on the CPU,
    measured: 10 vs 56 ms a step for 4 x [8, 256, 2048] experts); fused=False keeps torch's default path."""
    groups = parameter_groups(model)
    return torch.optim.AdamW(
        [
            {"params": [p for _, p in groups["decay"]], "weight_decay": weight_decay},
            {"params": [p for _, p in groups["no_decay"]], "weight_decay": 0.0},
        ],
        lr=learning_rate,
        fused=fused or None,
    )


@dataclass
class StepResult:
    metrics: dict[str, float]  # loss, mlm_loss, accuracy, learning_rate, aux_loss_total, ...
    layer_metrics: dict[str, list[float]]  # per MoE layer, those of tracking.routing_metric_names
    real_tokens: int  # all processes
    stop_requested: bool  # any process got SIGINT/SIGTERM


def global_balancing_loss(accelerator: Accelerator, layer_stats, n_experts: int):
    """Per MoE layer: (this process's differentiable share, the global value) of models.losses.switch_balancing_loss
    over all processes' tokens: the layers' BalancingSums are summed over processes (one collective), and each
    process differentiates only its own probability sums."""
    sums = [stats.balancing for stats in layer_stats]
    if not sums or any(layer is None for layer in sums):  # no MoE block, expert choice, or the dense baseline
        zero = torch.zeros(len(sums), dtype=torch.float64, device=accelerator.device)
        return zero, zero
    local = BalancingSums(
        prob_sums=torch.stack([layer.prob_sums for layer in sums]),
        counts=torch.stack([layer.counts for layer in sums]),
        n_tokens=torch.stack([layer.n_tokens for layer in sums]),
        n_assignments=torch.stack([layer.n_assignments for layer in sums]),
    )
    n_layers = len(sums)
    flat = torch.cat(
        [
            local.counts.double().reshape(-1),
            local.prob_sums.detach().double().reshape(-1),
            local.n_tokens.double(),
            local.n_assignments.double(),
        ]
    )
    totals = accelerator.reduce(flat, "sum")
    size = n_layers * n_experts
    global_sums = BalancingSums(
        prob_sums=totals[size : 2 * size].view(n_layers, n_experts),
        counts=totals[:size].view(n_layers, n_experts),
        n_tokens=totals[2 * size : 2 * size + n_layers],
        n_assignments=totals[2 * size + n_layers :],
    )
    share = switch_balancing_loss(dataclasses.replace(global_sums, prob_sums=local.prob_sums), n_experts)
    return share, switch_balancing_loss(global_sums, n_experts)


def router_supervision_sum(moe_layers: list, layer_stats, router_target: torch.Tensor, real_token_mask: torch.Tensor):
    """train.router_supervision (a control): cross-entropy of every router's logits against each real token's target
    expert (its document's), summed over tokens and MoE layers. The router input is detached, so the term trains the
    router weights only (reaching the layers below, it made the hidden states cluster by topic, and random routers
    on them split the topics too: a representation that learned the topic, not a router)."""
    targets = router_target[:, None].expand(real_token_mask.shape)[real_token_mask]  # the routers' row order
    total = 0.0
    for layer, stats in zip(moe_layers, layer_stats):
        weight = layer.router.linear.weight
        logits = torch.nn.functional.linear(stats.router_input.detach().to(torch.float32), weight.to(torch.float32))
        total = total + torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    return total


def step_loss(
    output,
    balancing_share,
    masked_here,
    real_here,
    masked_total,
    real_total,
    n_micro: int,
    world_size: int,
    config,
    supervision_sum=None,
    supervision_coef: float = 0.0,
):
    """This process's share of the step's loss, times the process count (DDP averages the gradients)."""
    loss = (
        masked_here / masked_total * output.mlm_loss
        + config.load_balance_coef * balancing_share.sum() / n_micro
        + config.router_z_loss_coef * real_here / real_total * output.z_loss
    )
    if supervision_sum is not None:  # a mean over every real token of the step, like the z-loss
        loss = loss + supervision_coef * supervision_sum / real_total
    return world_size * loss


def step_token_counts(accelerator: Accelerator, micro_batches: list[dict]) -> tuple[int, int]:
    """(masked, real) tokens of the step over all processes: the weights of its means."""
    counts = torch.tensor(
        [
            sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches),
            sum(int(b["attention_mask"].sum()) for b in micro_batches),
        ]
    )  # the batches are on the CPU
    if accelerator.num_processes > 1:  # the collective runs on the device; one process needs no round trip (a sync)
        counts = accelerator.reduce(counts.to(accelerator.device), "sum")
    masked_total, real_total = (max(int(n), 1) for n in counts)
    return masked_total, real_total


def forward_backward(
    accelerator: Accelerator,
    model,
    micro_batches: list[dict],
    recorder: RoutingRecorder,
    token_totals: tuple[int, int],
    supervision_coef: float,
) -> torch.Tensor:
    """Forward and backward every micro-batch, gradients synchronized on the last; returns this process's sums
    [MLM loss x masked tokens, correct predictions, router supervision] (routing sums go to the recorder)."""
    config = accelerator.unwrap_model(model).config
    world_size, n_micro = accelerator.num_processes, len(micro_batches)
    sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    for index, batch in enumerate(micro_batches):
        # the masked labels are selected on the CPU: boolean indexing on the device waits for the host
        masked_labels = batch["labels"][batch["labels"] != IGNORE_INDEX].to(accelerator.device, non_blocking=True)
        batch = {key: value.to(accelerator.device, non_blocking=True) for key, value in batch.items()}
        router_target = batch.pop("router_target", None)
        masked_here = (batch["labels"] != IGNORE_INDEX).sum()
        with contextlib.nullcontext() if index == n_micro - 1 else accelerator.no_sync(model):
            output = model(**batch, masked_logits_only=True)  # logits [n_masked, V]
            recorder.record(output.layer_stats)
            balancing_share, balancing = global_balancing_loss(accelerator, output.layer_stats, config.n_experts)
            recorder.step_sums[:, 0] += balancing / world_size  # summed over processes below
            supervision = (
                None
                if router_target is None
                else router_supervision_sum(
                    recorder.moe_layers, output.layer_stats, router_target, batch["attention_mask"]
                )
            )
            loss = step_loss(
                output,
                balancing_share,
                masked_here,
                batch["attention_mask"].sum(),
                *token_totals,
                n_micro,
                world_size,
                config,
                supervision,
                supervision_coef,
            )
            accelerator.backward(loss)
        sums[0] += output.mlm_loss.detach().double() * masked_here
        sums[1] += (output.logits.detach().argmax(-1) == masked_labels).sum()
        if supervision is not None:
            sums[2] += supervision.detach().double()
    return sums


def train_step(
    accelerator: Accelerator,
    model,
    optimizer,
    scheduler,
    micro_batches: list[dict],
    recorder: RoutingRecorder,
    max_grad_norm: float | None,
    stop_requested: bool,
    step: int,
    supervision_coef: float = 0.0,
) -> StepResult:
    """Forward/backward every micro-batch, one collective for the logged numbers, clip, optimizer step.

    A micro-batch with a "router_target" (train.router_supervision) adds its routers' cross-entropy, times
    supervision_coef."""
    config = accelerator.unwrap_model(model).config
    masked_total, real_total = step_token_counts(accelerator, micro_batches)
    sums = forward_backward(accelerator, model, micro_batches, recorder, (masked_total, real_total), supervision_coef)
    # one collective for every number logged and for the stop flag, so all processes agree on both
    local = torch.cat([sums, sums.new_tensor([float(stop_requested)]), recorder.take_step_sums().reshape(-1)])
    totals = accelerator.reduce(local, "sum").cpu()
    layer_sums = totals[4:].reshape(-1, len(LAYER_SUMS))
    per_layer = {
        "router_entropy": (layer_sums[:, 2] / real_total).tolist(),
        "aux_loss": (layer_sums[:, 0] / len(micro_batches)).tolist(),
        "z_loss": (layer_sums[:, 1] / real_total).tolist(),
        "dropped_fraction": (layer_sums[:, 3] / real_total).tolist(),
    }
    mlm_loss, supervision_loss = float(totals[0]) / masked_total, float(totals[2]) / real_total
    loss = (
        mlm_loss
        + config.load_balance_coef * sum(per_layer["aux_loss"])
        + config.router_z_loss_coef * sum(per_layer["z_loss"])
        + supervision_coef * supervision_loss
    )
    if not math.isfinite(loss):
        raise NonFiniteLoss(step, loss)

    metrics = {
        "loss": loss,
        "mlm_loss": mlm_loss,
        "accuracy": float(totals[1]) / masked_total,
        "learning_rate": optimizer.param_groups[0]["lr"],
    }
    if supervision_coef:
        metrics["router_supervision_loss"] = supervision_loss  # summed over MoE layers, mean over real tokens
    if max_grad_norm is not None:
        metrics["grad_norm"] = float(accelerator.clip_grad_norm_(model.parameters(), max_grad_norm))
    optimizer.step()
    if not accelerator.optimizer_step_was_skipped:  # fp16 skips steps whose gradients overflowed
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    wanted = routing_metric_names(config)
    layer_metrics = {name: values for name, values in per_layer.items() if name in wanted}
    for name in ("aux_loss", "z_loss"):
        if name in layer_metrics:  # the sum over layers that the loss weights; its own name beside the series
            metrics[f"{name}_total"] = sum(layer_metrics[name])
    return StepResult(metrics, layer_metrics, real_total, bool(totals[3] > 0))


class NonFiniteLoss(Exception):
    def __init__(self, step: int, loss: float):
        super().__init__(f"the loss became {loss} at step {step}")
        self.step, self.loss = step, loss


def evaluate_sharded(accelerator: Accelerator, model, dataset, batch_size: int, max_batches: int | None) -> EvalResult:
    """Every process evaluates its contiguous share of `dataset`; the sums are combined."""
    world_size = accelerator.num_processes
    shard = dataset.shard(world_size, accelerator.process_index, contiguous=True) if world_size > 1 else dataset
    loader = mlm_loader(shard, max(batch_size // world_size, 1))
    result = evaluate_mlm(accelerator.unwrap_model(model), loader, accelerator.device, max_batches)
    if world_size == 1:
        return result
    sums = torch.tensor(
        [
            result.mlm_loss * result.masked_tokens,
            result.accuracy * result.masked_tokens,
            result.masked_tokens,
            result.real_tokens,
        ],
        dtype=torch.float64,
        device=accelerator.device,
    )
    loss_sum, correct, masked, real = accelerator.reduce(sums, "sum").tolist()
    counts = accelerator.reduce(result.expert_counts.to(accelerator.device), "sum").cpu()
    return EvalResult(
        mlm_loss=loss_sum / max(masked, 1),
        accuracy=correct / max(masked, 1),
        masked_tokens=int(masked),
        real_tokens=int(real),
        expert_counts=counts,
        majority_accuracy=float("nan"),
    )


def gather_rng_states(accelerator: Accelerator) -> dict[str, torch.Tensor]:
    """[n_processes, state bytes] per generator; dropout depends on them, so resuming restores them."""
    states = {"torch_cpu": torch.get_rng_state()}
    if accelerator.device.type == "cuda":
        states["torch_cuda"] = torch.cuda.get_rng_state(accelerator.device)
    return {name: accelerator.gather(state.to(accelerator.device)[None]).cpu() for name, state in states.items()}


def restore_rng_states(accelerator: Accelerator, states: dict[str, torch.Tensor]) -> bool:
    """False when the process count changed: the data order still resumes exactly, dropout does not."""
    rank = accelerator.process_index
    if any(table.shape[0] != accelerator.num_processes for table in states.values()):
        return False
    torch.set_rng_state(states["torch_cpu"][rank].clone())
    if "torch_cuda" in states and accelerator.device.type == "cuda":
        torch.cuda.set_rng_state(states["torch_cuda"][rank].clone(), accelerator.device)
    return True
