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
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a script: import the project, not this folder

import math
import time

import datasets
import torch
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm
from transformers import AutoTokenizer, get_linear_schedule_with_warmup

from config_utils import PipelineError, load_step_configs, run_step, step_parser, write_json_atomic
from config_utils.contracts import read_step2_output, step2_command, step3_command, step4_command
from config_utils.io import check_output_folder
from models import MoEEncoderConfig, MoEEncoderForMaskedLM
from models.router import LinearRouter
from train.checkpoints import (StopRequest, checkpoint_folder, complete_checkpoints, load_checkpoint,
                               prune_checkpoints, resolve_resume, save_checkpoint)
from train.data import TrainBatches
from train.final_model import MODEL_DIR, mark_latest, save_model
from train.loop import (NonFiniteLoss, evaluate_sharded, gather_rng_states, make_accelerator, optimizer_for,
                        restore_rng_states, train_step)
from train.run_folder import RunLock, finish_run_folder, git_state, run_dir_for, start_run_folder
from train.routing_snapshots import (SNAPSHOT_DIR, last_snapshot, probe_batches, routing_snapshot, save_snapshot,
                                     snapshot_path, snapshot_steps, top1_agreement)
from train.tracking import (RoutingHealth, RoutingRecorder, package_versions, start_aim_run, track_expert_load,
                            track_step)


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


def add_router_targets(train_set, n_experts: int):
    """train.router_supervision=topic: each sequence's target expert, topic t (of the sorted train topics) -> t mod E."""
    if n_experts < 2:
        raise PipelineError("train.router_supervision=topic needs routers: set model.n_experts to 2 or more")
    topics = sorted(set(train_set["topic"]))
    expert_of_topic = {topic: index % n_experts for index, topic in enumerate(topics)}
    return (train_set.add_column("router_target", [expert_of_topic[topic] for topic in train_set["topic"]]),
            expert_of_topic)


def main() -> None:
    parser = step_parser(__doc__, {"model": ("--config-model", "model_params.yaml"),
                                   "dataset": ("--config-dataset", "dataset_params.yaml"),
                                   "train": ("--config-train", "train_params.yaml")})
    parser.add_argument("--tag", default=None,
                        help="names the run (its folder save_path/<tag> and its Aim tag); default: a timestamp")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run with the same tag")
    parser.add_argument("--resume", metavar="latest|PATH", default=None,
                        help="continue the run --tag from its newest checkpoint, or from a checkpoint folder")
    args = parser.parse_args()
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
        raise PipelineError(f"train.masking=dynamic needs the unmasked ids, which {masked_dir} lacks (made by an "
                            f"older step 2): run `{step2_command(args)}` again")

    expert_of_topic = None
    if train_config.router_supervision == "topic":
        if train_config.freeze_router:
            raise PipelineError("train.router_supervision=topic trains the routers, train.freeze_router=true keeps "
                                "them fixed: set one of them off")
        train_set, expert_of_topic = add_router_targets(train_set, model_config.n_experts)
    supervision_coef = train_config.router_supervision_coef if expert_of_topic else 0.0

    accelerator = make_accelerator(train_config)
    n_processes = accelerator.num_processes
    if train_config.batch_size % n_processes:
        raise PipelineError(f"train.batch_size={train_config.batch_size} is the global batch and must split evenly "
                            f"over {n_processes} processes")
    tag = broadcast_object_list([args.tag or time.strftime("run-%Y%m%d-%H%M%S")])[0]  # one name for all
    run_dir = run_dir_for(check_output_folder(train_config.save_path, "train.save_path"), tag)
    check_output_folder(train_config.aim_repo, "train.aim_repo")
    run_lock, replaced_run, problem = None, None, None
    if accelerator.is_main_process:  # one process owns the folder; the others hear whether it could
        try:
            run_lock = RunLock(train_config.save_path, tag)
            replaced_run = start_run_folder(run_dir, args.overwrite, bool(args.resume), step3_command(args, tag))
        except PipelineError as error:
            problem = str(error)
    problem = broadcast_object_list([problem])[0]
    if problem:
        raise PipelineError(problem)
    resume_from = resolve_resume(args.resume, run_dir, step3_command(args, tag)) if args.resume else None

    set_seed(train_config.random_seed)
    model = build_model(model_config, step2_manifest["tokenizer"]["vocab_size"], tokenizer.pad_token_id)
    if train_config.freeze_router:
        freeze_routers(model)
    optimizer = optimizer_for(model, train_config.learning_rate, train_config.weight_decay,
                              fused=accelerator.device.type == "cuda")
    batches = TrainBatches(train_set, train_config.batch_size, train_config.random_seed, accelerator.process_index,
                           n_processes, train_config.masking, step2_manifest["tokenizer"],
                           dataset_config.data_params.mask_prob)
    total_steps = train_config.max_steps or train_config.n_epochs * math.ceil(
        batches.per_epoch / train_config.gradient_accumulation_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(train_config.warmup_proportion * total_steps),
                                                total_steps)
    # the scheduler is not prepared: accelerate would step it once per process per step
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    git = git_state()  # this start's code; checkpoints carry state["git"], so a resumed run keeps its first start's
    state = {"tag": tag, "step": 0, "position": [0, 0], "eval_history": [], "aim_run_hash": None, "git": git,
             "resume_git": []}
    if resume_from is not None:
        state = load_checkpoint(resume_from, unwrapped, optimizer, train_config, model_config, step2_hash,
                                step3_command(args, tag))
        scheduler.load_state_dict(state.pop("scheduler"))
        if not restore_rng_states(accelerator, state.pop("rng")):
            print(f"note: {resume_from} was written by {state['n_processes']} processes, this run has {n_processes}: "
                  f"the data order resumes exactly, dropout draws do not")
        print(f"resuming {tag} from {resume_from} (step {state['step']} of {total_steps})")

    n_parameters = sum(parameter.numel() for parameter in model.parameters())
    if resume_from is not None:  # checkpoints written before runs recorded their commit have none
        state.setdefault("git", {"commit": None, "dirty": None})
        state["resume_git"] = [*state.get("resume_git", []), {"step": state["step"], **git}]
    aim_run = start_aim_run(accelerator, tag, train_config.experiment_name, {
        "dataset": dataset_config, "model": model_config, "train": train_config, "tag": tag,
        "vocab_size": unwrapped.config.vocab_size,  # resolved from step 2's tokenizer (model.vocab_size may be null)
        "n_parameters": n_parameters, "git_commit": state["git"]["commit"], "git_dirty": state["git"]["dirty"],
        "resume_git": state["resume_git"], "versions": package_versions(), "n_processes": n_processes,
        "mixed_precision": accelerator.mixed_precision}, state["aim_run_hash"])
    state["aim_run_hash"] = aim_run.hash if aim_run is not None else None
    recorder = RoutingRecorder(unwrapped, unwrapped.config.n_experts, accelerator.device)
    moe_layers = unwrapped.config.moe_layer_indices
    layer_names = [f"block {index}" for index in moe_layers]
    routed = bool(moe_layers) and not unwrapped.config.is_dense_baseline
    # token choice only: an expert-choice layer is balanced by construction
    health = RoutingHealth(len(moe_layers), unwrapped.config.n_experts, layer_names) if (
        routed and unwrapped.config.router_type == "topk") else None
    snapshots_wanted = routed and train_config.routing_snapshots and accelerator.is_main_process
    probe = probe_batches(valid_set, train_config.batch_size) if snapshots_wanted else None
    # a resumed run continues from its checkpoint: snapshots of the steps after it belong to the abandoned stretch
    for later in (step for step in snapshot_steps(run_dir) if step > state["step"]):
        snapshot_path(run_dir, later).unlink()
    previous_snapshot = last_snapshot(run_dir) if probe is not None else None
    snapshot_seconds = 0.0

    def save_checkpoint_now(step: int) -> None:
        rng_states = gather_rng_states(accelerator)  # every process takes part; the main one writes
        if accelerator.is_main_process:
            save_checkpoint(checkpoint_folder(run_dir, step), unwrapped, tokenizer, optimizer, rng_states, {
                **state, "input_manifest_hash": step2_hash,  # a resume on other data is refused
                "scheduler": scheduler.state_dict(), "n_processes": n_processes, "total_steps": total_steps,
                "config": {"model": model_config, "dataset": dataset_config, "train": train_config}})
            prune_checkpoints(run_dir, train_config.keep_checkpoints)
        accelerator.wait_for_everyone()

    print(f"training {n_parameters:,} parameters for {total_steps} steps on {n_processes} x {accelerator.device} "
          f"({len(train_set)} sequences, global batch {train_config.batch_size} x "
          f"{train_config.gradient_accumulation_steps} accumulation, {accelerator.mixed_precision} precision); "
          f"run folder {run_dir}")
    progress = tqdm(initial=state["step"], total=total_steps, desc=f"step 3: training {tag}", unit="step",
                    mininterval=1.0, disable=not accelerator.is_local_main_process)
    model.train()
    started, paused, tokens = time.perf_counter(), 0.0, 0
    with progress, StopRequest() as stop:  # the bar closes before an error line is printed
        steps = batches.steps(*state["position"], train_config.gradient_accumulation_steps)
        while state["step"] < total_steps:
            micro_batches, position = next(steps)
            step = state["step"] + 1
            try:
                result = train_step(accelerator, model, optimizer, scheduler, micro_batches, recorder,
                                    train_config.max_grad_norm, stop.requested, step, supervision_coef)
            except NonFiniteLoss as error:
                kept = complete_checkpoints(run_dir)
                raise PipelineError(f"{error}; stopped before updating the weights. "
                                    + (f"The last checkpoint {kept[-1]} is intact" if kept else "No checkpoint yet")
                                    + "; lower train.learning_rate or train.max_grad_norm") from None
            state["step"], state["position"] = step, list(position)
            tokens += result.real_tokens
            step_counts = recorder.take_step_counts()
            if health is not None:
                counts = accelerator.reduce(step_counts, "sum") if n_processes > 1 else step_counts
                for line in health.add_step(step, counts.cpu().numpy()):
                    progress.write(line)
            if step % train_config.log_steps == 0 or step == total_steps:
                tokens_per_s = tokens / max(time.perf_counter() - started - paused, 1e-9)
                layer_metrics = {**result.layer_metrics, **(health.take_window() if health is not None else {})}
                track_step(aim_run, step, "train", {**result.metrics, "tokens_per_s": tokens_per_s}, layer_metrics,
                           moe_layers)
            progress.update(1)
            progress.set_postfix(loss=f"{result.metrics['loss']:.3f}", refresh=False)
            pause_started = time.perf_counter()
            if step % train_config.eval_steps == 0 or step == total_steps:
                track_expert_load(aim_run, accelerator.reduce(recorder.expert_counts, "sum"), moe_layers, step, "train")
                recorder.expert_counts.zero_()
                evaluation = evaluate_sharded(accelerator, model, valid_set, train_config.batch_size,
                                              train_config.eval_batches, recorder)
                metrics = {"eval_mlm_loss": evaluation.mlm_loss, "eval_accuracy": evaluation.accuracy}
                # the same names as the training metrics, told apart by their context (eval_history keeps its keys)
                track_step(aim_run, step, "valid", {"mlm_loss": evaluation.mlm_loss, "accuracy": evaluation.accuracy},
                           {}, moe_layers)
                track_expert_load(aim_run, evaluation.expert_counts, moe_layers, step, "valid")
                state["valid_expert_counts"] = evaluation.expert_counts.tolist()  # the model card's routing summary
                if probe is not None:
                    snapshot_started = time.perf_counter()
                    recorder.enabled = False  # the probe is not training data
                    snapshot = routing_snapshot(unwrapped, probe, accelerator.device)
                    recorder.enabled = True
                    save_snapshot(run_dir, step, snapshot)
                    if previous_snapshot is not None:
                        track_step(aim_run, step, "valid", {},
                                   {"routing_agreement": top1_agreement(previous_snapshot, snapshot).tolist()},
                                   moe_layers)
                    previous_snapshot = snapshot
                    snapshot_seconds += time.perf_counter() - snapshot_started
                state["eval_history"].append({"step": step, **metrics})
                progress.write(f"step {step}: eval mlm loss {metrics['eval_mlm_loss']:.4f}, "
                               f"accuracy {metrics['eval_accuracy']:.3f}")
            if step % train_config.save_steps == 0 or step == total_steps or result.stop_requested:
                save_checkpoint_now(step)
            paused += time.perf_counter() - pause_started
            if result.stop_requested and step < total_steps:
                progress.close()  # before the message: tqdm redraws on close
                kept = f" (the run it replaces stays in {replaced_run} until this one finishes)" if replaced_run else ""
                print(f"stopped by a signal after step {step}: checkpoint {checkpoint_folder(run_dir, step)}; "
                      f"continue with `{step3_command(args, tag)} --resume latest`{kept}", file=sys.stderr)
                raise SystemExit(128 + (stop.signal_number or 15))

    if accelerator.is_main_process:
        save_model(unwrapped, tokenizer, run_dir / MODEL_DIR, state, card={
            "tag": tag, "dataset": dataset_config, "train": train_config, "data": step2_manifest,
            "eval_history": state["eval_history"], "valid_expert_counts": state.get("valid_expert_counts"),
            "n_parameters": n_parameters, "total_steps": total_steps, "device": str(accelerator.device),
            "n_processes": n_processes, "mixed_precision": accelerator.mixed_precision})
        write_json_atomic(run_dir / "manifest.json", {
            "step": "train", "tag": tag, "input_manifest_hash": step2_hash,
            "git_commit": state["git"]["commit"], "git_dirty": state["git"]["dirty"],  # of the run's first start
            "resume_git": state["resume_git"],  # [{step, commit, dirty}] of each resume
            "versions": package_versions(), "vocab_size": unwrapped.config.vocab_size,
            "config": {"model": model_config, "dataset": dataset_config, "train": train_config},
            "n_parameters": n_parameters, "total_steps": total_steps, "device": str(accelerator.device),
            "n_processes": n_processes, "mixed_precision": accelerator.mixed_precision,
            "resumed_from": str(resume_from) if resume_from else None,
            "seconds": round(time.perf_counter() - started, 2), "aim_run_hash": state["aim_run_hash"],
            "final_eval": state["eval_history"][-1] if state["eval_history"] else None,
            "eval_history": state["eval_history"],  # [{step, eval_mlm_loss, eval_accuracy}]: learning curves
            "routing_snapshots": None if probe is None else {  # step 4 reads the run's saturation off them
                "folder": SNAPSHOT_DIR, "probe_sequences": sum(len(batch["input_ids"]) for batch in probe),
                "probe_tokens": int(previous_snapshot.shape[1]) if previous_snapshot is not None else 0,
                "steps": snapshot_steps(run_dir), "seconds_this_start": round(snapshot_seconds, 2)},
            "router_supervision": None if expert_of_topic is None else {
                "factor": "topic", "coef": supervision_coef, "expert_of_topic": expert_of_topic},
        })
        mark_latest(train_config.save_path, tag)
        finish_run_folder(run_dir, replaced_run)
        run_lock.release()
    # Drop DDP's reducer while the process group is still registered: were the reducer its last owner, gloo's
    # destructor would join its worker threads while holding the GIL they need, and the process would hang.
    del model
    accelerator.free_memory()
    accelerator.end_training()
    print(f"step 3 done: {state['eval_history'][-1] if state['eval_history'] else ''}")
    print(f"wrote {run_dir / MODEL_DIR}/ (next: {step4_command(args, tag)})")


if __name__ == "__main__":
    run_step(main)
