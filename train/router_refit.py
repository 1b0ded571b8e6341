"""train.router_refit_batches (the router-supervision control): after training, the routers alone are fitted to
train.router_supervision's target on the final representation, everything else kept as trained.

Why: during training a supervised router chases hidden states that keep changing, with the learning rate of the
rest; on 20 Newsgroups it ended at a cross-entropy a router fitted to the final states beats by a wide margin, so the
control measured how well online training fits, not whether the index sees a router that routes by topic. The fit
is a convex problem (a linear router, a cross-entropy), solved to convergence by L-BFGS on a sample of router inputs:
Adam on a stream of batches stopped far from its optimum (docs/results.md, the power check).
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

MAX_ITERATIONS = 300  # L-BFGS iterations per router at most; it stops sooner once the loss stops falling
CHUNK = 10  # iterations between checks for a stop request (and the progress bar's ticks)


def refit_routers(
    accelerator: Accelerator,
    model,
    moe_layers: list,
    batches,
    position,
    n_batches: int,
    tag: str,
    stop_requested=lambda: False,
) -> dict | None:
    """Fit each router alone to its target: its inputs on n_batches training batches (the training order,
    continued), then L-BFGS on their cross-entropy against each real token's target expert. Layer by layer, in
    order: an earlier router decides which experts make a later one's inputs, so those are read after it is fitted.
    The model is in eval mode (no dropout: the representation step 4 sees) and every other weight stays as trained.
    With several processes each reads its own batches and the loss and gradients are summed over all of them, so
    every process fits the same routers. Returns the routers' loss before and after (summed over layers, mean over
    real tokens); None when stop_requested() (a signal, on any process) stopped it first."""
    unwrapped = accelerator.unwrap_model(model)  # its forward runs in the training's precision (accelerate's autocast)
    was_training = unwrapped.training
    unwrapped.eval()
    stream = batches.steps(*position, 1)  # the training order, continued: batches of train.batch_size
    sample = [next(stream)[0][0] for _ in range(n_batches)]
    result = {"batches": n_batches, "tokens": 0, "iterations": [], "loss_first": 0.0, "loss_last": 0.0}
    try:
        for index, layer in enumerate(moe_layers):
            inputs, targets = _router_inputs(accelerator, unwrapped, sample, index, stop_requested)
            if inputs is None:
                return None
            weight = layer.router.linear.weight
            tokens = float(_summed(accelerator, torch.tensor(float(len(targets)))))  # every process's, for the mean
            fit = (accelerator, weight, inputs, targets, tokens)
            first = _loss_and_grad(*fit, with_grad=False)
            iterations = _fit(*fit, f"{tag}'s MoE layer {index} router", stop_requested)
            if iterations is None:
                return None
            result["tokens"] = int(tokens)
            result["iterations"].append(iterations)
            result["loss_first"] += first
            result["loss_last"] += _loss_and_grad(*fit, with_grad=False)
    finally:
        unwrapped.train(was_training)
    return result


def _router_inputs(accelerator, model, sample, index, stop_requested):
    """[N, d] float32 router inputs of MoE layer `index` and [N] target experts, over the sample's real tokens (in
    the routers' row order); (None, None) when stopped."""
    inputs, targets = [], []
    for batch in tqdm(
        sample,
        desc=f"step 3: reading MoE layer {index}'s router inputs",
        unit="batch",
        mininterval=1.0,
        disable=not accelerator.is_local_main_process,
    ):
        if _any_process(accelerator, stop_requested()):
            return None, None
        batch = {key: value.to(accelerator.device) for key, value in batch.items()}
        target = batch.pop("router_target")
        with torch.no_grad():
            output = model(**batch, masked_logits_only=True)
        mask = batch["attention_mask"].bool()
        inputs.append(output.layer_stats[index].router_input.to(torch.float32))
        targets.append(target[:, None].expand(mask.shape)[mask])
    return torch.cat(inputs), torch.cat(targets)


def _fit(accelerator, weight, inputs, targets, tokens, name, stop_requested) -> int | None:
    """L-BFGS on the router weight (no bias, as the router has none); the iterations it took, None when stopped."""
    optimizer = torch.optim.LBFGS(  # max_eval: the line searches never end a chunk early, only convergence does
        [weight], max_iter=CHUNK, max_eval=25 * CHUNK, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad(set_to_none=True)
        return torch.tensor(_loss_and_grad(accelerator, weight, inputs, targets, tokens, with_grad=True))

    bar = tqdm(
        total=MAX_ITERATIONS,
        desc=f"step 3: fitting {name} to its target",
        unit="it",
        mininterval=1.0,
        disable=not accelerator.is_local_main_process,
    )
    done = 0
    with bar:
        while done < MAX_ITERATIONS:
            if _any_process(accelerator, stop_requested()):
                return None
            optimizer.step(closure)
            total = optimizer.state[weight]["n_iter"]  # counted over the chunks
            bar.update(total - done)
            if total - done < CHUNK:  # it stopped before its chunk ran out: converged
                return total
            done = total
    return done


def _loss_and_grad(accelerator, weight, inputs, targets, tokens: float, with_grad: bool) -> float:
    """The router's mean cross-entropy over every process's tokens (`tokens` of them in all); with_grad: its
    gradient is in weight.grad."""
    with torch.set_grad_enabled(with_grad):
        logits = torch.nn.functional.linear(inputs, weight.to(torch.float32))
        total = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    if with_grad:
        (grad,) = torch.autograd.grad(total, weight)
        weight.grad = _summed(accelerator, grad) / tokens
    return float(_summed(accelerator, total.detach()) / tokens)


def _summed(accelerator: Accelerator, value: torch.Tensor) -> torch.Tensor:
    """value summed over the processes (itself with one)."""
    if accelerator.num_processes == 1:
        return value
    return accelerator.reduce(value.to(accelerator.device), "sum").cpu()


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
    """Whether flag is set on any process (every process stops at the same step)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item() > 0)
