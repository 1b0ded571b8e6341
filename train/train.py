r"""Step 3: train the MoE encoder with masked language modelling, tracked in Aim.

Reads data_params.masked_dir (step 2); writes train.save_path/<tag>/: checkpoints/step-N/ (model,
optimizer, scheduler, RNG and data position: `--resume latest` continues from the newest), the final
model/ (Hugging Face format, safetensors, with its tokenizer) and manifest.json; the Aim run (named
by --tag) goes to the Aim repository in train.aim_repo (`aim up` there shows it). One process, or
several through torchrun / accelerate launch (batch_size is the global batch, split across them):
    python train/train.py --config-model demo/model_params.yaml --config-dataset demo/dataset_params.yaml \
        --config-train demo/train_params.yaml --tag demo
    torchrun --standalone --nproc_per_node=2 train/train.py ... --tag demo
SIGINT/SIGTERM save a checkpoint after the current step and exit with 130/143.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a script: import the project, not this folder

import argparse
import math
import time
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase, get_scheduler

from config_utils import ConfigSection, PipelineError, load_step_configs, run_step, step_parser
from config_utils.contracts import (
    MODEL_DIR,
    checkpoint_folder,
    read_step2_output,
    same_families,
    step2_command,
    step3_command,
    step4_command,
)
from config_utils.host_memory import keep_freed_memory
from config_utils.io import MANIFEST, OutputLock, check_output_folder, write_sealed_manifest
from config_utils.topic_map import coarse_topics, read_topic_map
from models import MoEEncoderConfig, MoEEncoderForMaskedLM
from models.router import LinearRouter
from train.checkpoints import (
    StopRequest,
    complete_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    resolve_resume,
    save_checkpoint,
)
from train.data import TrainBatches
from train.evaluation import perplexity
from train.final_model import mark_latest, save_model
from train.loop import (
    NonFiniteLoss,
    evaluate_sharded,
    gather_rng_states,
    make_accelerator,
    optimizer_for,
    restore_rng_states,
    train_step,
)
from train.router_refit import refit_routers
from train.routing_snapshots import (
    SNAPSHOT_DIR,
    last_snapshot,
    probe_batches,
    routing_snapshot,
    save_snapshot,
    snapshot_path,
    snapshot_steps,
    top1_agreement,
)
from train.run_folder import finish_run_folder, git_state, lock_run_folder, run_dir_for, start_run_folder
from train.tracking import (
    RoutingHealth,
    RoutingRecorder,
    expert_load_name,
    package_versions,
    start_aim_run,
    track_expert_load,
    track_step,
)


def build_model(model_config: dict, vocab_size: int, pad_token_id: int) -> MoEEncoderForMaskedLM:
    settings = {**model_config, "vocab_size": vocab_size}
    try:
        return MoEEncoderForMaskedLM(MoEEncoderConfig(**settings, pad_token_id=pad_token_id))
    except ValueError as error:  # e.g. embedding_dim not divisible by num_head
        raise PipelineError(f"model config: {error}") from None


def freeze_routers(model: MoEEncoderForMaskedLM) -> None:
    """train.freeze_router: every router keeps its random init (a control arm; the optimizer skips it)."""
    for module in model.modules():
        if isinstance(module, LinearRouter):
            module.requires_grad_(False)


def add_router_targets(train_set, n_experts: int, family_of_topic: dict | None = None):
    """train.router_supervision: each sequence's target expert, group g of the sorted groups -> g mod E, a group
    being a train topic (=topic) or a topic's family (=family, family_of_topic from train.router_topic_map)."""
    if n_experts < 2:
        raise PipelineError("train.router_supervision needs routers: set model.n_experts to 2 or more")
    topics = sorted(set(train_set["topic"]))
    group_of_topic = family_of_topic or {topic: topic for topic in topics}
    groups = sorted({group_of_topic[topic] for topic in topics})
    expert_of_topic = {topic: groups.index(group_of_topic[topic]) % n_experts for topic in topics}
    return (
        train_set.add_column("router_target", [expert_of_topic[topic] for topic in train_set["topic"]]),
        expert_of_topic,
    )


def families_for_supervision(train_config: ConfigSection, topics) -> dict | None:
    """train.router_supervision=family: each train topic's family, from train.router_topic_map's coarse_topics."""
    if train_config.router_supervision != "family":
        return None
    if not train_config.router_topic_map:
        raise PipelineError(
            "train.router_supervision=family needs train.router_topic_map: a YAML file with coarse_topics, "
            "e.g. --set train.router_topic_map=configs/corpora/20newsgroups.yaml"
        )
    topic_map = read_topic_map(Path(train_config.router_topic_map), "train.router_topic_map")
    return coarse_topics(topics, topic_map, f"train.router_topic_map {train_config.router_topic_map}")


@dataclass
class Run:
    """What the phases of one training run share: set up fills it in phase by phase, the loop advances `state`,
    finish writes the model and the manifest from it."""

    # read_inputs: the configs and step 2's output
    args: argparse.Namespace
    model_config: ConfigSection
    dataset_config: ConfigSection
    train_config: ConfigSection
    step2_manifest: dict
    step2_hash: str
    tokenizer: PreTrainedTokenizerBase
    train_set: datasets.Dataset
    valid_set: datasets.Dataset
    expert_of_topic: dict | None  # train.router_supervision: the train topics' target experts
    family_of_topic: dict | None  # train.router_supervision=family: the train topics' families
    supervision_coef: float
    router_refit: dict | None = None  # train.router_refit_batches: the routers' loss before and after
    # claim_run_folder: the processes and the run folder they write
    accelerator: Accelerator | None = None
    tag: str = ""
    run_dir: Path | None = None
    run_lock: OutputLock | None = None  # main process only
    replaced_run: Path | None = None  # where --overwrite set the earlier run aside until this one finishes
    resume_from: Path | None = None
    # build_training and resume_or_start: what the steps change
    model: torch.nn.Module | None = None  # prepared (DDP-wrapped with several processes)
    unwrapped: MoEEncoderForMaskedLM | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    batches: TrainBatches | None = None
    total_steps: int = 0
    state: dict = field(default_factory=dict)  # what a checkpoint stores: step, data position, eval history, ...
    # start_tracking: what watches the run
    n_parameters: int = 0
    aim_run: Any = None  # None on the processes that do not write to Aim
    recorder: RoutingRecorder | None = None
    moe_layers: list[int] = field(default_factory=list)
    health: RoutingHealth | None = None  # token choice only: an expert-choice layer is balanced by construction
    probe: list[dict] | None = None  # the validation batches whose routing is snapshotted at each evaluation
    previous_snapshot: torch.Tensor | None = None
    snapshot_seconds: float = 0.0
    started: float = 0.0  # perf_counter at the first step of this start
    seconds_before_this_start: float | None = 0.0  # step 3's earlier starts (None: a checkpoint that did not record)
    stop_signal: int | None = None  # SIGINT/SIGTERM received during the last training step


def main() -> None:
    keep_freed_memory()  # every step allocates the same large tensors: reuse them instead of faulting them in
    run = set_up(parse_args())
    train(run)
    if run.train_config.router_refit_batches:
        refit(run)
    finish(run)


def refit(run: Run) -> None:
    """train.router_refit_batches, after the final checkpoint: a signal stops it, and --resume latest refits again."""
    with StopRequest() as stop:
        run.router_refit = refit_routers(
            run.accelerator,
            run.model,
            run.recorder.moe_layers,
            run.batches,
            run.state["position"],
            run.train_config.router_refit_batches,
            run.tag,
            stop_requested=lambda: stop.requested or run.stop_signal is not None,
        )
    if run.router_refit is None:
        run.accelerator.print(
            f"stopped by a signal while fitting the routers: training ended at checkpoint "
            f"{checkpoint_folder(run.run_dir, run.state['step'])}; continue with "
            f"`{step3_command(run.args, run.tag)} --resume latest` (the routers are fitted again from it)"
            f"{replaced_run_note(run)}",
            file=sys.stderr,
        )
        raise SystemExit(128 + (stop.signal_number or run.stop_signal or 15))


def parse_args() -> argparse.Namespace:
    parser = step_parser(
        __doc__,
        {
            "model": ("--config-model", "model_params.yaml"),
            "dataset": ("--config-dataset", "dataset_params.yaml"),
            "train": ("--config-train", "train_params.yaml"),
        },
    )
    parser.add_argument(
        "--tag", default=None, help="names the run (its folder save_path/<tag> and its Aim tag); default: a timestamp"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run with the same tag")
    parser.add_argument(
        "--resume",
        metavar="latest|PATH",
        default=None,
        help="continue the run --tag from its newest checkpoint, or from one of its checkpoint folders",
    )
    return parser.parse_args()


# ---- set up: inputs, run folder, model, resume, tracking -----------------------------------------------------------


def set_up(args: argparse.Namespace) -> Run:
    run = read_inputs(args)
    claim_run_folder(run)
    build_training(run)
    resume_or_start(run)
    start_tracking(run)
    return run


def read_inputs(args: argparse.Namespace) -> Run:
    """The configs and step 2's output, checked against each other; nothing is written yet."""
    configs = load_step_configs(args, ["model", "dataset", "train"])
    model_config, dataset_config, train_config = configs["model"], configs["dataset"], configs["train"]
    if args.resume and args.resume != "latest" and args.tag is None:
        args.tag = Path(args.resume).resolve().parents[1].name  # run_dir/checkpoints/step-N
    if args.resume == "latest" and args.tag is None:
        raise PipelineError("--resume latest needs the --tag of the run to continue")
    step2_manifest, step2_hash = read_step2_output(dataset_config, model_config, args)
    if train_config.device == "cuda" and not torch.cuda.is_available():
        raise PipelineError("train config: device=cuda but no CUDA device is visible; use device: auto or cpu")
    masked_dir = Path(dataset_config.data_params.masked_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(masked_dir / "tokenizer"))
    train_set = datasets.load_from_disk(str(masked_dir / "train"))
    valid_set = datasets.load_from_disk(str(masked_dir / "valid"))
    if train_config.masking == "dynamic" and "unmasked_ids" not in train_set.column_names:
        raise PipelineError(
            f"train.masking=dynamic needs the unmasked ids, which {masked_dir} lacks (made by an "
            f"older step 2): run `{step2_command(args)}` again"
        )

    expert_of_topic, family_of_topic = None, None
    if train_config.router_supervision:
        if train_config.freeze_router:
            raise PipelineError(
                f"train.router_supervision={train_config.router_supervision} trains the routers, "
                "train.freeze_router=true keeps them fixed: set one of them off"
            )
        family_of_topic = families_for_supervision(train_config, train_set.unique("topic"))
        train_set, expert_of_topic = add_router_targets(train_set, model_config.n_experts, family_of_topic)
    elif train_config.router_refit_batches:
        raise PipelineError(
            "train.router_refit_batches fits the routers to train.router_supervision's target, which is off: set "
            "train.router_supervision, or train.router_refit_batches to 0"
        )
    if train_config.router_topic_map and train_config.router_supervision != "family":
        raise PipelineError(
            f"train.router_topic_map is read by train.router_supervision=family only (it is "
            f"{train_config.router_supervision}): set router_supervision to family, or router_topic_map to null"
        )
    supervision_coef = train_config.router_supervision_coef if expert_of_topic else 0.0
    return Run(
        args,
        model_config,
        dataset_config,
        train_config,
        step2_manifest,
        step2_hash,
        tokenizer,
        train_set,
        valid_set,
        expert_of_topic,
        family_of_topic,
        supervision_coef,
    )


def claim_run_folder(run: Run) -> None:
    """The processes, the run's tag and its folder, locked by the main process (started afresh unless resumed)."""
    args, train_config = run.args, run.train_config
    run.accelerator = make_accelerator(train_config, run.model_config.embedding_dim)
    n_processes = run.accelerator.num_processes
    if train_config.batch_size % n_processes:
        raise PipelineError(
            f"train.batch_size={train_config.batch_size} is the global batch and must split evenly "
            f"over {n_processes} processes"
        )
    run.tag = broadcast_object_list([args.tag or time.strftime("run-%Y%m%d-%H%M%S")])[0]  # one name for all
    run.run_dir = run_dir_for(check_output_folder(train_config.save_path, "train.save_path"), run.tag)
    check_output_folder(train_config.aim_repo, "train.aim_repo")
    problem = None
    if run.accelerator.is_main_process:  # one process owns the folder; the others hear whether it could
        try:
            run.run_lock = lock_run_folder(train_config.save_path, run.tag)
            run.replaced_run = start_run_folder(
                run.run_dir, args.overwrite, bool(args.resume), step3_command(args, run.tag)
            )
        except PipelineError as error:
            problem = str(error)
    problem = broadcast_object_list([problem])[0]
    if problem:
        raise PipelineError(problem)
    if args.resume:
        run.resume_from = resolve_resume(args.resume, run.run_dir, step3_command(args, run.tag))


def build_training(run: Run) -> None:
    """Model, optimizer, data order and learning-rate schedule, prepared for the processes."""
    train_config, accelerator = run.train_config, run.accelerator
    set_seed(train_config.random_seed)
    model = build_model(run.model_config, run.step2_manifest["tokenizer"]["vocab_size"], run.tokenizer.pad_token_id)
    if train_config.freeze_router:
        freeze_routers(model)
    optimizer = optimizer_for(model, train_config.learning_rate, train_config.weight_decay)
    run.batches = TrainBatches(
        run.train_set,
        train_config.batch_size,
        train_config.random_seed,
        accelerator.process_index,
        accelerator.num_processes,
        train_config.masking,
        run.step2_manifest["tokenizer"],
        run.dataset_config.data_params.mask_prob,
    )
    run.total_steps = train_config.max_steps or train_config.n_epochs * math.ceil(
        run.batches.per_epoch / train_config.gradient_accumulation_steps
    )
    run.scheduler = learning_rate_schedule(optimizer, train_config, run.total_steps)
    # the scheduler is not prepared: accelerate would step it once per process per step
    run.model, run.optimizer = accelerator.prepare(model, optimizer)
    run.unwrapped = accelerator.unwrap_model(run.model)


def learning_rate_schedule(optimizer, train_config: ConfigSection, total_steps: int):
    """Linear warmup over warmup_proportion of the steps, then down to 0 at the last: linearly or along a half
    cosine (train.lr_schedule)."""
    warmup = int(train_config.warmup_proportion * total_steps)
    return get_scheduler(train_config.lr_schedule, optimizer, warmup, total_steps)


def resume_or_start(run: Run) -> None:
    """A fresh state, or the checkpoint's: weights, optimizer, schedule, RNG and data position restored."""
    git = git_state()  # this start's code; checkpoints carry state["git"], so a resumed run keeps its first start's
    run.state = {
        "tag": run.tag,
        "step": 0,
        "position": [0, 0],
        "eval_history": [],
        "aim_run_hash": None,
        "git": git,
        "resume_git": [],
        "train_seconds": 0.0,  # this run's step 3 time over all its starts, up to the checkpoint
    }
    if run.resume_from is None:
        return
    run.state = load_checkpoint(
        run.resume_from,
        run.unwrapped,
        run.optimizer,
        run.train_config,
        run.model_config,
        run.step2_hash,
        step3_command(run.args, run.tag),
    )
    if not same_families(run.state, run.train_config.router_topic_map, run.family_of_topic):
        raise PipelineError(
            f"--resume {run.args.resume}: {run.resume_from}'s routers were told other topic families than "
            f"train.router_topic_map={run.train_config.router_topic_map} tells them now: pass the map it was trained "
            f"with, or start the run again with `{step3_command(run.args, run.tag)} --overwrite`"
        )
    run.state.pop("router_supervision", None)  # the manifest writes its own
    run.state.pop("config", None)  # the checkpoint's: a resumed refit may have another router_refit_batches
    written_by = run.state.get("tag", run.tag)
    if written_by != run.tag:  # its Aim run, checkpoints and schedule are another run's: continuing it here mixes two
        raise PipelineError(
            f"--resume {run.args.resume}: {run.resume_from} is a checkpoint of run '{written_by}', not of "
            f"'{run.tag}': continue that run with `{step3_command(run.args, written_by)} --resume latest`, or "
            f"start '{run.tag}' without --resume"
        )
    run.scheduler.load_state_dict(run.state.pop("scheduler"))
    if not restore_rng_states(run.accelerator, run.state.pop("rng")):
        run.accelerator.print(
            f"note: {run.resume_from} was written by {run.state['n_processes']} processes, this run has "
            f"{run.accelerator.num_processes}: the data order resumes exactly, dropout draws do not"
        )
    run.accelerator.print(f"resuming {run.tag} from {run.resume_from} (step {run.state['step']} of {run.total_steps})")
    # checkpoints written before runs recorded their commit have none
    run.state.setdefault("git", {"commit": None, "dirty": None})
    run.state.setdefault("train_seconds", None)  # unknown: written before runs recorded it
    run.state["resume_git"] = [*run.state.get("resume_git", []), {"step": run.state["step"], **git}]


def start_tracking(run: Run) -> None:
    """The Aim run (continued on resume), the routing recorder and health, and the probe for routing snapshots."""
    accelerator, config, state = run.accelerator, run.unwrapped.config, run.state
    run.n_parameters = sum(parameter.numel() for parameter in run.model.parameters())
    run.aim_run = start_aim_run(
        accelerator,
        run.tag,
        run.train_config.experiment_name,
        {
            "dataset": run.dataset_config,
            "model": run.model_config,
            "train": run.train_config,
            "tag": run.tag,
            "vocab_size": config.vocab_size,  # resolved from step 2's tokenizer (model.vocab_size may be null)
            "n_parameters": run.n_parameters,
            "git_commit": state["git"]["commit"],
            "git_dirty": state["git"]["dirty"],
            "resume_git": state["resume_git"],
            "versions": package_versions(),
            "n_processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision,
        },
        state["aim_run_hash"],
        run.train_config.aim_repo,
    )
    state["aim_run_hash"] = run.aim_run.hash if run.aim_run is not None else None
    run.recorder = RoutingRecorder(run.unwrapped, config.n_experts, accelerator.device)
    run.moe_layers = config.moe_layer_indices
    routed = bool(run.moe_layers) and not config.is_dense_baseline
    if routed and config.router_type == "topk":
        run.health = RoutingHealth(len(run.moe_layers), config.n_experts, [f"block {i}" for i in run.moe_layers])
    if routed and run.train_config.routing_snapshots and accelerator.is_main_process:
        run.probe = probe_batches(run.valid_set, run.train_config.batch_size)
    # a resumed run continues from its checkpoint: snapshots of the steps after it belong to the abandoned stretch
    for later in (step for step in snapshot_steps(run.run_dir) if step > state["step"]):
        snapshot_path(run.run_dir, later).unlink()
    run.previous_snapshot = last_snapshot(run.run_dir) if run.probe is not None else None


# ---- the loop -------------------------------------------------------------------------------------------------------


def train(run: Run) -> None:
    """Steps up to total_steps, evaluating and checkpointing on schedule; a signal saves and exits with 128+signal."""
    config, accelerator = run.train_config, run.accelerator
    run.accelerator.print(
        f"training {run.n_parameters:,} parameters for {run.total_steps} steps on {accelerator.num_processes} x "
        f"{accelerator.device} ({len(run.train_set)} sequences, global batch {config.batch_size} x "
        f"{config.gradient_accumulation_steps} accumulation, {accelerator.mixed_precision} precision); "
        f"run folder {run.run_dir}"
    )
    progress = tqdm(
        initial=run.state["step"],
        total=run.total_steps,
        desc=f"step 3: training {run.tag}",
        unit="step",
        mininterval=1.0,
        disable=not accelerator.is_local_main_process,
    )
    run.model.train()
    run.started, paused, tokens = time.perf_counter(), 0.0, 0  # paused: evaluation and checkpoints, not training
    run.seconds_before_this_start = run.state["train_seconds"]
    with progress, StopRequest() as stop:  # the bar closes before an error line is printed
        steps = run.batches.steps(*run.state["position"], config.gradient_accumulation_steps)
        while run.state["step"] < run.total_steps:
            micro_batches, position = next(steps)
            step = run.state["step"] + 1
            result = take_step(run, micro_batches, stop.requested, step)
            run.state["step"], run.state["position"] = step, list(position)
            tokens += result.real_tokens
            record_step(run, step, result, progress, tokens, paused)
            progress.update(1)
            progress.set_postfix(loss=f"{result.metrics['loss']:.3f}", refresh=False)
            pause_started = time.perf_counter()
            if step % config.eval_steps == 0 or step == run.total_steps:
                evaluate(run, step, progress)
            if step % config.save_steps == 0 or step == run.total_steps or result.stop_requested:
                save_checkpoint_now(run, step)
            paused += time.perf_counter() - pause_started
            if result.stop_requested and step < run.total_steps:
                progress.close()  # before the message: tqdm redraws on close
                exit_on_signal(run, step, stop.signal_number)
        run.stop_signal = stop.signal_number  # one that came during the last step stops the refit after it


def take_step(run: Run, micro_batches: list[dict], stop_requested: bool, step: int):
    """One optimizer step; a non-finite loss stops the run before it touches the weights."""
    try:
        return train_step(
            run.accelerator,
            run.model,
            run.optimizer,
            run.scheduler,
            micro_batches,
            run.recorder,
            run.train_config.max_grad_norm,
            stop_requested,
            step,
            run.supervision_coef,
        )
    except NonFiniteLoss as error:
        kept = complete_checkpoints(run.run_dir)
        raise PipelineError(
            f"{error}; stopped before updating the weights. "
            + (f"The last checkpoint {kept[-1]} is intact" if kept else "No checkpoint yet")
            + "; lower train.learning_rate or train.max_grad_norm"
        ) from None


def record_step(run: Run, step: int, result, progress, tokens: int, paused: float) -> None:
    """Routing health every step (its warnings go to the bar), train metrics to Aim every log_steps steps.

    tokens: real tokens trained on since this start; paused: seconds spent evaluating and checkpointing since."""
    step_counts = run.recorder.take_step_counts()
    if run.health is not None:
        counts = run.accelerator.reduce(step_counts, "sum") if run.accelerator.num_processes > 1 else step_counts
        for line in run.health.add_step(step, counts.cpu().numpy()):
            progress.write(line)
    if step % run.train_config.log_steps == 0 or step == run.total_steps:
        tokens_per_s = tokens / max(time.perf_counter() - run.started - paused, 1e-9)
        layer_metrics = {**result.layer_metrics, **(run.health.take_window() if run.health is not None else {})}
        track_step(
            run.aim_run,
            step,
            "train",
            {**result.metrics, "perplexity": perplexity(result.metrics["mlm_loss"]), "tokens_per_s": tokens_per_s},
            layer_metrics,
            run.moe_layers,
        )


def evaluate(run: Run, step: int, progress) -> None:
    """Expert load of the steps since the last evaluation, the validation metrics and a routing snapshot."""
    recorder, moe_layers = run.recorder, run.moe_layers
    load_name = expert_load_name(run.unwrapped.config)  # expert choice: best_expert_share
    track_expert_load(
        run.aim_run, run.accelerator.reduce(recorder.expert_counts, "sum"), moe_layers, step, "train", load_name
    )
    recorder.expert_counts.zero_()
    evaluation = evaluate_sharded(
        run.accelerator, run.model, run.valid_set, run.train_config.batch_size, run.train_config.eval_batches
    )
    metrics = {"eval_mlm_loss": evaluation.mlm_loss, "eval_accuracy": evaluation.accuracy}
    # the same names as the training metrics, told apart by their context (eval_history keeps its keys)
    valid = {"mlm_loss": evaluation.mlm_loss, "perplexity": evaluation.perplexity, "accuracy": evaluation.accuracy}
    track_step(run.aim_run, step, "valid", valid, {}, moe_layers)
    track_expert_load(run.aim_run, evaluation.expert_counts, moe_layers, step, "valid", load_name)
    run.state["valid_expert_counts"] = evaluation.expert_counts.tolist()  # the model card's routing summary
    if run.probe is not None:
        take_routing_snapshot(run, step)
    run.state["eval_history"].append({"step": step, **metrics})
    if run.accelerator.is_main_process:  # tqdm.write prints in every process
        progress.write(
            f"step {step}: eval mlm loss {evaluation.mlm_loss:.4f} (perplexity {evaluation.perplexity:.1f}), "
            f"accuracy {evaluation.accuracy:.3f}"
        )


def take_routing_snapshot(run: Run, step: int) -> None:
    """Where the probe's tokens go now, saved for step 4; its agreement with the last snapshot goes to Aim."""
    started = time.perf_counter()
    snapshot = routing_snapshot(run.unwrapped, run.probe, run.accelerator.device)  # not recorded: not training data
    save_snapshot(run.run_dir, step, snapshot)
    if run.previous_snapshot is not None:
        track_step(
            run.aim_run,
            step,
            "valid",
            {},
            {"routing_agreement": top1_agreement(run.previous_snapshot, snapshot).tolist()},
            run.moe_layers,
        )
    run.previous_snapshot = snapshot
    run.snapshot_seconds += time.perf_counter() - started


def save_checkpoint_now(run: Run, step: int) -> None:
    rng_states = gather_rng_states(run.accelerator)  # every process takes part; the main one writes
    run.state["train_seconds"] = seconds_all_starts(run)
    if run.accelerator.is_main_process:
        save_checkpoint(
            checkpoint_folder(run.run_dir, step),
            run.unwrapped,
            run.tokenizer,
            run.optimizer,
            rng_states,
            {
                **run.state,
                "input_manifest_hash": run.step2_hash,  # a resume on other data is refused
                "scheduler": run.scheduler.state_dict(),
                "n_processes": run.accelerator.num_processes,
                "total_steps": run.total_steps,
                "config": configs_of(run),
                "router_supervision": {"family_of_topic": run.family_of_topic},  # a resume is told the same
            },
        )
        prune_checkpoints(run.run_dir, run.train_config.keep_checkpoints, run.train_config.save_steps)
    run.accelerator.wait_for_everyone()


def replaced_run_note(run: Run) -> str:
    """For a stop line: where the run that --overwrite replaces waits until this one finishes."""
    return f" (the run it replaces stays in {run.replaced_run} until this one finishes)" if run.replaced_run else ""


def exit_on_signal(run: Run, step: int, signal_number: int | None) -> None:
    """After the checkpoint of a stopped step: how to continue, then exit with 128+signal."""
    run.accelerator.print(
        f"stopped by a signal after step {step}: checkpoint {checkpoint_folder(run.run_dir, step)}; "
        f"continue with `{step3_command(run.args, run.tag)} --resume latest`{replaced_run_note(run)}",
        file=sys.stderr,
    )
    raise SystemExit(128 + (signal_number or 15))


# ---- finish: the final model and the manifest ------------------------------------------------------------------------


def finish(run: Run) -> None:
    if run.accelerator.is_main_process:
        if run.resume_from is not None:  # a finished run refitted again: unfinished until its new manifest is written
            (run.run_dir / MANIFEST).unlink(missing_ok=True)
        save_model(run.unwrapped, run.tokenizer, run.run_dir / MODEL_DIR, run.state, card=model_card_facts(run))
        model_files = sorted(f"{MODEL_DIR}/{path.name}" for path in (run.run_dir / MODEL_DIR).iterdir())
        write_sealed_manifest(run.run_dir, manifest(run), model_files)  # step 4 checks the weights against it
        mark_latest(run.train_config.save_path, run.tag)
        finish_run_folder(run.run_dir, run.replaced_run)
        run.run_lock.release()
    # Drop DDP's reducer while the process group is still registered: were the reducer its last owner, gloo's
    # destructor would join its worker threads while holding the GIL they need, and the process would hang.
    run.model = None
    run.accelerator.free_memory()
    run.accelerator.end_training()
    run.accelerator.print(done_line(run))
    run.accelerator.print(f"wrote {run.run_dir / MODEL_DIR}/ (next: {step4_command(run.args, run.tag)})")


def seconds_all_starts(run: Run) -> float | None:
    """Seconds of step 3 over every start of the run up to now (None if a start before the last went unrecorded)."""
    if run.seconds_before_this_start is None:
        return None
    return round(run.seconds_before_this_start + time.perf_counter() - run.started, 2)


def done_line(run: Run) -> str:
    """What a user looks for when training ends: how long it took and where the validation loss landed."""
    seconds = time.perf_counter() - run.started
    text = f"step 3 done: {run.total_steps} steps, {seconds:.0f} s this start"
    if run.resume_from is not None and run.seconds_before_this_start is not None:
        text += f" ({seconds_all_starts(run):.0f} s over all starts)"
    if run.state["eval_history"]:
        last = run.state["eval_history"][-1]
        text += (
            f"; validation at step {last['step']}: MLM loss {last['eval_mlm_loss']:.4f} (perplexity "
            f"{perplexity(last['eval_mlm_loss']):.1f}), accuracy {last['eval_accuracy']:.3f}"
        )
    return text


def configs_of(run: Run) -> dict:
    return {"model": run.model_config, "dataset": run.dataset_config, "train": run.train_config}


def model_card_facts(run: Run) -> dict:
    """What the model card reports beyond the model itself."""
    accelerator = run.accelerator
    return {
        "tag": run.tag,
        "dataset": run.dataset_config,
        "train": run.train_config,
        "data": run.step2_manifest,
        "eval_history": run.state["eval_history"],
        "valid_expert_counts": run.state.get("valid_expert_counts"),
        "n_parameters": run.n_parameters,
        "total_steps": run.total_steps,
        "device": str(accelerator.device),
        "n_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
    }


def manifest(run: Run) -> dict:
    state, accelerator, probe = run.state, run.accelerator, run.probe
    return {
        "step": "train",
        "tag": run.tag,
        "input_manifest_hash": run.step2_hash,
        "git_commit": state["git"]["commit"],
        "git_dirty": state["git"]["dirty"],  # of the run's first start
        "resume_git": state["resume_git"],  # [{step, commit, dirty}] of each resume
        "versions": package_versions(),
        "vocab_size": run.unwrapped.config.vocab_size,
        "config": configs_of(run),
        "n_parameters": run.n_parameters,
        "total_steps": run.total_steps,
        "device": str(accelerator.device),
        "n_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "resumed_from": str(run.resume_from) if run.resume_from else None,
        "seconds": round(time.perf_counter() - run.started, 2),  # this start's
        "seconds_all_starts": seconds_all_starts(run),  # a resumed run's earlier starts too (None: unrecorded)
        "aim_run_hash": state["aim_run_hash"],
        "final_eval": state["eval_history"][-1] if state["eval_history"] else None,
        "eval_history": state["eval_history"],  # [{step, eval_mlm_loss, eval_accuracy}]: learning curves
        "routing_snapshots": None
        if probe is None
        else {  # step 4 reads the run's saturation off them
            "folder": SNAPSHOT_DIR,
            "probe_sequences": sum(len(batch["input_ids"]) for batch in probe),
            "probe_tokens": int(run.previous_snapshot.shape[1]) if run.previous_snapshot is not None else 0,
            "steps": snapshot_steps(run.run_dir),
            "seconds_this_start": round(run.snapshot_seconds, 2),
        },
        "router_supervision": None
        if run.expert_of_topic is None
        else {
            "factor": run.train_config.router_supervision,
            "coef": run.supervision_coef,
            "expert_of_topic": run.expert_of_topic,
            "family_of_topic": run.family_of_topic,
            "refit": run.router_refit,
        },
    }


if __name__ == "__main__":
    run_step(main)
