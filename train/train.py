r"""Step 3: train the MoE encoder with masked language modelling, tracked in Aim.

Reads data_params.masked_dir (step 2); writes train.save_path/<tag>/: checkpoints/step-N/, the final
model/ (Hugging Face format, safetensors, with its tokenizer) and manifest.json; the Aim run (named
by --tag) goes to the Aim repository in train.aim_repo (`aim up` there shows it). Example:
    python train/train.py --config-model demo/model_params.yaml --config-dataset demo/dataset_params.yaml \
        --config-train demo/train_params.yaml --tag demo
"""
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a script: import the project, not this folder

import math
import time

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoTokenizer, get_linear_schedule_with_warmup

from config_utils import PipelineError, load_step_configs, run_step, step_parser, write_json_atomic
from config_utils.contracts import read_step2_output
from data_processors.masking import IGNORE_INDEX
from models import MoEEncoderConfig, MoEEncoderForMaskedLM
from train.checkpoints import CHECKPOINT_DIR, MODEL_DIR, git_commit, mark_latest, run_dir_for, save_model
from train.evaluation import count_experts, evaluate_mlm, mlm_loader


def build_model(model_config: dict, vocab_size: int, pad_token_id: int) -> MoEEncoderForMaskedLM:
    settings = {**model_config, "vocab_size": vocab_size}
    try:
        return MoEEncoderForMaskedLM(MoEEncoderConfig(**settings, pad_token_id=pad_token_id))
    except ValueError as error:  # e.g. embedding_dim not divisible by num_head
        raise PipelineError(f"model config: {error}") from None


def optimizer_for(model: torch.nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; biases and LayerNorm weights are not decayed (BERT's recipe)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        (no_decay if parameter.ndim < 2 or "norm" in name else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate)


def track_expert_load(tracker, expert_counts: torch.Tensor, moe_layers: list[int], step: int, subset: str) -> None:
    """Per-layer share of real tokens sent to each expert, as Aim contexts (layer, expert)."""
    if tracker is None:
        return
    shares = expert_counts.float() / expert_counts.sum(dim=1, keepdim=True).clamp(min=1)
    for row, layer in enumerate(moe_layers):
        for expert, share in enumerate(shares[row].tolist()):
            tracker.track(share, name="expert_load", step=step,
                          context={"subset": subset, "layer": layer, "expert": expert})


def main() -> None:
    parser = step_parser(__doc__, {"model": ("--config-model", "model_params.yaml"),
                                   "dataset": ("--config-dataset", "dataset_params.yaml"),
                                   "train": ("--config-train", "train_params.yaml")})
    parser.add_argument("--tag", default=None,
                        help="names the run (its folder save_path/<tag> and its Aim tag); default: a timestamp")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run with the same tag")
    args = parser.parse_args()
    configs = load_step_configs(args, ["model", "dataset", "train"])
    model_config, dataset_config, train_config = configs["model"], configs["dataset"], configs["train"]
    tag = args.tag or time.strftime("run-%Y%m%d-%H%M%S")
    run_dir = run_dir_for(train_config.save_path, tag)
    if (run_dir / MODEL_DIR).exists() and not args.overwrite:
        raise PipelineError(f"run {run_dir} already exists: pick another --tag or pass --overwrite")
    step2_manifest, step2_hash = read_step2_output(dataset_config, model_config, args)
    if train_config.device == "cuda" and not torch.cuda.is_available():
        raise PipelineError("train config: device=cuda but no CUDA device is visible; use device: auto or cpu")

    masked_dir = Path(dataset_config.data_params.masked_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(masked_dir / "tokenizer"))
    train_set = datasets.load_from_disk(str(masked_dir / "train"))
    valid_set = datasets.load_from_disk(str(masked_dir / "valid"))

    accelerator = Accelerator(cpu=train_config.device == "cpu", log_with="aim",
                              project_dir=train_config.aim_repo,
                              gradient_accumulation_steps=train_config.gradient_accumulation_steps)
    set_seed(train_config.random_seed)
    model = build_model(model_config, step2_manifest["tokenizer"]["vocab_size"], tokenizer.pad_token_id)
    train_loader = mlm_loader(train_set, train_config.batch_size, shuffle=True, seed=train_config.random_seed)
    valid_loader = mlm_loader(valid_set, train_config.batch_size)
    steps_per_epoch = math.ceil(len(train_loader) / train_config.gradient_accumulation_steps)
    total_steps = train_config.max_steps or train_config.n_epochs * steps_per_epoch
    optimizer = optimizer_for(model, train_config.learning_rate, train_config.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(train_config.warmup_proportion * total_steps),
                                                total_steps)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)

    n_parameters = sum(parameter.numel() for parameter in model.parameters())
    accelerator.init_trackers(tag, config={"dataset": dataset_config, "model": model_config, "train": train_config,
                                           "tag": tag, "n_parameters": n_parameters, "git_commit": git_commit()},
                              init_kwargs={"aim": {"experiment": train_config.experiment_name}})
    tracker = accelerator.get_tracker("aim", unwrap=True) if accelerator.is_main_process else None
    if tracker is not None:
        tracker.add_tag(tag)
    unwrapped = accelerator.unwrap_model(model)
    moe_layers = unwrapped.config.moe_layer_indices
    state = {"tag": tag, "step": 0, "epoch": 0, "eval_history": []}

    def run_eval(step: int) -> dict:
        result = evaluate_mlm(model, valid_loader, accelerator.device, train_config.eval_batches)
        metrics = {"eval_mlm_loss": result.mlm_loss, "eval_accuracy": result.accuracy}
        accelerator.log(metrics, step=step)
        track_expert_load(tracker, result.expert_counts, moe_layers, step, "valid")
        state["eval_history"].append({"step": step, **metrics})
        return metrics

    print(f"training {n_parameters:,} parameters for {total_steps} steps on {accelerator.device} "
          f"({len(train_set)} sequences, batch {train_config.batch_size}); run folder {run_dir}")
    started = time.time()
    progress = tqdm(total=total_steps, desc=f"step 3: training {tag}", unit="step", mininterval=1.0,
                    disable=not accelerator.is_local_main_process)
    model.train()
    step_expert_counts = torch.zeros(len(moe_layers), unwrapped.config.n_experts, dtype=torch.long,
                                     device=accelerator.device)
    tokens_seen = 0
    while state["step"] < total_steps:
        for batch in train_loader:
            with accelerator.accumulate(model):
                output = model(**batch)
                accelerator.backward(output.loss)
                if accelerator.sync_gradients and train_config.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(model.parameters(), train_config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            step_expert_counts += count_experts(output.expert_indices, unwrapped.config.n_experts)
            tokens_seen += int(batch["attention_mask"].sum())
            if not accelerator.sync_gradients:
                continue
            state["step"] += 1
            step = state["step"]
            loss = output.loss.item()
            if not math.isfinite(loss):
                raise PipelineError(f"the loss became {loss} at step {step}; lower train.learning_rate "
                                    f"(the last checkpoint in {run_dir / CHECKPOINT_DIR} is intact)")
            is_masked = batch["labels"] != IGNORE_INDEX
            accuracy = (output.logits.detach().argmax(-1)[is_masked] == batch["labels"][is_masked]).float().mean()
            accelerator.log({"loss": loss, "mlm_loss": output.mlm_loss.item(), "aux_loss": output.aux_loss.item(),
                             "z_loss": output.z_loss.item(), "accuracy": accuracy.item(),
                             "learning_rate": scheduler.get_last_lr()[0],
                             "tokens_per_s": tokens_seen / max(time.time() - started, 1e-9)}, step=step)
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.3f}", mlm=f"{output.mlm_loss.item():.3f}")
            if step % train_config.eval_steps == 0 or step == total_steps:
                track_expert_load(tracker, step_expert_counts, moe_layers, step, "train")
                step_expert_counts.zero_()
                metrics = run_eval(step)
                progress.write(f"step {step}: eval mlm loss {metrics['eval_mlm_loss']:.4f}, "
                               f"accuracy {metrics['eval_accuracy']:.3f}")
            if (step % train_config.save_steps == 0 or step == total_steps) and accelerator.is_main_process:
                save_model(accelerator.unwrap_model(model), tokenizer,
                           run_dir / CHECKPOINT_DIR / f"step-{step:06d}", state)
            if step >= total_steps:
                break
        state["epoch"] += 1
    progress.close()

    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), tokenizer, run_dir / MODEL_DIR, state)
        aim_run_hash = tracker.hash if tracker is not None else None
        write_json_atomic(run_dir / "manifest.json", {
            "step": "train", "tag": tag, "input_manifest_hash": step2_hash, "git_commit": git_commit(),
            "config": {"model": model_config, "dataset": dataset_config, "train": train_config},
            "n_parameters": n_parameters, "total_steps": total_steps, "device": str(accelerator.device),
            "seconds": round(time.time() - started, 2), "aim_run_hash": aim_run_hash,
            "final_eval": state["eval_history"][-1] if state["eval_history"] else None,
        })
        mark_latest(train_config.save_path, tag)
    accelerator.end_training()
    print(f"step 3 done: {state['eval_history'][-1] if state['eval_history'] else ''}")
    print(f"wrote {run_dir / MODEL_DIR}/ (next: python inference/inference.py)")


if __name__ == "__main__":
    run_step(main)
