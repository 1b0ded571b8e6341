"""Step 4's stages on a loaded run: the ablation, the MLM evaluation per group, and the routing analysis (collection,
references, statistics, consistency, saturation, the plain-language summary)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from inference.run import Run, training_token_ids
from process_exp_results.analysis.ablation import ablation_losses
from process_exp_results.analysis.ablation_statistics import ablation_statistics
from process_exp_results.analysis.collect import collect_routing, first_documents
from process_exp_results.analysis.consistency import analysed_mask, analyze_consistency
from process_exp_results.analysis.phases import Phases
from process_exp_results.analysis.records import RoutingRecords, token_classes
from process_exp_results.analysis.routers import draw_random_routers
from process_exp_results.analysis.statistics import analyze_routing
from process_exp_results.report.sentences import consistency_sentence, saturation_sentence, summary_sentences
from train.evaluation import evaluate_mlm, mlm_loader
from train.precision import autocast
from train.routing_snapshots import saturation


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
    stats["saturation"] = saturation(run.run_dir, layer_names, run.checkpoint_step)  # the run's routing snapshots
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
