"""Checkpoints, to resume a run: model, optimizer, scheduler, RNG and data position, written atomically;
finding the newest one, pruning old ones, and turning SIGINT/SIGTERM into "save, then stop".

A checkpoint folder checkpoints/step-NNNNNN/ holds the model and tokenizer (save_pretrained,
safetensors), optimizer.safetensors (the optimizer's tensors), rng.safetensors (each process's torch
RNG states) and trainer_state.json (step, data position, scheduler, optimizer hyperparameters, eval
history, Aim run hash). No pickle anywhere. It is written to a temporary folder and renamed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from config_utils import PipelineError, atomic_dir, first_line, write_json_atomic
from config_utils.contracts import AFTER_TRAINING, CHECKPOINT_DIR, RESUMABLE_CHANGES, STATE_FILE, WEIGHTS_FILE
from config_utils.io import FILE_HASHES, file_sha256, remove_stale_temporaries, use_default_file_modes
from config_utils.schema import recorded_setting
from train.final_model import save_tokenizer, without_transformers_bars

OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
TENSOR_FILES = (WEIGHTS_FILE, OPTIMIZER_FILE, RNG_FILE)


def step_of(folder: Path) -> int:
    """The training step a checkpoint folder (step-NNNNNN) was written at."""
    return int(folder.name.split("-")[1])


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints oldest first; temporary folders of an interrupted write start with '.' and are skipped."""
    folder = run_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.glob("step-*") if (path / STATE_FILE).is_file())


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as flat tensors (for safetensors) + JSON (hyperparameters, non-tensor values)."""
    state_dict = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], saved: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *saved["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [
        {**group, "betas": tuple(group["betas"])} if "betas" in group else group for group in saved["param_groups"]
    ]
    saved_sizes = [len(group["params"]) for group in groups]
    sizes = [len(group["params"]) for group in optimizer.param_groups]
    if saved_sizes != sizes:  # torch would raise a ValueError; same sizes in another order cannot happen (one code)
        raise PipelineError(
            f"its optimizer state has parameter groups of {saved_sizes} tensors and this optimizer {sizes}: it was "
            "made by an earlier version that grouped parameters for weight decay differently (the experts' biases "
            "are no longer decayed)"
        )
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    folder: Path, model, tokenizer, optimizer, rng_states: dict[str, torch.Tensor], state: dict
) -> Path:
    """All or nothing: a crash mid-write leaves the previous checkpoints as they were."""
    tensors, optimizer_json = optimizer_tensors(optimizer)
    with atomic_dir(folder) as tmp_dir, without_transformers_bars():
        model.save_pretrained(str(tmp_dir), safe_serialization=True)
        save_tokenizer(tokenizer, tmp_dir)
        save_file(tensors, str(tmp_dir / OPTIMIZER_FILE))
        save_file(rng_states, str(tmp_dir / RNG_FILE))
        hashes = {name: file_sha256(tmp_dir / name) for name in TENSOR_FILES}  # checked before a resume reads them
        # last: marks it complete
        write_json_atomic(tmp_dir / STATE_FILE, {**state, "optimizer": optimizer_json, FILE_HASHES: hashes})
        use_default_file_modes(tmp_dir)  # safetensors writes 0600; others must be able to read the checkpoint
    return folder


def prune_checkpoints(run_dir: Path, keep: int, save_steps: int | None = None) -> None:
    """Delete all but `keep`: first those an interruption wrote (a step off the save_steps grid) once a newer one
    exists, then the oldest; so the regular checkpoints step 4 --checkpoint reads outlive interruptions. Renamed
    first so a half-deleted folder never looks complete."""
    remove_stale_temporaries(run_dir / CHECKPOINT_DIR)  # of checkpoint writes a killed run left behind
    found = complete_checkpoints(run_dir)
    interrupted = [path for path in found[:-1] if save_steps and step_of(path) % save_steps]
    regular = [path for path in found if path not in interrupted]
    for old in (interrupted + regular)[: max(0, len(found) - keep)]:
        doomed = old.parent / f".{old.name}.deleting-{os.getpid()}"
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def resolve_resume(resume: str, run_dir: Path, run_first: str) -> Path:
    """`latest` = the newest complete checkpoint of this run; otherwise a checkpoint folder."""
    if resume == "latest":
        found = complete_checkpoints(run_dir)
        if not found:
            raise PipelineError(
                f"--resume latest: no checkpoint in {run_dir / CHECKPOINT_DIR}; start the run "
                f"without --resume (`{run_first}`)"
            )
        return found[-1]
    folder = Path(resume)
    if not (folder / STATE_FILE).is_file():
        raise PipelineError(
            f"--resume {resume}: not a checkpoint folder (no {STATE_FILE}); pass latest or a "
            f"path like {run_dir / CHECKPOINT_DIR}/step-000200"
        )
    return folder


def load_checkpoint(
    folder: Path, model, optimizer, train_config: dict, model_config: dict, input_hash: str, restart: str
) -> dict:
    """Restore weights and optimizer in place; return the saved state (step, position, scheduler, ...).

    input_hash: the step-2 manifest hash this run reads now; a checkpoint made on other data is refused
    (restart: the step-3 command that starts the run again, for the message)."""
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        for name, digest in state.pop(FILE_HASHES, {}).items():  # absent in checkpoints written before
            if file_sha256(folder / name) != digest:
                raise ValueError(f"{name} differs from the bytes it was written with")
        weights = load_file(str(folder / WEIGHTS_FILE))
        optimizer_state = load_file(str(folder / OPTIMIZER_FILE))
        state["rng"] = load_file(str(folder / RNG_FILE))
    except Exception as error:  # missing file, truncated safetensors, broken JSON all mean "corrupt"
        reason = first_line(error)
        raise PipelineError(f"checkpoint {folder} is corrupt ({reason}); resume from an older one") from None
    trained_on = state.get("input_manifest_hash")  # absent in checkpoints written before it was recorded
    if trained_on is not None and trained_on != input_hash:
        raise PipelineError(
            f"--resume {folder}: the run was trained on another step-2 output (input hash "
            f"{trained_on}, now {input_hash}: other data or tokenizer); resume with the dataset "
            f"configs it was trained with (its {STATE_FILE} lists them), or start it again on this "
            f"data with `{restart} --overwrite`"
        )
    for role, now in (("model", model_config), ("train", train_config)):
        for key, value in now.items():
            saved = recorded_setting(role, key, state["config"][role], value)  # a key added since: its default
            if saved != value and not (role == "train" and key in RESUMABLE_CHANGES | AFTER_TRAINING):
                raise PipelineError(
                    f"--resume {folder}: the run was trained with {role}.{key}={saved!r} but "
                    f"the configs now say {value!r}; pass --set {role}.{key}={saved}"
                )
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])  # written once, re-tied on load
    if unexpected or set(missing) - tied:
        raise PipelineError(
            f"checkpoint {folder} does not fit the model (missing {sorted(set(missing) - tied)[:3]},"
            f" unexpected {sorted(unexpected)[:3]}); resume with the configs it was made with"
        )
    try:
        restore_optimizer(optimizer, optimizer_state, state.pop("optimizer"))
    except PipelineError as error:
        raise PipelineError(f"checkpoint {folder}: {error}: start the run again with `{restart} --overwrite`") from None
    return state


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint after the current step and exits 128+signal.

    A second Ctrl-C stops at once (KeyboardInterrupt), for when saving is not wanted.
    """

    def __init__(self):
        self.signal_number: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame) -> None:
        if self.signal_number is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_number = number

    @property
    def requested(self) -> bool:
        return self.signal_number is not None
