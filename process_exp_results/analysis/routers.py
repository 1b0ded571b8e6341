"""Routers that learned nothing and the best linear router, on the router inputs the trained router saw (the
references.py stage reads the trained router against them):

* random routers: Gaussian weight rows rescaled to the trained router's row norms, applied with the layer's own
  selection rule; their load-matched variant with per-expert biases fitted to the trained router's loads;
* the probe: a multinomial logistic regression from router input to the factor, cross-fitted over two halves of the
  documents, its classes mapped one-to-one to experts (the most confused classes merged first).

``RouterSample`` is what step 4 keeps of the router inputs: a seeded sample of the analysed tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.router import best_picker, expert_capacity
from process_exp_results.analysis.resampling import rng_for

LOAD_TOLERANCE = 0.005  # load matching stops when every expert is within half a percentage point


LOGIT_BUDGET = 2**24  # router logits held at once (floats): bounds memory for wide models and many routers


# The load-matching biases are fitted on a seeded subsample of this many sampled tokens, then checked (and refined
# for at most LOAD_REFINE_ITERATIONS steps) on all of them. A load share estimated from 32,768 tokens has a standard
# error of at most 0.0028 (p = 1/2), so the subsample's fit lands within about the 0.005 tolerance on the whole
# sample and the refinement rarely takes more than a step: the fit's cost stays flat as the corpus grows.
LOAD_FIT_TOKENS = 32_768


LOAD_REFINE_ITERATIONS = 20


# The probe's L-BFGS is fitted on a seeded subsample of at most this many tokens of its half (it is then applied to
# every token of the other half). A probe has (d + 1) x levels parameters (129 x 20 = 2,580 for 20 topics at d 128):
# 50,000 tokens are about 20 per parameter, enough for an L2-regularized linear fit. Fitting on all 100,000 tokens of
# a half (the default 200,000 router inputs) cost 3.5 s per fit on one core; on 20 Newsgroups (2,000 documents) the
# capped token-class probe's NMI moved by 0.001 and the 20-topic probe's by 0.01, the index verdicts unchanged.
PROBE_FIT_TOKENS = 50_000


@dataclass(frozen=True)
class SelectionRule:
    """How a layer turns router logits into each token's top expert."""

    router_type: str  # topk | expert_choice
    top_k: int = 1
    capacity_factor: float | None = None  # expert choice only (None = 1.0)

    def top_choice(self, logits: torch.Tensor, batch: np.ndarray) -> torch.Tensor:
        """[R, n, E] logits -> [R, n] long: each token's top expert; E where no expert took it (expert choice).

        batch: [n] the forward pass each token was routed in (non-decreasing). Expert-choice experts compete for
        the tokens of one forward pass, as in the model, so the sample must hold every token of its passes.
        """
        n_experts = logits.shape[-1]
        if self.router_type != "expert_choice":
            return logits.argmax(-1)
        out = torch.empty(logits.shape[:2], dtype=torch.long)
        bounds = np.flatnonzero(np.diff(batch)) + 1
        for start, end in zip(np.r_[0, bounds], np.r_[bounds, len(batch)]):
            probs = torch.softmax(logits[:, start:end], dim=-1)  # [R, n_b, E]
            capacity = expert_capacity(self.capacity_factor or 1.0, end - start, self.top_k, n_experts)
            best = best_picker(probs, probs.transpose(1, 2).topk(capacity, dim=-1).indices)  # the model's rule
            out[:, start:end] = torch.where(best >= 0, best, n_experts)
        return out


def random_router_weights(trained_weight: np.ndarray, n_routers: int, rng: np.random.Generator) -> np.ndarray:
    """[R, E, d] Gaussian rows, each rescaled to the norm of the trained router's row for the same expert."""
    rows = rng.standard_normal((n_routers, *trained_weight.shape))
    rows *= np.linalg.norm(trained_weight, axis=1)[None, :, None] / np.linalg.norm(rows, axis=2, keepdims=True)
    return rows.astype(np.float32)


def expert_loads(choice: torch.Tensor, n_experts: int) -> torch.Tensor:
    """[R, n] top experts (E = none) -> [R, E] share of each router's routed tokens per expert."""
    counts = torch.zeros(choice.shape[0], n_experts + 1, dtype=torch.float64)
    counts.scatter_add_(1, choice, torch.ones_like(choice, dtype=torch.float64))
    return counts[:, :n_experts] / counts[:, :n_experts].sum(1, keepdim=True).clamp(min=1)


def fit_load_biases(
    logits: torch.Tensor,
    rule: SelectionRule,
    batch: np.ndarray,
    target: torch.Tensor,
    max_iterations: int = 200,
    initial: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert biases [R, E] that bring each router's loads to `target` [E]; and the largest error per router.

    A multiplicative update on the log loads, with a step that shrinks for a router whose error stops falling;
    the best biases seen are kept. initial: biases to start from (default zeros).
    """
    n_routers, _, n_experts = logits.shape
    biases = torch.zeros(n_routers, n_experts, dtype=logits.dtype) if initial is None else initial.clone()
    step = logits.std(dim=(1, 2)).clamp(min=1e-6)[:, None] * 0.5
    best_biases, best_error = biases.clone(), torch.full((n_routers,), float("inf"), dtype=torch.float64)
    log_target = target.clamp(min=1e-6).log()
    for _ in range(max_iterations):
        loads = expert_loads(rule.top_choice(logits + biases[:, None, :], batch), n_experts)
        error = (loads - target).abs().max(1).values
        improved = error < best_error
        best_biases[improved], best_error[improved] = biases[improved], error[improved]
        step[~improved] *= 0.7
        if bool((best_error <= LOAD_TOLERANCE).all()):
            break
        biases = biases + step * (log_target - loads.clamp(min=1e-6).log()).to(logits.dtype)
    return best_biases, best_error


def _logits(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[n, d] x [R, E, d] -> [R, n, E], contiguous (the argmax over experts runs on it many times)."""
    n_routers, n_experts, _ = weights.shape
    logits = (x @ weights.reshape(n_routers * n_experts, -1).T).view(-1, n_routers, n_experts)
    return logits.transpose(0, 1).contiguous()


def load_fit_subsample(
    batch: np.ndarray, rule: SelectionRule, rng: np.random.Generator, max_tokens: int = LOAD_FIT_TOKENS
) -> np.ndarray | None:
    """Sorted token indices the load-matching biases are fitted on: a seeded uniform sample of max_tokens (expert
    choice: whole forward passes, whose tokens compete, drawn at random up to the cap); None = all tokens."""
    n_tokens = len(batch)
    if n_tokens <= max_tokens:
        return None
    if rule.router_type != "expert_choice":
        return np.sort(rng.choice(n_tokens, size=max_tokens, replace=False))
    passes, sizes = np.unique(batch, return_counts=True)
    order = rng.permutation(len(passes))
    kept = order[np.cumsum(sizes[order]) <= max_tokens]
    return np.flatnonzero(np.isin(batch, passes[kept])) if kept.size else None


def _matched_biases(
    logits: torch.Tensor, rule: SelectionRule, batch: np.ndarray, target: torch.Tensor, fit: np.ndarray | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load-matching biases fitted on the `fit` tokens, then refined on all (the error is that of all tokens)."""
    if fit is None:
        return fit_load_biases(logits, rule, batch, target)
    start, _ = fit_load_biases(logits[:, torch.as_tensor(fit)], rule, batch[fit], target)
    return fit_load_biases(logits, rule, batch, target, max_iterations=LOAD_REFINE_ITERATIONS, initial=start)


def random_choices(
    x: torch.Tensor,
    trained_weight: np.ndarray,
    rule: SelectionRule,
    batch: np.ndarray,
    n_routers: int,
    rng: np.random.Generator,
):
    """Top experts of the trained router [n], of R random routers [R, n], of the same routers load-matched [R, n],
    and the largest load error of any load-matched router (over all n tokens; the biases are fitted on a subsample
    of LOAD_FIT_TOKENS, see there)."""
    n_tokens, n_experts = x.shape[0], trained_weight.shape[0]
    trained = rule.top_choice(_logits(x, torch.as_tensor(trained_weight, dtype=x.dtype)[None]), batch)
    target = expert_loads(trained, n_experts)[0]
    weights = torch.as_tensor(random_router_weights(trained_weight, n_routers, rng), dtype=x.dtype)
    fit = load_fit_subsample(batch, rule, rng)  # drawn after the weights: the routers do not depend on it
    plain, matched, worst = [], [], 0.0
    chunk = max(1, LOGIT_BUDGET // max(n_tokens * n_experts, 1))
    for start in range(0, n_routers, chunk):
        logits = _logits(x, weights[start : start + chunk])
        plain.append(rule.top_choice(logits, batch))
        biases, error = _matched_biases(logits, rule, batch, target, fit)
        matched.append(rule.top_choice(logits + biases[:, None, :], batch))
        worst = max(worst, float(error.max()))
    return trained[0], torch.cat(plain), torch.cat(matched), worst


@dataclass
class RandomRouters:
    """One layer's trained and random routers applied to the sampled router inputs of the analysed tokens: drawn
    once per layer, read by the NMI references (layer_references) and by the consecutive-routing reference
    (consistency.reference_from_choices)."""

    keep: np.ndarray  # [n_sample] bool: the sampled tokens among the analysed rows (the ones routed here)
    trained: torch.Tensor  # [n] top expert of the trained router
    plain: torch.Tensor  # [R, n] of R random routers
    matched: torch.Tensor  # [R, n] of the same routers, load-matched
    load_error: float  # the largest load gap of any load-matched router


def draw_random_routers(
    sample: RouterSample, analysed: np.ndarray, n_random: int, seed: int, layer: int
) -> RandomRouters:
    """The random routers of one layer on the sampled tokens whose record row is analysed (analysed: [n_records]
    bool), from rng_for(seed, 20, layer): the generator layer_references used when it drew them itself."""
    keep = analysed[sample.rows]
    x = torch.from_numpy(np.ascontiguousarray(sample.inputs[layer][keep], dtype=np.float32))
    trained, plain, matched, error = random_choices(
        x, sample.weights[layer], sample.rule, sample.batch[keep], n_random, rng_for(seed, 20, layer)
    )
    return RandomRouters(keep, trained, plain, matched, error)


def document_folds(doc_strata: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[D] 0/1: two halves of the documents, each stratum (e.g. topic) split evenly between them (dealt in turn,
    stratum after stratum, so odd strata do not all tip the same half)."""
    order = (
        np.concatenate([rng.permutation(np.flatnonzero(doc_strata == stratum)) for stratum in np.unique(doc_strata)])
        if len(doc_strata)
        else np.zeros(0, np.int64)
    )
    folds = np.zeros(len(doc_strata), dtype=np.int64)
    folds[order[1::2]] = 1
    return folds


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float = 1e-4, max_iterations: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression (class-balanced, L2 on the weights) by L-BFGS; returns weight, bias."""
    counts = torch.bincount(y, minlength=n_classes).to(x.dtype)
    class_weight = torch.where(counts > 0, counts.sum() / (counts.clamp(min=1) * (counts > 0).sum()), 0.0)
    weight = torch.zeros(n_classes, x.shape[1], dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], max_iter=max_iterations, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, y, weight=class_weight)
        loss = loss + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def merge_classes(joint: np.ndarray, n_groups: int) -> np.ndarray:
    """Map the columns (predicted classes) of a [true, predicted] count table onto n_groups groups, merging the pair
    whose merge loses the least I(true; predicted group) until n_groups are left. Returns [n_predicted] group ids."""
    columns = [joint[:, c].astype(np.float64) for c in range(joint.shape[1])]
    members = [[c] for c in range(joint.shape[1])]

    def share(column: np.ndarray) -> float:  # the column's part of the MI (up to terms every grouping shares)
        total = column.sum()
        nz = column[column > 0]
        return float((nz * np.log(nz)).sum() - (total * np.log(total) if total > 0 else 0.0))

    while len(columns) > n_groups:
        loss, a, b = min(
            (share(columns[i]) + share(columns[j]) - share(columns[i] + columns[j]), i, j)
            for i in range(len(columns))
            for j in range(i + 1, len(columns))
        )
        columns[a], members[a] = columns[a] + columns[b], members[a] + members[b]
        del columns[b], members[b]
    group = np.empty(joint.shape[1], dtype=np.int64)
    for g, classes in enumerate(members):
        group[classes] = g
    return group


def probe_choices(
    x: torch.Tensor,
    labels: np.ndarray,
    n_levels: int,
    doc: np.ndarray,
    folds: np.ndarray,
    n_experts: int,
    rng: np.random.Generator | None = None,
    max_fit_tokens: int = PROBE_FIT_TOKENS,
) -> np.ndarray:
    """[n] the expert the cross-fitted probe sends each token to: the factor's level it predicts for the token from
    the probe fitted on the other half of the documents, mapped to an expert (with n_levels > n_experts, merged by
    that probe's own confusions on its fitting half). Each probe is fitted on a seeded subsample of at most
    max_fit_tokens of its half (PROBE_FIT_TOKENS says why that is enough) and applied to every token of the other."""
    rng = np.random.default_rng(0) if rng is None else rng
    token_fold = folds[doc]
    y = torch.as_tensor(labels, dtype=torch.long)
    chosen = np.zeros(len(labels), dtype=np.int64)
    for fold in (0, 1):
        fit, apply = np.flatnonzero(token_fold == fold), np.flatnonzero(token_fold != fold)
        if fit.size == 0 or apply.size == 0:
            continue
        if fit.size > max_fit_tokens:
            fit = np.sort(rng.choice(fit, size=max_fit_tokens, replace=False))
        x_fit = x[fit]
        # standardized: L-BFGS converges in fewer steps (correction 0: one token gives std 0, not NaN)
        mean, std = x_fit.mean(0), x_fit.std(0, correction=0).clamp(min=1e-6)
        weight, bias = fit_logistic((x_fit - mean) / std, y[fit], n_levels)
        group = np.arange(n_levels)  # the expert a level goes to does not change the NMI; which levels share one does
        if n_levels > n_experts:
            in_sample = (((x_fit - mean) / std) @ weight.T + bias).argmax(-1).numpy()
            joint = np.zeros((n_levels, n_levels))
            np.add.at(joint, (labels[fit], in_sample), 1)
            group = merge_classes(joint, n_experts)
        chosen[apply] = group[(((x[apply] - mean) / std) @ weight.T + bias).argmax(-1).numpy()]
    return chosen


@dataclass
class RouterSample:
    """What step 4 keeps of the router inputs for the references: a seeded sample of the analysed tokens."""

    rows: np.ndarray  # [n] sorted rows of the routing records whose inputs were kept
    batch: np.ndarray  # [n] the forward pass each was routed in (expert choice competes within one)
    inputs: list[np.ndarray]  # per MoE layer [n, d] float32: the router's input
    weights: list[np.ndarray]  # per MoE layer [E, d]: the trained router's weight
    rule: SelectionRule
    n_candidates: int  # the tokens the sample was drawn from
    max_tokens: int  # the cap
