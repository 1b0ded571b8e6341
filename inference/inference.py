r"""Step 4: evaluate a trained run per topic and show which experts the router picks.

Reads the run (train.save_path/<tag>/model, default: the last finished run) and step 2's test split
and evaluation topics. Writes to <save_path>/<tag>/: metrics.csv (MLM loss, accuracy, perplexity,
most-frequent-token baseline per split/topic), expert_counts.csv (real tokens per layer and expert),
figures/*.png (all layers pooled; one figure per topic with a bar per layer) and manifest.json.
Then the routing analysis over the test split (topics seen in training; each document labelled with its own
topic), with the held-out topics analysed apart: routing_stats.json/.csv (NMI of expert vs topic, token class and
token id with bootstrap intervals and permutation p-values, each against random routers and the best linear
router on the same hidden states, with the specialization index; I(expert; topic | token) as its excess over the
permutation null), a topic x expert heatmap per layer, figures/nmi_per_layer.png, figures/specialization_index.png,
tokens_<layer>.html (sample documents coloured by expert) and report.md. --no-routing-stats skips it.
With no options it uses the default configs. Example:
    python inference/inference.py --config-dataset demo/dataset_params.yaml --config-model demo/model_params.yaml \
        --config-train demo/train_params.yaml --save_path process_exp_results/results
"""

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a script: import the project, not this folder

import argparse
import time

import datasets
import torch

from config_utils import PipelineError, atomic_dir, load_step_configs, run_step, step_parser
from config_utils.contracts import WEIGHTS_FILE
from config_utils.host_memory import keep_freed_memory
from config_utils.io import check_output_folder, file_sha256, lock_step_output, safe_file_stems, write_sealed_manifest
from inference.aim_results import record_in_aim
from inference.outputs import METRIC_COLUMNS, print_summary, write_analysis_files, write_csv, write_figures
from inference.run import load_run, resolve_precision, run_summary, with_coarse_topics
from inference.scale import LONG_ANALYSIS_SECONDS, check_analysis_scale
from inference.stages import analyze_run_routing, evaluate_groups, run_ablation
from process_exp_results.analysis.phases import Phases
from process_exp_results.report.markdown import write_report_md

ABLATION_MAX_EXPERTS = 16  # E x L evaluations: beyond this the default is off


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """Which run to evaluate, where its results go, and the evaluation batch size."""
    parser.add_argument("--save_path", default="process_exp_results/results", help="results go to SAVE_PATH/<run tag>/")
    parser.add_argument(
        "--run",
        default=None,
        help="run tag under train.save_path, or a run folder; if not given, the last finished run",
    )
    parser.add_argument(
        "--checkpoint",
        type=int,
        default=None,
        metavar="STEP",
        help="evaluate the run's checkpoint at this training step (checkpoints/step-NNNNNN) instead of its final "
        "model; results go to SAVE_PATH/<run tag>@step-STEP/ (routing along training: the study's emergence curve)",
    )
    parser.add_argument("--batch_size", type=int, default=64, help="sequences per evaluation batch")
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="the forward passes (evaluation, routing collection, ablation): bf16 = bfloat16 autocast, fp32 = "
        "float32, auto = the training rule (train/precision.py: bf16 on a CUDA GPU with bf16, or on an AVX512-BF16/AMX "
        "CPU for embedding_dim >= 256); the routers and "
        "every statistic compute in float32 either way",
    )


def _add_analysis_options(parser: argparse.ArgumentParser) -> None:
    """The routing analysis (intervals, p-values, references, held-out topics) and the expert ablation."""
    parser.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples of documents per interval")
    parser.add_argument("--n-perm", type=int, default=200, help="permutations per p-value")
    parser.add_argument(
        "--max-docs-per-group", type=int, default=2000, help="documents per split/topic in the routing analysis"
    )
    parser.add_argument(
        "--n-random-routers",
        type=int,
        default=50,
        help="random routers per layer for the references (a router that learned nothing)",
    )
    parser.add_argument(
        "--max-router-inputs",
        type=int,
        default=200_000,
        help="router inputs kept per layer for the references (a seeded sample of tokens; 0 = no references)",
    )
    parser.add_argument(
        "--pool-held-out",
        action="store_true",
        help="analyse the held-out topics together with the test split's (the earlier study's "
        "design; they are unfamiliar text, so topic and novelty mix)",
    )
    parser.add_argument(
        "--topic-map",
        type=Path,
        default=None,
        metavar="FILE",
        help="analyse coarser topics: each document's topic becomes its family under the YAML file's coarse_topics "
        "(patterns such as comp.*; configs/corpora/20newsgroups.yaml has one); results go to "
        "SAVE_PATH/<run tag>@families/",
    )
    parser.add_argument("--no-routing-stats", action="store_true", help="skip the routing analysis")
    parser.add_argument(
        "--aim",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="record the metrics, the indices and the figures in the run's Aim run (train.aim_repo), beside its "
        "training curves",
    )
    parser.add_argument(
        "--accept-long",
        action="store_true",
        help=f"run even when the resampling (--n-perm, --n-boot) is estimated to take more than "
        f"{LONG_ANALYSIS_SECONDS // 60} minutes or half the free memory (otherwise: asked on a terminal, refused "
        f"elsewhere)",
    )
    parser.add_argument(
        "--ablation",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="disable each expert of each MoE layer in turn and measure the MLM loss per group, with "
        "intervals and topic / token-class tests (ablation.json, figures/ablation_<layer>.png); "
        f"default: on for models with at most {ABLATION_MAX_EXPERTS} experts per layer",
    )


def _check_args(args: argparse.Namespace) -> None:
    """Counts that must be positive, and a router-input budget that must not be negative."""
    for option, value in (
        ("--batch_size", args.batch_size),
        ("--max-docs-per-group", args.max_docs_per_group),
        ("--n-boot", args.n_boot),
        ("--n-perm", args.n_perm),
    ):
        if value < 1:
            raise PipelineError(f"{option} {value}: must be a positive integer")
    if args.max_router_inputs < 0:
        raise PipelineError(f"--max-router-inputs {args.max_router_inputs}: must be >= 0 (0 = no references)")
    if args.n_random_routers < 1:
        raise PipelineError(
            f"--n-random-routers {args.n_random_routers}: need at least 1 (--max-router-inputs 0 skips the references)"
        )


def parse_args() -> argparse.Namespace:
    parser = step_parser(
        __doc__,
        {
            "dataset": ("--config-dataset", "dataset_params.yaml"),
            "model": ("--config-model", "model_params.yaml"),
            "train": ("--config-train", "train_params.yaml"),
        },
    )
    _add_run_options(parser)
    _add_analysis_options(parser)
    args = parser.parse_args()
    _check_args(args)
    return args


def main() -> None:
    keep_freed_memory()  # the ablation's reruns allocate the same large tensors batch after batch
    args = parse_args()
    configs = load_step_configs(args, ["dataset", "model", "train"])
    out_root = check_output_folder(args.save_path, "--save_path")
    run = load_run(args, configs)
    lock_step_output(out_root / run.name, "--save_path")  # before the analysis: a second one stops now
    train_config = run.configs["train"]
    device = torch.device("cuda" if train_config.device != "cpu" and torch.cuda.is_available() else "cpu")
    bf16 = resolve_precision(args.precision, device, run.model.config.embedding_dim)
    run.model.to(device)
    groups = run.groups()
    layer_names = run.layer_names()
    check_analysis_scale(run, args, len(layer_names))
    file_stems = safe_file_stems(list(groups), "the evaluated groups")  # topic labels are data, not paths
    started = time.time()
    phases = Phases()
    group_datasets = {group: datasets.load_from_disk(str(folder)) for group, folder in groups.items()}
    if args.topic_map is not None:  # every group's documents labelled with their family, before any analysis
        group_datasets, run.topic_families = with_coarse_topics(group_datasets, args.topic_map)
    if args.ablation is None:
        args.ablation = bool(layer_names) and run.model.config.n_experts <= ABLATION_MAX_EXPERTS
    ablation, evaluated = None, {}
    if args.ablation and layer_names:  # first: its plain pass is the MLM evaluation of the groups it covers
        ablation, evaluated = run_ablation(run, group_datasets, device, args, bf16, phases)
    metric_rows, count_rows, expert_counts = evaluate_groups(
        run.model, group_datasets, layer_names, device, args.batch_size, bf16, evaluated, phases
    )
    routing = None
    if layer_names and not args.no_routing_stats:  # a dense model (no MoE layer) has no routing to analyse
        routing = analyze_run_routing(run, group_datasets, layer_names, device, args, bf16, phases)

    stats = routing.stats if routing else None
    out_dir = out_root / run.name
    with atomic_dir(out_dir) as tmp_dir:
        with phases("figures", total=3) as bar:
            write_csv(tmp_dir / "metrics.csv", METRIC_COLUMNS, metric_rows)
            write_csv(tmp_dir / "expert_counts.csv", ["group", "layer", "expert", "count", "share"], count_rows)
            write_figures(tmp_dir, run.name, expert_counts, layer_names, file_stems)
            bar.update()
            routing_files = write_analysis_files(tmp_dir, routing, ablation, layer_names)
            bar.update()
            figures = sorted(path.relative_to(tmp_dir) for path in (tmp_dir / "figures").glob("*.png"))
            write_report_md(
                tmp_dir / "report.md",
                run_summary(run, metric_rows),
                metric_rows,
                stats,
                figures,
                [path for path in routing_files if path.suffix != ".png"],
                ablation,
            )
            bar.update()
        write_sealed_manifest(
            tmp_dir,
            {
                "step": "inference",
                "run": str(run.run_dir),
                "model": str(run.model_dir),
                "checkpoint_step": run.checkpoint_step,
                "topic_map": {"file": str(args.topic_map), "families": run.topic_families} if args.topic_map else None,
                "input_manifest_hash": run.step2_hash,
                "weights_sha256": file_sha256(run.model_dir / WEIGHTS_FILE),  # other weights there since: stale
                "config": {"dataset": run.configs["dataset"], "train": train_config},
                "precision": {"option": args.precision, "forward": "bf16" if bf16 else "fp32", "statistics": "fp32"},
                "metrics": metric_rows,
                "metrics_from_ablation": sorted(evaluated),  # groups whose evaluation is the ablation's plain pass
                "figures": [str(path) for path in figures],
                "routing_files": [str(path) for path in routing_files],
                "routing_settings": stats["settings"] if stats else None,
                "phase_seconds": phases.rounded(),
                "seconds": round(time.time() - started, 2),
            },
        )
    aim_line = None
    if args.aim and not run.coarse:  # beside the training curves (the fine topics' numbers); the files are the result
        aim_line = record_in_aim(
            run.manifest,
            train_config.aim_repo,
            metric_rows,
            stats,
            ablation,
            [out_dir / path for path in figures],
            step=run.checkpoint_step,
        )
    print_summary(out_dir, metric_rows, [*figures, *routing_files], stats, ablation, aim_line)


if __name__ == "__main__":
    run_step(main)
