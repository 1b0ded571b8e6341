"""train.router_refit_steps (the router-supervision control): after training, the routers alone are fitted to
train.router_supervision's target on the final representation, everything else kept as trained.

Why: during training a supervised router chases hidden states that keep changing, with the learning rate of the
rest; on 20 Newsgroups it ended at a cross-entropy a router fitted to the final states beats by a wide margin, so the
control measured how well online training fits, not whether the index sees a router that routes by topic.
"""

from __future__ import annotations

import statistics

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from train.loop import router_supervision_sum


def refit_routers(
    accelerator: Accelerator,
    model,
    moe_layers: list,
    batches,
    position,
    steps: int,
    learning_rate: float,
    tag: str,
    stop_requested=lambda: False,
) -> dict | None:
    """`steps` Adam steps (constant learning rate, no weight decay) on the routers' cross-entropy, the model in eval
    mode (no dropout: the representation step 4 sees) and the rest frozen; each step routes with the current
    routers, so a later layer's router fits the inputs the earlier routers now give it. Returns the loss at the
    start and the end (mean over the first and last quarter of the steps, at most 50, summed over layers, mean over real
    tokens); None when stop_requested() (a signal, on any process) stopped it first."""
    weights = [layer.router.linear.weight for layer in moe_layers]
    optimizer = torch.optim.Adam(weights, lr=learning_rate)
    stream = batches.steps(*position, 1)  # the training order, continued: batches of train.batch_size
    unwrapped = accelerator.unwrap_model(model)  # its forward runs in the training's precision (accelerate's autocast)
    was_training = unwrapped.training
    unwrapped.eval()
    losses = []
    for _ in tqdm(
        range(steps),
        desc=f"step 3: fitting {tag}'s routers to their target",
        unit="step",
        mininterval=1.0,
        disable=not accelerator.is_local_main_process,
    ):
        if _any_process(accelerator, stop_requested()):
            unwrapped.train(was_training)
            return None
        (batch,), _ = next(stream)
        batch = {key: value.to(accelerator.device) for key, value in batch.items()}
        target = batch.pop("router_target")
        with torch.no_grad():  # the hidden states are inputs here, not trained
            output = unwrapped(**batch, masked_logits_only=True)
        real = batch["attention_mask"].sum()
        loss = router_supervision_sum(moe_layers, output.layer_stats, target, batch["attention_mask"]) / real
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # the forward ran on the unwrapped model: DDP's hooks stay out, the gradients are reduced here
        if accelerator.num_processes > 1:  # every process keeps the same routers
            for weight in weights:
                weight.grad = accelerator.reduce(weight.grad, "mean")
        optimizer.step()
        losses.append(float(accelerator.reduce(loss.detach(), "mean")))  # over the processes' batches
    unwrapped.train(was_training)
    window = max(1, min(50, len(losses) // 4))
    return {
        "steps": steps,
        "learning_rate": learning_rate,
        "loss_first": statistics.fmean(losses[:window]) if losses else None,
        "loss_last": statistics.fmean(losses[-window:]) if losses else None,
    }


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
    """Whether flag is set on any process (every process stops at the same step)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item() > 0)
