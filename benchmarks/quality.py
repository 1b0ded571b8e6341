r"""Does the MoE buy quality for the same compute? Dense vs MoE at equal training steps and equal active parameters.

Three models, identical except the feed-forward blocks (width, depth, heads, data, optimizer, steps all shared):
  dense      n_experts 1: one GELU FFN of size D per block
  moe_e8_k1  8 experts of size D, top-1 (Switch): the same FFN compute per token, 8 x the FFN parameters
  moe_e8_k2  8 experts of size D/2, top-2: the same FFN compute per token again, 4 x the FFN parameters
on two corpora: the builtin synthetic corpus, and the Reddit sample (local CSVs; skipped with a note when the
folder is absent), each trained with several seeds (train.random_seed: initialisation, data order, dropout;
the data split is the same for every seed). Every run is the user's pipeline (steps 1-4 as subprocesses,
through process_exp_results/experiments/sweep.py's runner; steps 1-2 run once per corpus); the validation MLM loss and
masked-token accuracy over the whole validation split come from step 3's eval every --eval-steps steps (its
manifest's eval_history); step 4 adds the test split.

"Beyond the seed spread" is strict: every seed of one model ends better than every seed of the other (the
ranges do not overlap). With two seeds that is a weak test, and the table says so by printing the ranges.
Writes to --out: <corpus>/ (a sweep folder per corpus), quality.json, quality.md and quality_val_loss.png.
    python benchmarks/quality.py                       # both corpora, 2 seeds, 1000 steps: ~25 min on 2 cores
    python benchmarks/quality.py --quick               # 150 steps, builtin only: ~3 min
A finished run is not redone (rerun to finish an interrupted experiment; --overwrite redoes all).
"""

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a script: import the project, not this folder

import argparse
import csv
import json
import statistics
import time

from config_utils import PipelineError, run_step, write_json_atomic
from config_utils.cli import HelpFormatter, add_set_option
from config_utils.config import parse_override
from process_exp_results.experiments.sweep import PLACED_KEYS, execute, plan_runs

REPO = Path(__file__).resolve().parents[1]
REDDIT_DIR = REPO.parent / "shared" / "data" / "reddit_sample"
D_FFN = 256  # the dense FFN's size; every model's active FFN size per token

MODELS = {
    "dense": {"model.n_experts": 1, "model.top_k_experts": 1, "model.moe_dim": D_FFN},
    "moe_e8_k1": {"model.n_experts": 8, "model.top_k_experts": 1, "model.moe_dim": D_FFN},
    "moe_e8_k2": {"model.n_experts": 8, "model.top_k_experts": 2, "model.moe_dim": D_FFN // 2},
}
# every topic in train/valid/test (none held out): quality is measured on the distribution trained on
BUILTIN = {
    "dataset.load_params.source": "builtin",
    "dataset.load_params.builtin.n_topics": 4,
    "dataset.load_params.builtin.n_docs": 12000,
    "dataset.load_params.builtin.topic_overlap": 0.0,
    "dataset.load_params.train_len": 9000,
    "dataset.load_params.valid_len": 500,
    "dataset.load_params.test_len": 500,
    "dataset.data_params.eval_topics": [],
    "dataset.data_params.tokenizer_vocab_size": 2000,
}
REDDIT = {
    "dataset.load_params.source": "files",
    "dataset.load_params.text_field": "body",
    "dataset.load_params.topic_field": "subreddit",
    "dataset.load_params.train_len": 2400,
    "dataset.load_params.valid_len": 300,
    "dataset.load_params.test_len": 300,
    "dataset.data_params.eval_topics": [],
    "dataset.data_params.tokenizer_vocab_size": 4000,
}
COMMON = {
    "model.embedding_dim": 128,
    "model.num_head": 4,
    "model.n_encoder_blocks": 2,
    "model.seq_len": 64,
    "model.expert_type": "mlp",
    "model.dropout": 0.1,
    "model.load_balance_coef": 0.01,
    "train.batch_size": 32,
    "train.learning_rate": 1e-3,
    "train.warmup_proportion": 0.1,
    "train.device": "cpu",
    "train.eval_batches": None,
    "train.log_steps": 10,
    "train.keep_checkpoints": 1,
}
# what defines the comparison; every other key (sizes, widths, rates) may be changed with --set, for every run alike
EXPERIMENT_KEYS = set(MODELS["dense"]) | {
    "train.random_seed",
    "train.max_steps",
    "train.eval_steps",
    "train.save_steps",
    "dataset.load_params.source",
    "dataset.load_params.data_files",
}


def corpus_settings(name: str, reddit_dir: Path) -> dict:
    if name == "builtin":
        return BUILTIN
    return {**REDDIT, "dataset.load_params.data_files": [str(reddit_dir / "*.csv")]}


def active_parameters(total: int, model_config: dict) -> int:
    """Parameters a token passes through: all but the (E - k) experts it skips in each MoE layer (GELU experts)."""
    if model_config["n_experts"] == 1:
        return total
    d, h = model_config["embedding_dim"], model_config["moe_dim"]
    n_moe_layers = len(range(0, model_config["n_encoder_blocks"], model_config["moe_every"]))
    return total - n_moe_layers * (model_config["n_experts"] - model_config["top_k_experts"]) * (2 * d * h + h + d)


def load_run(run: dict) -> dict | None:
    """The learning curve and sizes of one finished run, from step 3's manifest and step 4's metrics."""
    manifest_path = Path(run["run_dir"]) / "manifest.json"
    if run["status"] == "failed" or not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    history = manifest.get("eval_history") or []
    if not history:
        return None
    test = None
    metrics_csv = Path(run["results_dir"]) / "metrics.csv"
    if metrics_csv.is_file():
        with open(metrics_csv, encoding="utf-8") as f:
            rows = {row["group"]: row for row in csv.DictReader(f)}
        test = rows.get("test")
    return {
        "history": history,
        "final": history[-1],
        "best": lowest_loss_point(history),
        "n_parameters": manifest["n_parameters"],
        "active_parameters": active_parameters(manifest["n_parameters"], manifest["config"]["model"]),
        "seconds": manifest.get("seconds"),
        "test_mlm_loss": float(test["mlm_loss"]) if test and test.get("mlm_loss") else None,
    }


def lowest_loss_point(history: list[dict]) -> dict:
    """The evaluation with the lowest validation loss: on a small corpus the final one can be past overfitting."""
    return min(history, key=lambda point: point["eval_mlm_loss"])


def summarize(runs: list[dict]) -> dict:
    """Per corpus and model: the seeds' final (and lowest) validation loss, accuracy, mean, range, and the
    comparison with dense."""
    results = {}
    for run in runs:
        loaded = load_run(run)
        if loaded is not None:
            results.setdefault(run["corpus"], {}).setdefault(run["model"], []).append({"seed": run["seed"], **loaded})
    rows = []
    for corpus, by_model in results.items():
        dense = by_model.get("dense")
        dense_losses = [r["final"]["eval_mlm_loss"] for r in dense] if dense else None
        dense_best = [r["best"]["eval_mlm_loss"] for r in dense] if dense else None
        for model, seeds in by_model.items():
            losses = [r["final"]["eval_mlm_loss"] for r in seeds]
            accuracies = [r["final"]["eval_accuracy"] for r in seeds]
            row = {
                "corpus": corpus,
                "model": model,
                "seeds": [r["seed"] for r in seeds],
                "n_experts": MODELS[model]["model.n_experts"],
                "top_k": MODELS[model]["model.top_k_experts"],
                "expert_size": MODELS[model]["model.moe_dim"],
                "n_parameters": seeds[0]["n_parameters"],
                "active_parameters": seeds[0]["active_parameters"],
                "steps": seeds[0]["final"]["step"],
                "val_loss": losses,
                "val_accuracy": accuracies,
                "val_loss_mean": statistics.fmean(losses),
                "val_loss_range": max(losses) - min(losses),
                "val_accuracy_mean": statistics.fmean(accuracies),
                "val_accuracy_range": max(accuracies) - min(accuracies),
                "best_val_loss": [r["best"]["eval_mlm_loss"] for r in seeds],
                "best_step": [r["best"]["step"] for r in seeds],
                "test_loss": [r["test_mlm_loss"] for r in seeds],
                "seconds_mean": statistics.fmean(r["seconds"] or 0.0 for r in seeds),
            }
            if dense_losses and model != "dense":
                row["loss_vs_dense"] = row["val_loss_mean"] - statistics.fmean(dense_losses)
                row["verdict"] = verdict(losses, dense_losses)
                row["best_loss_vs_dense"] = statistics.fmean(row["best_val_loss"]) - statistics.fmean(dense_best)
                row["best_verdict"] = verdict(row["best_val_loss"], dense_best)
            rows.append(row)
    return {
        "rows": rows,
        "curves": {
            corpus: {
                model: [{"seed": r["seed"], "history": r["history"]} for r in seeds]
                for model, seeds in by_model.items()
            }
            for corpus, by_model in results.items()
        },
    }


def verdict(moe_losses: list[float], dense_losses: list[float]) -> str:
    if max(moe_losses) < min(dense_losses):
        return "MoE better, beyond the seed spread"
    if min(moe_losses) > max(dense_losses):
        return "dense better, beyond the seed spread"
    return "within the seed spread"


def markdown(summary: dict) -> str:
    lines = [
        "| corpus | model | experts x k | expert size | params (active) | steps | val MLM loss, mean [seeds] "
        "| val accuracy, mean [seeds] | loss - dense | verdict | lowest val loss, mean [seeds @ step] "
        "| lowest - dense | verdict at the lowest |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        seeds_loss = ", ".join(f"{x:.3f}" for x in row["val_loss"])
        seeds_acc = ", ".join(f"{x:.3f}" for x in row["val_accuracy"])
        seeds_best = ", ".join(f"{x:.3f} @ {step}" for x, step in zip(row["best_val_loss"], row["best_step"]))
        delta = f"{row['loss_vs_dense']:+.3f}" if "loss_vs_dense" in row else "-"
        best_delta = f"{row['best_loss_vs_dense']:+.3f}" if "best_loss_vs_dense" in row else "-"
        lines.append(
            f"| {row['corpus']} | {row['model']} | {row['n_experts']} x {row['top_k']} | {row['expert_size']} "
            f"| {row['n_parameters'] / 1e6:.2f}M ({row['active_parameters'] / 1e6:.2f}M) | {row['steps']} "
            f"| {row['val_loss_mean']:.3f} [{seeds_loss}] | {row['val_accuracy_mean']:.3f} [{seeds_acc}] "
            f"| {delta} | {row.get('verdict', '-')} "
            f"| {statistics.fmean(row['best_val_loss']):.3f} [{seeds_best}] | {best_delta} "
            f"| {row.get('best_verdict', '-')} |"
        )
    return "\n".join(lines)


def figure(summary: dict, path: Path) -> None:
    """Validation loss against steps: per corpus a panel, per model the seeds' mean and their min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = summary["curves"]
    fig, axes = plt.subplots(1, len(curves), figsize=(6.2 * len(curves), 4.2), squeeze=False)
    colors = {"dense": "#444444", "moe_e8_k1": "#1f77b4", "moe_e8_k2": "#d62728"}
    for ax, (corpus, by_model) in zip(axes[0], curves.items()):
        for model, seeds in by_model.items():
            steps = [point["step"] for point in seeds[0]["history"]]
            values = [
                [point["eval_mlm_loss"] for point in seed["history"]]
                for seed in seeds
                if [point["step"] for point in seed["history"]] == steps
            ]
            by_step = list(zip(*values))
            ax.plot(
                steps,
                [statistics.fmean(v) for v in by_step],
                color=colors.get(model),
                lw=2,
                label=f"{model} ({len(values)} seeds)",
            )
            ax.fill_between(
                steps, [min(v) for v in by_step], [max(v) for v in by_step], color=colors.get(model), alpha=0.2, lw=0
            )
        ax.set_title(f"{corpus}: validation MLM loss")
        ax.set_xlabel("training step")
        ax.set_ylabel("MLM loss (masked tokens)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(
        "Dense vs MoE, equal steps and active parameters\n(line: mean over seeds; band: min to max)", fontsize=10
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{time.time_ns()}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/quality.py", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--out", default="process_exp_results/quality", metavar="DIR", help="the experiment's folder")
    parser.add_argument("--corpora", nargs="+", default=["builtin", "reddit"], choices=["builtin", "reddit"])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="train.random_seed values (default 0 1)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 1000; --quick 150)")
    parser.add_argument(
        "--eval-steps", type=int, default=None, help="validation every N steps (default 100; --quick 50)"
    )
    parser.add_argument(
        "--reddit-dir",
        default=str(REDDIT_DIR),
        metavar="DIR",
        help="folder of the Reddit sample CSVs (title, body, subreddit)",
    )
    parser.add_argument("--figure", default=None, metavar="PATH", help="also save the figure here (e.g. images/...)")
    parser.add_argument("--quick", action="store_true", help="150 steps on the builtin corpus only")
    add_set_option(parser, "Applied after the experiment's own settings.")
    parser.add_argument("--overwrite", action="store_true", help="redo finished runs")
    args = parser.parse_args()
    if args.quick:
        args.corpora = ["builtin"] if args.corpora == ["builtin", "reddit"] else args.corpora
    args.steps = args.steps or (150 if args.quick else 1000)
    args.eval_steps = args.eval_steps or (50 if args.quick else 100)
    if args.steps < 1 or args.eval_steps < 1:
        raise PipelineError("--steps and --eval-steps must be at least 1")
    if "dense" not in args.models:
        raise PipelineError("--models must include dense: every MoE is compared with it")
    for text in args.overrides:
        key = parse_override(text)
        if ".".join([key[0], *key[1]]) in PLACED_KEYS | EXPERIMENT_KEYS:
            raise PipelineError(f"--set {text}: the experiment sets this key itself")
    return args


def main() -> None:
    args = parse_args()
    out_dir, reddit_dir = Path(args.out), Path(args.reddit_dir)
    corpora = list(args.corpora)
    if "reddit" in corpora and not sorted(reddit_dir.glob("*.csv")):
        print(f"note: no CSV files in {reddit_dir}: the Reddit corpus is skipped (pass --reddit-dir)")
        corpora.remove("reddit")
    if not corpora:
        raise PipelineError("no corpus to run: the Reddit sample is missing and builtin was not asked for")
    schedule = {"train.max_steps": args.steps, "train.eval_steps": args.eval_steps, "train.save_steps": args.steps}
    all_runs, failed = [], []
    started = time.perf_counter()
    for corpus in corpora:
        sweep_dir = out_dir / corpus
        sets = {**COMMON, **corpus_settings(corpus, reddit_dir), **schedule}
        runner = argparse.Namespace(
            config_dataset="demo/dataset_params.yaml",
            config_model="demo/model_params.yaml",
            config_train="demo/train_params.yaml",
            overwrite=args.overwrite,
            overrides=[
                *(f"{key}={json.dumps(value)}" for key, value in sets.items()),
                f"train.aim_repo={out_dir}",
                *args.overrides,
            ],
            step4_options=["--no-routing-stats"],
        )
        assignments = [{**MODELS[model], "train.random_seed": seed} for model in args.models for seed in args.seeds]
        tags = [f"{model}__seed-{seed}" for model in args.models for seed in args.seeds]
        runs = plan_runs(runner, assignments, sweep_dir, tags)  # one data folder per corpus: no grid key touches it
        for run, (model, seed) in zip(runs, [(m, s) for m in args.models for s in args.seeds]):
            run["corpus"], run["model"], run["seed"] = corpus, model, seed
        print(
            f"quality, {corpus}: {len(runs)} runs ({', '.join(args.models)} x seeds {args.seeds}, {args.steps} steps)"
            f" in {sweep_dir}",
            flush=True,
        )
        failed += execute(runner, runs, sweep_dir, {"experiment": "quality", "corpus": corpus})
        all_runs += runs

    summary = summarize(all_runs)
    summary["settings"] = {
        "models": {m: MODELS[m] for m in args.models},
        "common": COMMON,
        "steps": args.steps,
        "eval_steps": args.eval_steps,
        "seeds": args.seeds,
        "corpora": corpora,
        "sets": list(args.overrides),
        "minutes": round((time.perf_counter() - started) / 60, 1),
    }
    write_json_atomic(out_dir / "quality.json", summary)
    table = markdown(summary)
    (out_dir / "quality.md").write_text(table + "\n", encoding="utf-8")
    figure(summary, out_dir / "quality_val_loss.png")
    if args.figure:
        figure(summary, Path(args.figure))
    print(table)
    print(
        f"wrote {out_dir / 'quality.md'}, {out_dir / 'quality.json'}, {out_dir / 'quality_val_loss.png'}"
        + (f" and {args.figure}" if args.figure else "")
    )
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    run_step(main)
