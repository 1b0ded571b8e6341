"""References for a routing claim, on the router inputs the trained router saw: every number about routing is read
against a router that learned nothing and a router that learned exactly the factor.

Per MoE layer, the same hidden states go through
* ``random``: R routers that learned nothing, Gaussian weight rows rescaled to the trained router's row norms,
  applied with the layer's own selection rule (top-k: the best expert; expert choice: each expert takes its
  capacity of tokens);
* ``random_load_matched``: the same R routers with per-expert biases fitted so that their expert loads match the
  trained router's (a balanced and an unbalanced router are not comparable on NMI);
* ``probe``: the best linear router for the factor, a multinomial logistic regression from router input to the
  factor, cross-fitted over two halves of the documents (each half routed by the probe fitted on the other), its
  classes mapped one-to-one to experts; with more classes than experts, the classes the probe confuses most are
  merged first (greedy, the merge that keeps the most I(factor; probe's group) on that probe's fitting half).
The specialization index = (trained - load-matched mean) / (probe - load-matched mean): 0 = no more than a router
that learned nothing, 1 = as much as the best linear router. Its interval resamples documents and, per draw,
compares with one of the R load-matched routers drawn at random, so it covers both the evaluation data's noise and
how much routers that learned nothing differ from each other: a random router's interval covered 0 in 93% of 200
synthetic simulations (an interval over documents alone in 44%).
All values are NMI of the factor with the top expert (the statistic the analysis reports), except the random
routers' raw conditional MI I(expert; topic | token) set beside the trained router's. Without an index when the
probe is within the load-matched band: the hidden states then hold no more of the factor than random routers
pick up. Seeded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from process_exp_results.analysis.information import cmi_many, nmi_many
from process_exp_results.analysis.phases import Phases
from process_exp_results.analysis.resampling import Cells, bootstrap_weights, percentile_ci, rng_for
from process_exp_results.analysis.routers import (
    LOAD_FIT_TOKENS,
    PROBE_FIT_TOKENS,
    RandomRouters,
    RouterSample,
    SelectionRule,
    document_folds,
    probe_choices,
    random_choices,
)
from process_exp_results.analysis.tables import SeenTables, frequent_token_index


def reference_settings(sample: RouterSample, n_random_routers: int) -> dict:
    return {
        "n_random_routers": int(n_random_routers),
        "max_router_inputs": int(sample.max_tokens),
        "n_router_inputs": int(len(sample.rows)),
        "n_candidate_tokens": int(sample.n_candidates),
        "selection": sample.rule.router_type,
        "load_fit_tokens": LOAD_FIT_TOKENS,  # the load-matching biases' seeded subsample (then checked on all)
        "probe_fit_tokens": PROBE_FIT_TOKENS,  # the cap on each probe half's L-BFGS fit
    }


def seen_references(
    seen: SeenTables,
    router_sample: RouterSample | None,
    n_classes: int,
    min_token_count: int,
    n_random_routers: int,
    n_boot: int,
    seed: int,
    random_routers: list[RandomRouters] | None,
    phases: Phases,
) -> list[dict | None]:
    """Per layer the references on the sampled router inputs of the analysed rows (None without a sample)."""
    if router_sample is None:
        return [None] * len(seen.layers)
    with phases("references", total=len(seen.layers)) as bar:
        return sampled_references(
            router_sample,
            seen.rows,
            seen.doc,
            seen.doc_topic,
            seen.topic,
            seen.token_class,
            seen.seen.token_id,
            len(seen.topics),
            n_classes,
            min_token_count,
            n_random_routers,
            n_boot,
            seed,
            random_routers,
            bar.update,
        )


def sampled_references(
    sample: RouterSample,
    analysed_rows: np.ndarray,
    doc: np.ndarray,
    doc_topic: np.ndarray,
    topic: np.ndarray,
    token_class: np.ndarray,
    token_id: np.ndarray,
    n_topics: int,
    n_classes: int,
    min_token_count: int,
    n_random: int,
    n_boot: int,
    seed: int,
    random_routers: list[RandomRouters] | None = None,
    progress=None,
) -> list[dict]:
    """layer_references for every layer, on the sampled tokens that are among the analysed rows (random_routers:
    the layers' random routers already drawn on them, else drawn here; progress: called once per layer)."""
    position = np.minimum(np.searchsorted(analysed_rows, sample.rows), max(len(analysed_rows) - 1, 0))
    keep = analysed_rows[position] == sample.rows if len(analysed_rows) else np.zeros(len(sample.rows), bool)
    rows = position[keep]
    token_index, frequent_ids, _ = frequent_token_index(token_id, min_token_count)
    F = len(frequent_ids)
    f = token_index[rows]
    factors = [
        Factor("topic", topic[rows], n_topics),
        Factor("token_class", token_class[rows], n_classes),
        Factor("token_id", f, F + 1, probe=False),
    ]
    conditional = (
        {"token": np.where(f < F, f, -1), "n_tokens": F, "topic": topic[rows], "n_topics": n_topics} if F else None
    )
    out = []
    for li, (inputs, weight) in enumerate(zip(sample.inputs, sample.weights)):
        random = random_routers[li] if random_routers is not None else None
        if random is not None and not np.array_equal(random.keep, keep):
            raise ValueError("random_routers were drawn on other tokens than the analysed ones")
        out.append(
            layer_references(
                torch.from_numpy(np.ascontiguousarray(inputs[keep], dtype=np.float32)),
                weight,
                sample.rule,
                sample.batch[keep],
                doc[rows],
                doc_topic,
                factors,
                conditional,
                n_random,
                n_boot,
                seed,
                li,
                random,
            )
        )
        if progress is not None:
            progress()
    return out


@dataclass
class Band:
    """What R routers give: their mean, 2.5/97.5 percentiles, and the trained router's rank (1 = above all)."""

    mean: float
    low: float
    high: float
    rank: int

    @classmethod
    def of(cls, values: np.ndarray, trained: float) -> Band:
        low, high = np.percentile(values, [2.5, 97.5])
        return cls(float(values.mean()), float(low), float(high), 1 + int(np.sum(values > trained)))


@dataclass
class FactorReference:
    trained: float
    random: Band
    random_load_matched: Band
    probe: float | None = None
    index: float | None = None
    index_ci: list[float] | None = None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Factor:
    """One thing the expert may depend on, per sampled token: its level, and whether a probe is fitted for it."""

    name: str
    labels: np.ndarray  # [n] level of each token, 0..n_levels-1
    n_levels: int
    probe: bool = True


def _stacked_cells(choices: torch.Tensor, labels: np.ndarray, n_levels: int, n_experts: int) -> np.ndarray:
    """[M, n] top experts (E = none) -> [M, n] cell of each (router, label, expert) in M stacked [levels, E+1]
    tables."""
    n_routers = choices.shape[0]
    return (np.arange(n_routers)[:, None] * n_levels + labels[None, :]) * (n_experts + 1) + choices.numpy()


def _nmi_of_tables(tables: np.ndarray, n_routers: int, n_levels: int, n_experts: int) -> np.ndarray:
    """Flat counts of M stacked [levels, E+1] tables -> [M] NMI, the "no expert" column left out."""
    return nmi_many(tables.reshape(n_routers, n_levels, n_experts + 1)[:, :, :n_experts])


def _nmi_per_router(choices: torch.Tensor, labels: np.ndarray, n_levels: int, n_experts: int) -> np.ndarray:
    """[M, n] top experts (E = none, left out) -> [M] NMI with the labels."""
    n_routers = choices.shape[0]
    tables = np.bincount(
        _stacked_cells(choices, labels, n_levels, n_experts).ravel(), minlength=n_routers * n_levels * (n_experts + 1)
    )
    return _nmi_of_tables(tables, n_routers, n_levels, n_experts)


def factor_reference(
    factor: Factor,
    trained: torch.Tensor,
    plain: torch.Tensor,
    matched: torch.Tensor,
    probe: np.ndarray | None,
    doc: np.ndarray,
    n_docs: int,
    n_experts: int,
    n_boot: int,
    rng: np.random.Generator,
) -> FactorReference:
    trained_nmi = float(_nmi_per_router(trained[None], factor.labels, factor.n_levels, n_experts)[0])
    matched_nmi = _nmi_per_router(matched, factor.labels, factor.n_levels, n_experts)
    reference = FactorReference(
        trained_nmi,
        Band.of(_nmi_per_router(plain, factor.labels, factor.n_levels, n_experts), trained_nmi),
        Band.of(matched_nmi, trained_nmi),
    )
    if probe is None:
        return reference
    reference.probe = float(_nmi_per_router(torch.as_tensor(probe)[None], factor.labels, factor.n_levels, n_experts)[0])
    if reference.probe <= reference.random_load_matched.high:  # the probe is within what random routers reach:
        return reference  # the hidden states hold no more of the factor than they pick up, and the index has no scale
    reference.index = (trained_nmi - reference.random_load_matched.mean) / (
        reference.probe - reference.random_load_matched.mean
    )
    # one document bootstrap over [trained, R load-matched, probe]; per draw, one load-matched router as the null
    rows = torch.cat([trained[None], matched, torch.as_tensor(probe)[None]])
    n_rows = rows.shape[0]
    cells = Cells(
        np.broadcast_to(doc, rows.shape).ravel(),
        _stacked_cells(rows, factor.labels, factor.n_levels, n_experts).ravel(),
        n_rows * factor.n_levels * (n_experts + 1),
    )
    draws = []
    for _ in range(n_boot):
        values = _nmi_of_tables(cells.table(bootstrap_weights(rng, n_docs)), n_rows, factor.n_levels, n_experts)
        null = values[1:-1]
        draw_span = values[-1] - null.mean()
        draws.append((values[0] - null[rng.integers(len(null))]) / draw_span if draw_span > 1e-9 else np.nan)
    reference.index_ci = percentile_ci(draws)
    return reference


def conditional_reference(
    trained: torch.Tensor,
    plain: torch.Tensor,
    matched: torch.Tensor,
    token: np.ndarray,
    n_tokens: int,
    topic: np.ndarray,
    n_topics: int,
    n_experts: int,
) -> dict:
    """Raw I(expert; topic | token) of the trained router and of the R random routers on the same tokens (frequent
    tokens only: token -1 is left out), so the conditional MI is read against routers that learned nothing too."""
    keep = token >= 0
    width = n_tokens * n_topics * (n_experts + 1)

    def values(choices: torch.Tensor) -> np.ndarray:
        n_rows = choices.shape[0]
        index = (
            np.arange(n_rows)[:, None] * width
            + ((token[keep] * n_topics + topic[keep]) * (n_experts + 1))[None, :]
            + choices[:, keep].numpy()
        )
        tables = np.bincount(index.ravel(), minlength=n_rows * width)
        return cmi_many(tables.reshape(n_rows, n_tokens, n_topics, n_experts + 1)[..., :n_experts])

    trained_cmi = float(values(trained[None])[0])
    return {
        "trained": trained_cmi,
        "random": asdict(Band.of(values(plain), trained_cmi)),
        "random_load_matched": asdict(Band.of(values(matched), trained_cmi)),
    }


def layer_references(
    x: torch.Tensor,
    trained_weight: np.ndarray,
    rule: SelectionRule,
    batch: np.ndarray,
    doc: np.ndarray,
    doc_topic: np.ndarray,
    factors: list[Factor],
    conditional: dict | None,
    n_random: int,
    n_boot: int,
    seed: int,
    layer: int,
    random: RandomRouters | None = None,
) -> dict:
    """Every reference of one MoE layer, as JSON: {factor name: FactorReference, "conditional_topic": ...,
    "load_match_max_error": the largest gap of any load-matched router's expert load from the trained one's}.

    x: [n, d] router inputs of the sampled tokens; doc: [n] their documents (0..D-1); doc_topic: [D] (the probe's
    halves are balanced over it); conditional: {"token", "n_tokens", "topic", "n_topics"} for the conditional MI;
    random: the layer's routers already drawn on these n tokens (draw_random_routers), else drawn here, the same.
    """
    n_experts = trained_weight.shape[0]
    if random is None:
        trained, plain, matched, load_error = random_choices(
            x, trained_weight, rule, batch, n_random, rng_for(seed, 20, layer)
        )
    else:
        trained, plain, matched, load_error = random.trained, random.plain, random.matched, random.load_error
    folds = document_folds(doc_topic, rng_for(seed, 21, layer))
    out = {}
    for number, factor in enumerate(factors):
        probe = (
            probe_choices(x, factor.labels, factor.n_levels, doc, folds, n_experts, rng_for(seed, 23, layer, number))
            if factor.probe and factor.n_levels > 1
            else None
        )
        out[factor.name] = factor_reference(
            factor,
            trained,
            plain,
            matched,
            probe,
            doc,
            len(doc_topic),
            n_experts,
            n_boot,
            rng_for(seed, 22, layer, number),
        ).to_json()
    if conditional is not None:
        out["conditional_topic"] = conditional_reference(trained, plain, matched, n_experts=n_experts, **conditional)
    out["load_match_max_error"] = load_error
    return out
