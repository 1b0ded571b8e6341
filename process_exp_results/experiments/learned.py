"""The learned profile's own views (study.py --profile learned), each from files the runs already wrote:

- emergence: step 4 on the reference arm's first seed at 12.5%, 25% and 50% of its steps (its checkpoints) and at
  the end (its own results): topic and token-class index, accuracy and routing saturation against the step;
- granularity: step 4 on each reference and supervised seed with the corpus's coarse_topics (step 4 --topic-map),
  beside the fine topics' numbers;
- the power check: the supervised arm's topic index, at the granularity its routers were told (topics, or families
  where the corpus has them), against its bar (>= 0.8, interval above 0.5);
- the profile's bar: the reference arm's common-set accuracy >= 0.35 and every MoE layer settled (top-1 agreement
  with the final model >= 0.95 at the two evaluations before the last);
- experts against the dense model with the same active parameters: validation loss per step.
emergence_figure.py draws them.
"""

from __future__ import annotations

from pathlib import Path

from process_exp_results.experiments.result_files import read_json, read_metrics
from process_exp_results.experiments.sweep import recorded_otherwise, run_logged, step_command
from process_exp_results.report.formatting import MISSING, format_number, with_interval

EMERGENCE_FRACTIONS = (0.125, 0.25, 0.5)  # of the steps; 1.0 is the run's own step 4
LEARNED_ACCURACY = 0.35  # the profile's bar: the reference arm's common-set masked accuracy
BAR_AGREEMENT = 0.95  # ... and every MoE layer's top-1 agreement with the final model at the last evaluations
CURVE_ARMS = ("moe_top1", "moe_top2", "dense_equal_active")  # validation loss per step: do experts pay?
SUPERVISED_ARM = "supervised_router"  # the power check: a router told where each topic goes
FROZEN_ARM = "frozen_router"  # routers that never change: how much the hidden states alone move the routing
POWER_INDEX, POWER_LOWER = 0.8, 0.5  # its bar: the index at least 0.8, its interval above 0.5
# its routers are then fitted alone to their target (train.router_refit_batches), on the router inputs of this many
# training batches: trained along with the rest they end far from it (docs/results.md, the power check); 100 batches
# of the learned profile are 390,000 tokens, and 146,000 already fit as well as the index's probe
REFIT_BATCHES = 100


def emergence_steps(max_steps: int, save_steps: int) -> list[int]:
    """The checkpoint steps nearest each fraction (checkpoints are every save_steps)."""
    steps = [max(save_steps, round(max_steps * fraction / save_steps) * save_steps) for fraction in EMERGENCE_FRACTIONS]
    return sorted(set(step for step in steps if step < max_steps))


def supervised_settings(corpus) -> dict:
    """The supervised arm's own settings: its routers refitted after training (on REFIT_BATCHES batches) and, on a
    corpus with families, each family sent to its own expert, a target a linear router can fit (topic t -> expert
    t mod E puts unrelated topics together); step 4 judges it at the granularity it was told."""
    settings = {"train.router_refit_batches": REFIT_BATCHES}
    if corpus.coarse_topics:
        settings |= {"train.router_supervision": "family", "train.router_topic_map": str(corpus.path)}
    return settings


def extra_step4_jobs(run: dict, sweep_dir: Path, reference_arm: str, steps: list[int], coarse_file) -> list:
    """(options, results folder) of every extra step 4 of a finished run: on the reference's seed 0 at its
    checkpoints; on every reference and supervised seed at the corpus's coarse_topics (when it has them)."""
    if run["arm"] not in (reference_arm, SUPERVISED_ARM) or not (Path(run["results_dir"]) / "metrics.csv").is_file():
        return []
    jobs = []
    if run["arm"] == reference_arm and run["seed"] == 0:
        for step in steps:
            folder = sweep_dir / "emergence" / f"{run['tag']}@step-{step}"
            jobs.append((["--checkpoint", str(step), "--save_path", str(folder.parent)], folder))
    if coarse_file is not None:
        folder = sweep_dir / "results_coarse" / f"{run['tag']}@families"
        jobs.append((["--topic-map", str(coarse_file), "--save_path", str(folder.parent)], folder))
    return jobs


def run_extra_step4(runner, run: dict, sweep_dir: Path, reference_arm: str, steps: list[int], coarse_file) -> None:
    """Step 4 on the run's checkpoints and at coarse topics, right after its training (the sweep's after_run); a
    folder finished earlier with the run's settings is kept (resumable); a failure is printed, recorded in the run's extra_failed (sweep.json:
    the study counts it unfinished) and the rest go on."""
    run["extra_failed"] = []
    for options, folder in extra_step4_jobs(run, sweep_dir, reference_arm, steps, coarse_file):
        stale = recorded_otherwise(folder / "manifest.json", run)
        if (folder / "metrics.csv").is_file() and not runner.overwrite and not stale:
            continue
        print(f"  step 4 on {folder.parent.name}/{folder.name} ...", flush=True)
        # the sweep's own step 4 command; the later --save_path wins (argparse keeps the last)
        log = sweep_dir / "logs" / f"{folder.parent.name}-{folder.name}.step4.log"
        ok, error = run_logged([*step_command(4, runner, run, sweep_dir), *options], log)
        if not ok:
            print(f"  FAILED: {error} (log: {log})", flush=True)
            run["extra_failed"].append(f"{folder.parent.name}/{folder.name}")


# ---- reading them --------------------------------------------------------------------------------------------------


def _layer_indices(stats: dict | None) -> dict:
    rows = {}
    for layer in (stats or {}).get("layers", []):
        references = layer.get("references") or {}
        rows[layer["layer"]] = {
            "topic_nmi": layer.get("nmi"),
            **{
                f"{factor}_{key}": (references.get(factor) or {}).get(key)
                for factor in ("topic", "token_class")
                for key in ("index", "index_ci")
            },
        }
    return rows


def _manifest(run: dict) -> dict:
    return read_json(Path(run["run_dir"]) / "manifest.json") or {}


def emergence_summary(runs: list[dict], sweep_dir: Path, reference_arm: str, steps: list[int]) -> dict | None:
    """The reference's seed 0 along training: per evaluated step the indices and test accuracy; the
    validation accuracy and the saturation curves at every evaluation."""
    run = next((r for r in runs if r["arm"] == reference_arm and r["seed"] == 0), None)
    if run is None or not (Path(run["results_dir"]) / "metrics.csv").is_file():
        return None
    final_stats = read_json(Path(run["results_dir"]) / "routing_stats.json") or {}
    manifest = _manifest(run)
    total = manifest.get("total_steps")
    points = []
    for step, folder in [
        *((s, sweep_dir / "emergence" / f"{run['tag']}@step-{s}") for s in steps),
        (total, Path(run["results_dir"])),
    ]:
        test = read_metrics(folder).get("test")
        points.append(
            {
                "step": step,
                "fraction": step / total if total else None,
                "test_accuracy": float(test["accuracy"]) if test else None,
                "layers": _layer_indices(read_json(folder / "routing_stats.json")),
            }
        )
    history = manifest.get("eval_history") or []
    return {
        "run": run["tag"],
        "total_steps": total,
        "points": points,
        "validation": [{"step": row["step"], "accuracy": row["eval_accuracy"]} for row in history],
        "saturation": {
            layer: {"steps": values["steps"], "top1": values["top1"]}
            for layer, values in (final_stats.get("saturation") or {}).items()
        },
    }


def granularity_summary(runs: list[dict], sweep_dir: Path, reference_arm: str) -> list[dict]:
    """Per reference and supervised seed and MoE layer: the topic NMI and index at the corpus's topics and at its
    families."""
    rows = []
    for run in runs:
        coarse_folder = sweep_dir / "results_coarse" / f"{run['tag']}@families"
        if run["arm"] not in (reference_arm, SUPERVISED_ARM) or not (coarse_folder / "metrics.csv").is_file():
            continue
        fine_stats = read_json(Path(run["results_dir"]) / "routing_stats.json") or {}
        coarse_stats = read_json(coarse_folder / "routing_stats.json") or {}
        fine, coarse = _layer_indices(fine_stats), _layer_indices(coarse_stats)
        for layer in fine:
            rows.append(
                {
                    "run": run["tag"],
                    "layer": layer,
                    "fine": fine[layer],
                    "coarse": coarse.get(layer, {}),
                    "families": len(coarse_stats.get("topics") or []),
                    "topics": len(fine_stats.get("topics") or []),
                }
            )
    return rows


def _agreement_before_last(run: dict) -> dict:
    """Per MoE layer, the lower top-1 agreement with the final routing at the two evaluations before the last."""
    stats = read_json(Path(run["results_dir"]) / "routing_stats.json") or {}
    return {
        layer: min(values["top1"][-3:-1]) if len(values["top1"]) >= 3 else None
        for layer, values in (stats.get("saturation") or {}).items()
    }


def _finished(design: dict, runs: list[dict], arm: str) -> list[tuple[dict, dict]]:
    """(design row, run) of the arm's finished seeds."""
    rows = [row for row in design["runs"] if row["arm"] == arm and row["status"] in ("ok", "done earlier")]
    return [(row, next(run for run in runs if run["tag"] == row["tag"])) for row in rows]


def profile_bar(design: dict, runs: list[dict], reference_arm: str) -> dict:
    """Whether the reference arm met the learned profile's bar, seed by seed; beside it, the same agreement for
    routers that never change (FROZEN_ARM), which only the hidden states under them move."""
    seeds = []
    for row, run in _finished(design, runs, reference_arm):
        agreement = _agreement_before_last(run)
        accuracy = row["common_accuracy"]
        settled = bool(agreement) and all(value is not None and value >= BAR_AGREEMENT for value in agreement.values())
        seeds.append(
            {
                "tag": row["tag"],
                "common_accuracy": accuracy,
                "agreement_two_before_last": agreement,
                "met": accuracy is not None and accuracy >= LEARNED_ACCURACY and settled,
            }
        )
    frozen = [
        {"tag": row["tag"], "agreement_two_before_last": _agreement_before_last(run)}
        for row, run in _finished(design, runs, FROZEN_ARM)
    ]
    return {"accuracy_bar": LEARNED_ACCURACY, "agreement_bar": BAR_AGREEMENT, "seeds": seeds, "frozen": frozen}


def power_check(runs: list[dict], sweep_dir: Path) -> list[dict]:
    """Per finished supervised seed and MoE layer: the topic index at the granularity its routers were told (the
    families' results for train.router_supervision=family), and whether it clears the power bar."""
    rows = []
    for run in runs:
        supervision = _manifest(run).get("router_supervision") if run["arm"] == SUPERVISED_ARM else None
        if not supervision:
            continue
        told = supervision["factor"]
        folder = (
            sweep_dir / "results_coarse" / f"{run['tag']}@families" if told == "family" else Path(run["results_dir"])
        )
        for layer, values in _layer_indices(read_json(folder / "routing_stats.json")).items():
            index, interval = values["topic_index"], values["topic_index_ci"]
            passed = index is not None and index >= POWER_INDEX and bool(interval) and interval[0] > POWER_LOWER
            rows.append(
                {
                    "run": run["tag"],
                    "told": told,
                    "refit_batches": (supervision.get("refit") or {}).get("batches"),
                    "refit_loss": [(supervision.get("refit") or {}).get(key) for key in ("loss_first", "loss_last")],
                    "layer": layer,
                    "topic_nmi": values["topic_nmi"],
                    "topic_index": index,
                    "topic_index_ci": interval,
                    "passed": passed,
                }
            )
    return rows


def loss_curves(runs: list[dict]) -> dict:
    """arm -> [(seed, [steps], [validation MLM loss])] for the arms whose curves answer "do experts pay?"."""
    curves = {}
    for run in runs:
        if run["arm"] not in CURVE_ARMS:
            continue
        history = _manifest(run).get("eval_history") or []
        if history:
            steps = [row["step"] for row in history]
            curves.setdefault(run["arm"], []).append((run["seed"], steps, [row["eval_mlm_loss"] for row in history]))
    return curves


# ---- writing them --------------------------------------------------------------------------------------------------


def _index(values: dict, factor: str) -> str:
    index = values.get(f"{factor}_index")
    return MISSING if index is None else with_interval(index, values.get(f"{factor}_index_ci"), 2)


def emergence_markdown(summary: dict | None) -> str:
    if not summary or not summary["points"]:
        return "No emergence points yet (the reference arm's first seed has not finished)."
    layers = list(summary["points"][-1]["layers"])
    saturation = summary["saturation"]
    header = ["step", "of training", "test accuracy"]
    header += [
        f"{layer}: {what}" for layer in layers for what in ("topic index", "token-class index", "agreement with final")
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for point in summary["points"]:
        cells = [str(point["step"]), f"{point['fraction']:.1%}" if point["fraction"] else MISSING]
        cells.append(format_number(point["test_accuracy"], 3) if point["test_accuracy"] is not None else MISSING)
        for layer in layers:
            values = point["layers"].get(layer, {})
            curve = saturation.get(layer) or {"steps": [], "top1": []}
            agreement = dict(zip(curve["steps"], curve["top1"])).get(point["step"])
            cells += [
                _index(values, "topic"),
                _index(values, "token_class"),
                format_number(agreement, 3) if agreement is not None else MISSING,
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def granularity_markdown(rows: list[dict]) -> str:
    if not rows:
        return "No coarse-topic results (the corpus file has no coarse_topics, or no reference seed finished)."
    header = [
        "run",
        "layer",
        "topic NMI (fine)",
        "topic index (fine)",
        "topic NMI (families)",
        "topic index (families)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        fine, coarse = row["fine"], row["coarse"]
        lines.append(
            f"| {row['run']} | {row['layer']} | {format_number(fine.get('topic_nmi'), 3)} | {_index(fine, 'topic')} | "
            f"{format_number(coarse.get('topic_nmi'), 3)} | {_index(coarse, 'topic')} |"
        )
    return (
        "\n".join(lines)
        + f"\n\nFine: the corpus's {rows[0]['topics']} topics; families: its {rows[0]['families']} coarse_topics."
    )


def _batches(count) -> str:
    return MISSING if count is None else f"on {count} batches"


def power_markdown(rows: list[dict]) -> str:
    if not rows:
        return "No supervised run has finished yet."
    header = "| run | told | routers refitted | their loss | layer | topic NMI | topic index | bar met |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        first, last = row["refit_loss"]
        loss = MISSING if first is None else f"{format_number(first, 3)} -> {format_number(last, 3)}"
        lines.append(
            f"| {row['run']} | {row['told']} | {_batches(row['refit_batches'])} | {loss} | {row['layer']} | "
            f"{format_number(row['topic_nmi'], 3)} | {_index(row, 'topic')} | {'yes' if row['passed'] else 'no'} |"
        )
    return "\n".join(lines) + (
        f"\n\nThe supervised arm's routers are trained to send each topic (or each family: told = family) to its own "
        f"expert, then fitted alone to that target on the final representation (their loss: summed over layers, "
        f"before -> after); the index is read at that granularity. Bar: index >= {POWER_INDEX} with its interval above "
        f"{POWER_LOWER}. Below it, the index cannot be trusted to see specialization that is there."
    )


def bar_markdown(bar: dict) -> str:
    if not bar["seeds"]:
        return "The reference arm has no finished seed yet."
    lines = []
    for seed in bar["seeds"]:
        agreement = ", ".join(
            f"{layer} {format_number(value, 3)}" for layer, value in seed["agreement_two_before_last"].items()
        )
        verdict = "met" if seed["met"] else "not met"
        lines.append(
            f"* {seed['tag']}: common-set accuracy {format_number(seed['common_accuracy'], 3)} (bar "
            f"{bar['accuracy_bar']}); lowest top-1 agreement with the final model at the two evaluations before the "
            f"last: {agreement or MISSING} (bar {bar['agreement_bar']}): {verdict}"
        )
    for seed in bar.get("frozen", []):
        agreement = ", ".join(
            f"{layer} {format_number(value, 3)}" for layer, value in seed["agreement_two_before_last"].items()
        )
        lines.append(
            f"* beside it, {seed['tag']} (routers that never change: only the hidden states under them move their "
            f"routing): {agreement or MISSING}"
        )
    return "\n".join(lines)


def learned_views(runs: list[dict], design: dict, sweep_dir: Path, reference_arm: str, steps: list[int]) -> dict:
    """Everything above for one sweep, as study.json keeps it."""
    return {
        "bar": profile_bar(design, runs, reference_arm),
        "emergence": emergence_summary(runs, sweep_dir, reference_arm, steps),
        "granularity": granularity_summary(runs, sweep_dir, reference_arm),
        "power": power_check(runs, sweep_dir),
        "loss_curves": loss_curves(runs),
    }


def learned_markdown(views: dict) -> str:
    return "\n\n".join(
        [
            "#### The profile's bar\n\n" + bar_markdown(views["bar"]),
            "#### The power check: routers told where each topic goes\n\n" + power_markdown(views.get("power") or []),
            "#### Emergence: the reference arm along its training\n\n" + emergence_markdown(views["emergence"]),
            "#### Two granularities: the corpus's topics and their families\n\n"
            + granularity_markdown(views["granularity"]),
        ]
    )
