r"""The check against known structure: does the routing analysis find topic specialization where a router has it,
and only there?

Trains small MoE models on the builtin corpus (synthetic: at topic_overlap 0 each topic has its own content words, at
1 every topic is drawn from one distribution, so topic labels carry no information) through the same four steps as
any run (subprocesses, through sweep.py's runner), in four arms, each with several seeds, and judges each MoE layer
by its topic specialization index (step 4's references: 0 = no more topic-specific than random routers on the same
hidden states, 1 = as much as the best linear router for the topic):
  overlap_0   topic_overlap 0                             reported (no expectation: whether an MLM router learns
                                                          topics is the question, not a premise)
  overlap_1   topic_overlap 1                             index interval contains 0 in every layer
  frozen      topic_overlap 0, train.freeze_router        index interval contains 0 in every layer: a router left at
                                                          its random init is a random router
  supervised  topic_overlap 0, train.router_supervision   index lower bound > 0.5 in every layer: a positive control,
              topic                                       each router trained to send topic t to expert t mod E
A layer is called specialized when its index interval is clear of 0 and its topic permutation test has
p <= 0.01 / L, with L the run's number of MoE layers (Bonferroni), so --n-perm must reach 1/(n_perm + 1) <= 0.01 / L.
The table counts, per arm, the layer-seed pairs whose index interval clears 0.
The seed is train.random_seed (initialisation, data order): each overlap's data is made once and shared.
One topic (gaming) is held out by step 1 with only a few documents; the topics of the test split carry the test.
Writes to --out: the sweep folder's runs/, results/ (step 4 outputs, routing_stats.json), sweep.json, and
known_structure.md / known_structure.json. About 10 minutes on 2 CPU cores:
    python process_exp_results/experiments/known_structure.py --out process_exp_results/known_structure
Extra --set options apply to every run (e.g. --set train.max_steps=400); --arms and --seeds pick a subset.
"""

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[2])  # run as a script: import the project, not this folder

import argparse
import json

from config_utils import PipelineError, run_step, write_json_atomic, write_text_atomic
from config_utils.cli import HelpFormatter, add_set_option
from config_utils.config import parse_override
from process_exp_results.analysis.verdicts import ALPHA, is_specialized, permutations_needed  # step 4's rule, here too
from process_exp_results.experiments.result_files import read_metrics
from process_exp_results.experiments.sweep import PLACED_KEYS, execute, plan_runs
from process_exp_results.report.formatting import MISSING, format_number, format_p, with_interval
from process_exp_results.report.sentences import band_text

ARMS = {
    "overlap_0": {
        "dataset.load_params.builtin.topic_overlap": 0.0,
        "train.freeze_router": False,
        "train.router_supervision": None,
    },
    "overlap_1": {
        "dataset.load_params.builtin.topic_overlap": 1.0,
        "train.freeze_router": False,
        "train.router_supervision": None,
    },
    "frozen": {
        "dataset.load_params.builtin.topic_overlap": 0.0,
        "train.freeze_router": True,
        "train.router_supervision": None,
    },
    "supervised": {
        "dataset.load_params.builtin.topic_overlap": 0.0,
        "train.freeze_router": False,
        "train.router_supervision": "topic",
    },
}
SPECIALIZED_TEXT = {True: "yes", False: "no", None: "undecided"}
RANDOM_CLEARS = 0.04  # measured: a random router's index interval cleared 0 in 8 of 200 synthetic simulations
SUPERVISED_LOWER_BOUND = 0.5  # the positive control's index interval must sit above this in every layer
# tiny but meaningful: 4 topics (one held out, small), 2 MoE blocks of 4 experts, a few hundred steps
SIZES = {
    "dataset.load_params.builtin.n_topics": 4,
    "dataset.load_params.builtin.n_docs": 3000,
    "dataset.load_params.train_len": 2000,
    "dataset.load_params.valid_len": 100,
    "dataset.load_params.test_len": 300,
    "dataset.load_params.topic_len": 20,
    "dataset.data_params.eval_topics": ["gaming"],
    "dataset.data_params.tokenizer_vocab_size": 800,
    "dataset.data_params.num_proc": 1,
    "model.seq_len": 48,
    "model.embedding_dim": 64,
    "model.num_head": 2,
    "model.n_encoder_blocks": 2,
    "model.n_experts": 4,
    "model.top_k_experts": 1,
    "model.moe_dim": 128,
    "model.dropout": 0.0,
    "train.max_steps": 200,
    "train.batch_size": 32,
    "train.learning_rate": 3e-3,
    "train.eval_steps": 200,
    "train.eval_batches": 2,
    "train.save_steps": 200,
    "train.keep_checkpoints": 1,
    "train.device": "cpu",
}


def layer_threshold(n_layers: int) -> float:
    """The p-value a layer must reach: ALPHA split over the run's MoE layers (Bonferroni), so that a run with no
    topic signal shows "specialization" in some layer with probability at most ALPHA."""
    return ALPHA / max(n_layers, 1)


def specialized(layer: dict, n_layers: int) -> bool:
    """Topic specialization in a layer: the topic index interval is clear of 0 and p <= ALPHA / n_layers."""
    return is_specialized(
        (layer.get("references") or {}).get("topic"), layer.get("p_value"), alpha=layer_threshold(n_layers)
    )


def expectation(arm: str, layers: list[dict]) -> str:
    """The arm's verdict from all its layer-seed pairs (each with index_ci)."""
    clear = sum(1 for layer in layers if layer["index_ci"] and layer["index_ci"][0] > 0)
    pairs = f"{clear} of {len(layers)} layer-seed pairs clear 0"
    if arm in ("overlap_1", "frozen"):  # the bar: every interval contains 0
        chance = f"{pairs}; a random router's interval clears 0 in about {RANDOM_CLEARS:.0%} of cases"
        return f"as expected ({chance})" if clear == 0 else f"NOT as expected ({chance})"
    if arm == "supervised":
        low = [layer["index_ci"][0] if layer["index_ci"] else float("-inf") for layer in layers]
        met = sum(value > SUPERVISED_LOWER_BOUND for value in low)
        return (
            f"{'as expected' if met == len(layers) else 'NOT as expected'} ({met} of {len(layers)} layer-seed "
            f"pairs with an index lower bound above {SUPERVISED_LOWER_BOUND}; lowest {format_number(min(low), 2)})"
        )
    return f"reported ({pairs})"


def _test_accuracy(folder: Path) -> tuple[float | None, float | None]:
    """The test split's accuracy and majority baseline from metrics.csv (None, None without a test row)."""
    test = read_metrics(folder).get("test", {})
    return (float(test["accuracy"]) if test else None, float(test["majority_accuracy"]) if test else None)


def _layer_row(layer: dict, n_layers: int) -> dict:
    """One layer of routing_stats.json, as the table shows it."""
    conditional = layer.get("conditional_topic") or {}
    reference = (layer.get("references") or {}).get("topic") or {}
    return {
        "layer": layer["layer"],
        "topic_nmi": layer["nmi"],
        "topic_nmi_ci": layer["nmi_ci"],
        "topic_p": layer["p_value"],
        "random_load_matched": reference.get("random_load_matched"),
        "probe": reference.get("probe"),
        "index": reference.get("index"),
        "index_ci": reference.get("index_ci"),
        "cmi_excess": conditional.get("cmi_excess"),
        "cmi_excess_ci": conditional.get("cmi_excess_ci"),
        "cmi_p": conditional.get("p_value"),
        "explained_by": conditional.get("explained_by"),
        "specialized": specialized(layer, n_layers),
    }


def _add_routing_stats(row: dict, stats: dict, n_perm: int) -> None:
    """The run's layers, its p threshold and whether it is specialized; with too few permutations to reach the
    threshold no layer is called specialized either way, and the row says so in its note."""
    row["topics"] = stats.get("topics")
    n_layers = len(stats["layers"])
    row["p_threshold"] = layer_threshold(n_layers)
    row["layers"].extend(_layer_row(layer, n_layers) for layer in stats["layers"])
    if n_perm < permutations_needed(row["p_threshold"]):  # no layer can pass the permutation condition
        for layer in row["layers"]:
            layer["specialized"] = None
        row["note"] = (
            f"--n-perm {n_perm} cannot give p <= {row['p_threshold']:g}, so no layer is called "
            f"specialized (use --n-perm {permutations_needed(row['p_threshold'])} or more)"
        )
    row["specialized"] = any(layer["specialized"] for layer in row["layers"]) if not row.get("note") else None


def _run_row(run: dict, results_root: Path, n_perm: int) -> dict:
    """One run's row: its identity and status, then what its metrics.csv and routing_stats.json hold."""
    folder = results_root / run["tag"]
    row = {
        "arm": run["arm"],
        "seed": run["seed"],
        "tag": run["tag"],
        "status": run["status"],
        "layers": [],
        "test_accuracy": None,
        "test_baseline": None,
        "specialized": None,
    }
    if (folder / "metrics.csv").is_file():
        row["test_accuracy"], row["test_baseline"] = _test_accuracy(folder)
    if (folder / "routing_stats.json").is_file():
        _add_routing_stats(row, json.loads((folder / "routing_stats.json").read_text(encoding="utf-8")), n_perm)
    return row


def _arm_verdict(arm: str, arm_rows: list[dict]) -> str:
    """The arm's verdict, or "incomplete" where a run has no layers or a layer no references to judge."""
    notes = sorted({row["note"] for row in arm_rows if row.get("note")})
    # every layer needs its references: without them there is no index to judge
    complete = all(row["layers"] and all(layer["random_load_matched"] for layer in row["layers"]) for row in arm_rows)
    if not complete:
        return "incomplete (runs failed, or step 4 computed no references: --max-router-inputs 0)"
    return expectation(arm, [layer for row in arm_rows for layer in row["layers"]]) + (f"; {notes[0]}" if notes else "")


def summarize(runs: list[dict], results_root: Path, n_perm: int) -> dict:
    """Per run: the numbers of routing_stats.json and metrics.csv; per arm: whether the expectation held
    (undecided where n_perm permutations cannot give a p-value as small as the threshold)."""
    rows = [_run_row(run, results_root, n_perm) for run in runs]
    verdicts = {
        arm: _arm_verdict(arm, [row for row in rows if row["arm"] == arm])
        for arm in dict.fromkeys(row["arm"] for row in rows)
    }
    return {
        "criterion": f"a layer is topic-specialized when its topic specialization index interval (documents and "
        f"random routers resampled) is clear of 0 and its permutation p <= {ALPHA} / (the run's "
        f"number of MoE layers)",
        "runs": rows,
        "verdicts": verdicts,
    }


def markdown(summary: dict) -> str:
    n_perm = (summary.get("settings") or {}).get("n_perm")
    lines = [
        "| arm | seed | layer | topic NMI [95% CI] | random routers, loads matched | best linear | index [95% CI] "
        "| p | CMI excess [95% CI] | specialized | test acc (baseline) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["runs"]:
        accuracy = f"{format_number(row['test_accuracy'])} ({format_number(row['test_baseline'])})"
        if not row["layers"]:
            lines.append(
                f"| {row['arm']} | {row['seed']} | {MISSING} | {row['status']}: no routing_stats.json "
                f"| | | | | | | {accuracy} |"
            )
        for layer in row["layers"]:
            lines.append(
                f"| {row['arm']} | {row['seed']} | {layer['layer']} "
                f"| {with_interval(layer['topic_nmi'], layer['topic_nmi_ci'])} "
                f"| {band_text(layer['random_load_matched'])} | {format_number(layer['probe'])} "
                f"| {with_interval(layer['index'], layer['index_ci'], 2)} "
                f"| {format_p(layer['topic_p'], n_perm)} "
                f"| {with_interval(layer['cmi_excess'], layer['cmi_excess_ci'], 4)} "
                f"| {SPECIALIZED_TEXT[layer['specialized']]} | {accuracy} |"
            )
    lines.append("")
    lines += [f"- {arm}: {verdict}" for arm, verdict in summary["verdicts"].items()]
    lines.append(f"\nCriterion: {summary['criterion']}.")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--out",
        default="process_exp_results/known_structure",
        metavar="DIR",
        help="the experiment's folder (a sweep folder, plus the table)",
    )
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per arm (train.random_seed 0..N-1)")
    parser.add_argument("--n-boot", type=int, default=200, help="step 4: bootstrap resamples per interval")
    parser.add_argument("--n-perm", type=int, default=200, help="step 4: permutations per p-value")
    add_set_option(parser, "Applied after the experiment's own sizes.")
    parser.add_argument("--overwrite", action="store_true", help="redo finished runs")
    return parser.parse_args()


def chosen_arms(args: argparse.Namespace) -> list[str]:
    """The --arms list, once --arms, --seeds and the --set keys are checked (the experiment sets some itself)."""
    arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown or not arms:
        raise PipelineError(f"--arms: unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    if args.seeds < 1:
        raise PipelineError("--seeds must be at least 1")
    for text in args.overrides:
        key = parse_override(text)
        if ".".join([key[0], *key[1]]) in PLACED_KEYS | set(next(iter(ARMS.values()))) | {"train.random_seed"}:
            raise PipelineError(f"--set {text}: the experiment sets this key itself")
    return arms


def sweep_runner(args: argparse.Namespace, out_dir: Path) -> argparse.Namespace:
    """What sweep.py's plan_runs and execute need: the demo configs, the experiment's sizes, then the --set texts."""
    sizes = [f"{key}={json.dumps(value)}" for key, value in SIZES.items()]
    return argparse.Namespace(
        config_dataset="demo/dataset_params.yaml",
        config_model="demo/model_params.yaml",
        config_train="demo/train_params.yaml",
        overrides=[*sizes, f"train.aim_repo={out_dir}", *args.overrides],
        overwrite=args.overwrite,
        step4_options=["--n-boot", str(args.n_boot), "--n-perm", str(args.n_perm)],
    )


def plan_arm_runs(runner: argparse.Namespace, arms: list[str], seeds: int, out_dir: Path) -> list[dict]:
    """One run per arm and seed, tagged <arm>__seed-<seed>, each labelled with its arm and seed."""
    assignments, tags, labels = [], [], []
    for arm in arms:
        for seed in range(seeds):
            assignments.append({**ARMS[arm], "train.random_seed": seed})
            tags.append(f"{arm}__seed-{seed}")
            labels.append((arm, seed))
    runs = plan_runs(runner, assignments, out_dir, tags)
    for run, (arm, seed) in zip(runs, labels):  # data folders: one per overlap (seed, freezing: step 3 only)
        run["arm"], run["seed"] = arm, seed
    return runs


def write_summary(summary: dict, out_dir: Path) -> None:
    """known_structure.json and known_structure.md; the table is printed too."""
    write_json_atomic(out_dir / "known_structure.json", summary)
    table = markdown(summary)
    write_text_atomic(out_dir / "known_structure.md", table + "\n")
    print(table)
    print(f"table: {out_dir / 'known_structure.md'} and {out_dir / 'known_structure.json'}")


def main() -> None:
    args = parse_args()
    arms = chosen_arms(args)
    out_dir = Path(args.out)
    runner = sweep_runner(args, out_dir)
    runs = plan_arm_runs(runner, arms, args.seeds, out_dir)
    print(f"known structure: {len(runs)} runs ({', '.join(arms)} x {args.seeds} seeds) in {out_dir}")
    execute(runner, runs, out_dir, {"experiment": "known_structure", "arms": {arm: ARMS[arm] for arm in arms}})
    summary = summarize(runs, out_dir / "results", args.n_perm)
    summary["settings"] = {
        "sizes": SIZES,
        "sets": list(args.overrides),
        "n_boot": args.n_boot,
        "n_perm": args.n_perm,
        "seeds": args.seeds,
    }
    write_summary(summary, out_dir)
    if any(row["status"] == "failed" for row in summary["runs"]):
        sys.exit(1)


if __name__ == "__main__":
    run_step(main)
