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
import csv
import os
import time
from dataclasses import dataclass

import datasets
import numpy as np
import torch

from config_utils import PipelineError, atomic_dir, load_step_configs, run_step, step_parser, write_json_atomic
from config_utils.contracts import check_run_data, read_step2_output, step3_command
from config_utils.host_memory import keep_freed_memory
from config_utils.io import (
    check_output_folder,
    human_size,
    lock_step_output,
    read_manifest,
    safe_file_stems,
    write_sealed_manifest,
)
from inference.routing import collect_routing, first_documents
from inference.routing_files import file_stem, write_routing_outputs
from process_exp_results.ablation import ablation_losses, ablation_statistics, plot_ablation
from process_exp_results.consistency import analysed_mask, analyze_consistency
from process_exp_results.phases import Phases
from process_exp_results.plots import plot_pooled_expert_histogram, plot_routing_saturation, plot_topic_layer_histogram
from process_exp_results.references import draw_random_routers
from process_exp_results.report import (
    ablation_sentence,
    consistency_sentence,
    saturation_sentence,
    summary_sentences,
    write_report_md,
)
from process_exp_results.routing_stats import RoutingRecords, analyze_routing, token_classes
from train.evaluation import evaluate_mlm, mlm_loader
from train.final_model import MODEL_DIR, find_run, load_model
from train.precision import autocast, bf16_is_fast
from train.routing_snapshots import saturation

ABLATION_MAX_EXPERTS = 16  # E x L evaluations: beyond this the default is off
METRIC_COLUMNS = [
    "group",
    "documents",
    "real_tokens",
    "masked_tokens",
    "mlm_loss",
    "accuracy",
    "perplexity",
    "majority_accuracy",
]


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def training_token_ids(train_dir: Path) -> np.ndarray:
    """The token ids that occur in the training split (its unmasked text), sorted."""
    train = datasets.load_from_disk(str(train_dir)).with_format("numpy", columns=["unmasked_ids", "attention_mask"])
    seen = set()
    for batch in train.iter(batch_size=4096):
        seen.update(np.unique(batch["unmasked_ids"][batch["attention_mask"].astype(bool)]).tolist())
    return np.array(sorted(seen), dtype=np.int64)


def run_summary(run_dir: Path, model_config, metric_rows: list[dict]) -> dict:
    """The facts at the top of report.md."""
    return {
        "run": run_dir.name,
        "model folder": str(run_dir / MODEL_DIR),
        "model": f"{model_config.n_encoder_blocks} blocks, MoE in blocks {model_config.moe_layer_indices}, "
        f"{model_config.n_experts} experts, top-{model_config.top_k_experts}, "
        f"embedding {model_config.embedding_dim}, seq_len {model_config.seq_len}",
        "evaluated": ", ".join(f"{row['group']} ({row['documents']} documents)" for row in metric_rows),
    }


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """Which run to evaluate, where its results go, and the evaluation batch size."""
    parser.add_argument("--save_path", default="process_exp_results/results", help="results go to SAVE_PATH/<run tag>/")
    parser.add_argument(
        "--run",
        default=None,
        help="run tag under train.save_path, or a run folder; if not given, the last finished run",
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
    parser.add_argument("--no-routing-stats", action="store_true", help="skip the routing analysis")
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


@dataclass
class Run:
    """A trained run and the step 2 data it was trained on."""

    configs: dict
    run_dir: Path
    model: torch.nn.Module
    tokenizer: object
    step2_manifest: dict
    step2_hash: str

    @property
    def masked_dir(self) -> Path:
        return Path(self.configs["dataset"].data_params.masked_dir)

    def groups(self) -> dict[str, Path]:
        """The test split, then each evaluation topic in the config's order (for the tables and figures)."""
        groups = {"test": self.masked_dir / "test"}
        for topic in self.configs["dataset"].data_params.eval_topics:
            groups[topic] = self.masked_dir / self.step2_manifest["topics"][topic]
        return groups

    def layer_names(self) -> list[str]:
        """The MoE layers; none for the dense baseline (one expert per layer: no choice to analyse)."""
        if self.model.config.is_dense_baseline:
            print(
                f"note: {self.run_dir.name} is the dense baseline (n_experts: 1): no routing to analyse; writing "
                f"its metrics only",
                file=sys.stderr,
            )
            return []
        return [f"block {index}" for index in self.model.config.moe_layer_indices]


# What --n-perm and --n-boot cost, measured on the 2-core CPU this was built on; only the order of magnitude matters.
# Each permutation and each bootstrap draw passes over every analysed token of every MoE layer: 50 ns a token on
# 20 Newsgroups (2,300 documents, 280,412 tokens x 2 layers: 2,800 more permutations took 80 s more, 2,800 more
# bootstrap draws 77 s), at least a fixed 83 us a permutation and 330 us a draw (a tiny corpus, 5 vs 3000 of each).
# The estimate is then right on 20 Newsgroups and up to 3x over on the demo and the tiny corpus, never under.
SECONDS_PER_TOKEN = 50e-9
SECONDS_PER_PERMUTATION, SECONDS_PER_BOOTSTRAP = 83e-6, 330e-6
LONG_ANALYSIS_SECONDS = 10 * 60


def analysed_sizes(run: Run, max_docs_per_group: int) -> tuple[int, int]:
    """About how many documents and real tokens the analysis reads: each group's first documents, at its mean
    length (from step 2's counts, so before any work)."""
    documents, tokens = 0, 0.0
    for folder in run.groups().values():
        counts = run.step2_manifest["counts"][str(folder.relative_to(run.masked_dir))]
        kept = min(counts["documents"], max_docs_per_group)
        documents += kept
        tokens += kept * counts["real_tokens"] / max(counts["documents"], 1)
    return documents, int(tokens)


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 1 else "under a second"
    return f"{seconds / 60:.0f} minutes" if seconds < 5400 else f"{seconds / 3600:.1f} hours"


def resampling_cost(n_perm: int, n_boot: int, n_layers: int, documents: int, tokens: int) -> tuple[float, int]:
    """(seconds, bytes): the time of the resampling, and the bootstrap weights it holds at once (a float64 weight
    per document and draw, in the consistency and ablation intervals)."""
    per_token = SECONDS_PER_TOKEN * tokens
    seconds = n_layers * (
        n_perm * max(SECONDS_PER_PERMUTATION, per_token) + n_boot * max(SECONDS_PER_BOOTSTRAP, per_token)
    )
    return seconds, 8 * n_boot * documents


def check_analysis_scale(run: Run, args: argparse.Namespace, n_layers: int) -> None:
    """Before any work: resampling that would take long or not fit in memory is asked about (on a terminal) or
    refused, with the estimate and what the defaults would cost, never started silently."""
    if not n_layers or args.accept_long or args.no_routing_stats and args.ablation is False:  # nothing resampled
        return
    documents, tokens = analysed_sizes(run, args.max_docs_per_group)
    seconds, weights = resampling_cost(args.n_perm, args.n_boot, n_layers, documents, tokens)
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    if seconds <= LONG_ANALYSIS_SECONDS and weights <= available / 2:
        return
    at_defaults, _ = resampling_cost(200, 200, n_layers, documents, tokens)
    estimate = (
        f"--n-perm {args.n_perm} and --n-boot {args.n_boot} on about {documents:,} documents ({tokens:,} tokens) x "
        f"{n_layers} MoE layer{'s' if n_layers > 1 else ''} would take roughly {duration(seconds)} of resampling here and hold "
        f"{human_size(weights)} of bootstrap weights ({human_size(available)} free); the defaults, 200 each: "
        f"{duration(at_defaults)}"
    )
    if sys.stdin.isatty() and sys.stderr.isatty():
        print(f"{estimate}. Run it? [y/N] ", end="", file=sys.stderr, flush=True)
        if sys.stdin.readline().strip().lower() in ("y", "yes"):
            return
    raise PipelineError(f"{estimate}: pass smaller values (1000 each resolves p down to 0.001), or add --accept-long")


def load_run(args: argparse.Namespace, configs: dict) -> Run:
    """The run's model and tokenizer, checked against the step 2 output it was trained on."""
    run_dir = find_run(configs["train"].save_path, args.run, step3_command(args))
    run_manifest, _ = read_manifest(run_dir, step3_command(args, run_dir.name) + " --overwrite")
    model, tokenizer = load_model(run_dir / MODEL_DIR)
    # the run's own model settings decide what data it can read, whatever model config is passed now
    run_model_config = {**configs["model"], "seq_len": model.config.seq_len, "vocab_size": model.config.vocab_size}
    step2_manifest, step2_hash = read_step2_output(configs["dataset"], run_model_config, args)
    check_run_data(run_manifest, run_dir, step2_hash, args)
    return Run(configs, run_dir, model, tokenizer, step2_manifest, step2_hash)


def resolve_precision(option: str, device, width: int) -> bool:
    """--precision as a flag: True = bfloat16 autocast (auto: train/precision.py's rule for the device and width)."""
    return bf16_is_fast(device, width) if option == "auto" else option == "bf16"


def evaluate_groups(
    model,
    group_datasets: dict,
    layer_names: list[str],
    device,
    batch_size: int,
    bf16: bool = False,
    done: dict | None = None,
    phases: Phases | None = None,
) -> tuple[list[dict], list[dict], dict]:
    """Per group the MLM metrics row, the expert_counts.csv rows and the [layer, expert] count array.

    done: group -> EvalResult already computed on all of the group's documents (the ablation's plain pass), used
    instead of a second pass."""
    done = done or {}
    phases = phases or Phases(progress=False)
    metric_rows, count_rows, expert_counts = [], [], {}
    with phases("evaluation", total=len(group_datasets)) as bar:
        results = {}
        for group, dataset in group_datasets.items():
            if group not in done:
                with autocast(device, bf16):
                    results[group] = evaluate_mlm(model, mlm_loader(dataset, batch_size), device)
            bar.update()
    for group, dataset in group_datasets.items():
        result = done.get(group) or results[group]
        metric_rows.append({"group": group, "documents": len(dataset), **result.as_dict()})
        expert_counts[group] = result.expert_counts.numpy()
        for layer_row, layer_name in enumerate(layer_names):
            layer_total = max(int(result.expert_counts[layer_row].sum()), 1)
            for expert, count in enumerate(result.expert_counts[layer_row].tolist()):
                count_rows.append(
                    {
                        "group": group,
                        "layer": layer_name,
                        "expert": expert,
                        "count": count,
                        "share": count / layer_total,
                    }
                )
    return metric_rows, count_rows, expert_counts


@dataclass
class RoutingAnalysis:
    stats: dict  # analyze_routing's result, with "consecutive", "saturation" and "summary" added
    records: RoutingRecords
    id_to_token: list[str]


def n_forward_passes(group_datasets: dict, max_docs: int, batch_size: int) -> int:
    """The batches of batch_size documents over the first max_docs of each group (a progress bar's total)."""
    return sum(-(-min(len(dataset), max_docs) // batch_size) for dataset in group_datasets.values())


def draw_references(records: RoutingRecords, router_sample, args: argparse.Namespace, phases: Phases) -> list | None:
    """Per layer the random routers on the sampled router inputs, drawn once for the references and the
    consistency reference (the analysis's seed, 0)."""
    if router_sample is None:
        return None
    analysed = analysed_mask(records, args.pool_held_out)
    with phases("references", total=len(router_sample.inputs)) as bar:
        routers = []
        for layer in range(len(router_sample.inputs)):
            routers.append(draw_random_routers(router_sample, analysed, args.n_random_routers, 0, layer))
            bar.update()
    return routers


def analyze_run_routing(
    run: Run,
    group_datasets: dict,
    layer_names: list[str],
    device,
    args: argparse.Namespace,
    bf16: bool = False,
    phases: Phases | None = None,
) -> RoutingAnalysis:
    """The routing records of every group, their statistics against references, local consistency, saturation over
    training, and the plain-language summary."""
    model, tokenizer = run.model, run.tokenizer
    phases = phases or Phases(progress=False)
    held_out = tuple(run.configs["dataset"].data_params.eval_topics)
    with phases("collection", total=n_forward_passes(group_datasets, args.max_docs_per_group, args.batch_size)) as bar:
        records, router_sample = collect_routing(
            model,
            group_datasets,
            device,
            args.batch_size,
            args.max_docs_per_group,
            held_out,
            args.max_router_inputs,
            sample_held_out=args.pool_held_out,
            bf16=bf16,
            progress=bar.update,
        )
    class_of_id, class_names = token_classes(tokenizer)
    id_to_token = tokenizer.convert_ids_to_tokens(list(range(model.config.vocab_size)))
    random_routers = draw_references(records, router_sample, args, phases)
    stats = analyze_routing(
        records,
        class_of_id,
        class_names,
        id_to_token,
        n_boot=args.n_boot,
        n_perm=args.n_perm,
        router_sample=router_sample,
        n_random_routers=args.n_random_routers,
        train_token_ids=training_token_ids(run.masked_dir / "train"),
        pool_held_out=args.pool_held_out,
        random_routers=random_routers,
        phases=phases,
    )
    with phases("consistency", total=len(layer_names)) as bar:
        stats["consecutive"] = analyze_consistency(
            records,
            id_to_token,
            n_boot=args.n_boot,
            pool_held_out=args.pool_held_out,
            router_sample=router_sample,
            n_random_routers=args.n_random_routers,
            random_routers=random_routers,
            progress=bar.update,
        )
    stats["saturation"] = saturation(run.run_dir, layer_names)  # from the run's routing snapshots
    stats["summary"] = (
        summary_sentences(stats)
        + [consistency_sentence(layer, values) for layer, values in stats["consecutive"].items()]
        + [saturation_sentence(layer, values) for layer, values in (stats["saturation"] or {}).items()]
    )
    return RoutingAnalysis(stats, records, id_to_token)


def run_ablation(
    run: Run, group_datasets: dict, device, args: argparse.Namespace, bf16: bool, phases: Phases
) -> tuple[dict, dict]:
    """ablation.json's content, and the MLM evaluation of every group whose documents were all ablated (the
    ablation's plain pass is that evaluation: evaluate_groups reuses it)."""
    ablated_groups = {
        name: first_documents(dataset, args.max_docs_per_group) for name, dataset in group_datasets.items()
    }
    with phases("ablation", total=n_forward_passes(group_datasets, args.max_docs_per_group, args.batch_size)) as bar:
        losses = ablation_losses(run.model, ablated_groups, device, args.batch_size, bf16=bf16, on_batch=bar.update)
        token_class, class_names = token_classes(run.tokenizer)
        ablation = ablation_statistics(
            losses,
            token_class,
            class_names,
            topic_groups=("test",),
            n_bootstrap=args.n_boot,
            n_permutations=args.n_perm,
        )
    whole = {name for name, dataset in group_datasets.items() if len(ablated_groups[name]) == len(dataset)}
    return ablation, {name: result for name, result in losses.evaluations.items() if name in whole}


def write_figures(
    tmp_dir: Path, run_name: str, expert_counts: dict, layer_names: list[str], file_stems: dict[str, str]
) -> None:
    """The expert-choice histograms: all layers pooled, and per group one bar per layer."""
    if not layer_names:  # a dense model (no MoE layer) has no routing to draw
        return
    plot_pooled_expert_histogram(
        expert_counts,
        tmp_dir / "figures" / "experts_all_layers.png",
        title=f"Expert choice, all MoE layers pooled ({run_name})",
    )
    for group, counts in expert_counts.items():
        figure = tmp_dir / "figures" / f"experts_per_layer_{file_stems[group]}.png"
        plot_topic_layer_histogram(group, counts, figure, layer_names=layer_names)


def write_analysis_files(
    tmp_dir: Path, routing: RoutingAnalysis | None, ablation: dict | None, layer_names: list[str]
) -> list[Path]:
    """The routing and ablation files and figures; returns the files written, relative to tmp_dir."""
    written = []
    if routing is not None:
        written = write_routing_outputs(tmp_dir, routing.stats, routing.records, routing.id_to_token)
        if routing.stats["saturation"]:
            plot_routing_saturation(routing.stats["saturation"], tmp_dir / "figures" / "routing_saturation.png")
    if ablation is not None:
        write_json_atomic(tmp_dir / "ablation.json", ablation)
        written.append(Path("ablation.json"))
        for layer in layer_names:
            plot_ablation(ablation, layer, tmp_dir / "figures" / f"ablation_{file_stem(layer)}.png")
    return written


def print_summary(
    out_dir: Path, metric_rows: list[dict], figures: list[Path], routing_files: list[Path], sentences: list[str]
) -> None:
    print(f"{'group':<16}{'docs':>7}{'mlm loss':>10}{'accuracy':>10}{'baseline':>10}{'perplexity':>12}")
    for row in metric_rows:
        print(
            f"{row['group']:<16}{row['documents']:>7}{row['mlm_loss']:>10.4f}{row['accuracy']:>10.3f}"
            f"{row['majority_accuracy']:>10.3f}{row['perplexity']:>12.2f}"
        )
    print("(baseline: accuracy of always predicting the group's most frequent masked token)")
    print(f"metrics: {out_dir / 'metrics.csv'}\nexpert counts: {out_dir / 'expert_counts.csv'}")
    for path in figures:
        print(f"figure: {out_dir / path}")
    for path in routing_files:
        if path.suffix != ".png":
            print(f"routing: {out_dir / path}")
    print(f"report: {out_dir / 'report.md'}")
    for sentence in sentences:
        print(sentence)


def main() -> None:
    keep_freed_memory()  # the ablation's reruns allocate the same large tensors batch after batch
    args = parse_args()
    configs = load_step_configs(args, ["dataset", "model", "train"])
    out_root = check_output_folder(args.save_path, "--save_path")
    run = load_run(args, configs)
    lock_step_output(out_root / run.run_dir.name, "--save_path")  # before the analysis: a second one stops now
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
    out_dir = out_root / run.run_dir.name
    with atomic_dir(out_dir) as tmp_dir:
        with phases("figures", total=3) as bar:
            write_csv(tmp_dir / "metrics.csv", METRIC_COLUMNS, metric_rows)
            write_csv(tmp_dir / "expert_counts.csv", ["group", "layer", "expert", "count", "share"], count_rows)
            write_figures(tmp_dir, run.run_dir.name, expert_counts, layer_names, file_stems)
            bar.update()
            routing_files = write_analysis_files(tmp_dir, routing, ablation, layer_names)
            bar.update()
            figures = sorted(path.relative_to(tmp_dir) for path in (tmp_dir / "figures").glob("*.png"))
            write_report_md(
                tmp_dir / "report.md",
                run_summary(run.run_dir, run.model.config, metric_rows),
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
                "input_manifest_hash": run.step2_hash,
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
    ablation_lines = [
        ablation_sentence(layer, entry) for layer, entry in (ablation or {}).items() if layer.startswith("block ")
    ]
    print_summary(out_dir, metric_rows, figures, routing_files, [*(stats["summary"] if stats else []), *ablation_lines])


if __name__ == "__main__":
    run_step(main)
