"""The contracts between steps: which settings an output depends on, and the command that remakes it."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from config_utils.config import CONFIG_DIR
from config_utils.errors import PipelineError
from config_utils.io import current_manifest_hash, read_manifest

REPO = Path(__file__).resolve().parents[1]
# the four steps: their scripts (relative to the repository), in the order they hand files on
STEP_SCRIPTS = {
    1: "data_processors/load_dataset.py",
    2: "data_processors/dataset.py",
    3: "train/train.py",
    4: "inference/inference.py",
}
STEP_MODULES = {step: script[:-3].replace("/", ".") for step, script in STEP_SCRIPTS.items()}


def step_script(step: int) -> Path:
    """The absolute path of step `step`'s script."""
    return REPO / STEP_SCRIPTS[step]


# where outputs go and how many processes make them: they do not change what is made
NOT_CONTENT_KEYS = {"data_params.num_proc", "data_params.processed_dir", "data_params.masked_dir"}
# dataset keys that only step 2 uses; step 1's output does not depend on them
STEP2_ONLY_KEYS = {"data_params.mask_prob", "data_params.tokenizer_name", "data_params.tokenizer_vocab_size"}


def flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def dataset_settings(dataset_config: dict, step: int) -> dict:
    """The dataset keys that step 1 (step=1) or steps 1-2 (step=2) outputs depend on."""
    skip = NOT_CONTENT_KEYS | (STEP2_ONLY_KEYS if step == 1 else set())
    return {key: value for key, value in flatten(dataset_config).items() if key not in skip}


def _sets(args: argparse.Namespace) -> str:
    return "".join(f" --set {shlex.quote(text)}" for text in args.overrides)


def sibling_config(args: argparse.Namespace, role: str) -> str:
    """The config of `role` this run uses: its option if the step has one, else the file beside the dataset config
    (demo/dataset_params.yaml -> demo/model_params.yaml), so a printed command names the same set of configs."""
    given = getattr(args, f"config_{role}", None)
    if given is not None:
        return given
    sibling = args.config_dataset.replace("dataset_params", f"{role}_params")
    return sibling if (CONFIG_DIR / sibling).is_file() or Path(sibling).is_file() else f"{role}_params.yaml"


def step1_command(args: argparse.Namespace) -> str:
    return f"python {STEP_SCRIPTS[1]} --config-name {args.config_dataset}{_sets(args)}"


def step2_command(args: argparse.Namespace) -> str:
    return (
        f"python {STEP_SCRIPTS[2]} --config-dataset {args.config_dataset} "
        f"--config-model {sibling_config(args, 'model')}{_sets(args)}"
    )


def step3_command(args: argparse.Namespace, tag: str | None = None) -> str:
    """Step 3 with this step's configs; `tag` None: the run's --tag if this step has one, else a new tag."""
    tag = tag or getattr(args, "tag", None) or "my-run"
    return (
        f"python {STEP_SCRIPTS[3]} --config-model {sibling_config(args, 'model')} --config-dataset "
        f"{args.config_dataset} --config-train {sibling_config(args, 'train')}{_sets(args)} --tag {tag}"
    )


def step4_command(args: argparse.Namespace, tag: str) -> str:
    return (
        f"python {STEP_SCRIPTS[4]} --config-dataset {args.config_dataset} --config-model "
        f"{sibling_config(args, 'model')} --config-train {sibling_config(args, 'train')}{_sets(args)} --run {tag}"
    )


def check_settings(expected: dict, found: dict, what: str, run_first: str) -> None:
    """Stop when an input was made with settings that differ from the ones this step runs with."""
    for key, value in expected.items():
        if key not in found or found[key] != value:
            raise PipelineError(
                f"{what} was made with {key}={found.get(key)!r} but the configs now say "
                f"{key}={value!r}: run `{run_first}` again (or pass the same --set options)"
            )


def read_step2_output(dataset_config: dict, model_config: dict, args: argparse.Namespace) -> tuple[dict, str]:
    """Step 2's manifest, checked against the configs steps 3 and 4 run with."""
    masked_dir = Path(dataset_config["data_params"]["masked_dir"])
    manifest, manifest_hash = read_manifest(masked_dir, step2_command(args))
    # the whole chain: step 2's input must still be the step-1 output that is there now
    processed_dir = Path(dataset_config["data_params"]["processed_dir"])
    step1_hash = current_manifest_hash(processed_dir)
    if step1_hash is not None and step1_hash != manifest.get("input_manifest_hash"):
        raise PipelineError(
            f"{masked_dir} was made from an earlier step-1 output: {processed_dir} has been remade "
            f"since; run `{step2_command(args)}` again"
        )
    check_settings(
        dataset_settings(dataset_config, step=2), manifest["dataset_settings"], str(masked_dir), step2_command(args)
    )
    if model_config["seq_len"] != manifest["seq_len"]:
        raise PipelineError(
            f"model seq_len={model_config['seq_len']} but {masked_dir} holds sequences of "
            f"{manifest['seq_len']} tokens: run `{step2_command(args)}` again, or set "
            f"model.seq_len={manifest['seq_len']}"
        )
    vocab_size = manifest["tokenizer"]["vocab_size"]
    if model_config["vocab_size"] is not None and model_config["vocab_size"] != vocab_size:
        raise PipelineError(
            f"model vocab_size={model_config['vocab_size']} but the tokenizer in {masked_dir} "
            f"has {vocab_size} tokens: set model.vocab_size to null (= the tokenizer's) or "
            f"{vocab_size}"
        )
    return manifest, manifest_hash


def check_run_data(run_manifest: dict, run_dir: Path, step2_hash: str, args: argparse.Namespace) -> None:
    """A run is evaluated only on the step-2 output it was trained on (same tokenizer, same splits)."""
    trained_on = run_manifest.get("input_manifest_hash")
    if trained_on != step2_hash:
        raise PipelineError(
            f"run {run_dir} was trained on another step-2 output (input hash {trained_on}) than the "
            f"one in the configured masked_dir now (hash {step2_hash}): pass the dataset configs it "
            f"was trained with, or train it again on this data with "
            f"`{step3_command(args, run_dir.name)} --overwrite`"
        )


# the run folder as step 3 writes it, and step 4 and the sweep read it
MODEL_DIR = "model"  # run_dir/model/: the final model
CHECKPOINT_DIR = "checkpoints"  # run_dir/checkpoints/step-NNNNNN/
STATE_FILE = "trainer_state.json"  # in a checkpoint: step, data position, configs, its files' hashes
WEIGHTS_FILE = "model.safetensors"  # in the final model's folder and in every checkpoint


def checkpoint_folder(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step-{step:06d}"


# train keys that do not change what a resumed run computes
RESUMABLE_CHANGES = {
    "eval_steps",
    "eval_batches",
    "log_steps",
    "save_steps",
    "keep_checkpoints",
    "save_path",
    "experiment_name",
    "device",
    "aim_repo",
    "compile",
    "routing_snapshots",
    "router_topic_map",  # its path (another clone's differs); what it told the routers is compared by same_families
}


# train keys that act only after the last training step (train/router_refit.py): a checkpoint of a run resumes with
# another value, and the routers are fitted again from the final one
AFTER_TRAINING = {"router_refit_batches"}


def same_families(record: dict, topic_map_now: str | None, families_now: dict | None) -> bool:
    """Whether a run's manifest or checkpoint state records the families its routers would be told now
    (train.router_topic_map): by each train topic's family, so that the same map under another path matches and an
    edited one does not. A record written before it kept the families is compared by the map's path."""
    supervision = record.get("router_supervision") or {}
    if "family_of_topic" in supervision:
        return supervision["family_of_topic"] == families_now
    return (record.get("config") or {}).get("train", {}).get("router_topic_map") == topic_map_now
