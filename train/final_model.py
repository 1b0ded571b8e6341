"""A run's final model: model/ in Hugging Face format (safetensors, tokenizer, model card), written atomically;
save_path/latest naming the last finished run; finding and loading a run's model for step 4."""

from __future__ import annotations

import contextlib
from pathlib import Path

from transformers.utils import logging as transformers_logging

from config_utils import PipelineError, atomic_dir, first_line, write_json_atomic
from config_utils.contracts import MODEL_DIR, WEIGHTS_FILE
from config_utils.io import use_default_file_modes
from data_processors.tokenizer import drop_load_options
from train.model_card import model_card

LATEST_FILE = "latest"  # save_path/latest names the last finished run, for step 4's default
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]  # the encoder takes no token_type_ids


@contextlib.contextmanager
def without_transformers_bars():
    """transformers' own bars ("Writing model shards", "Loading weights") for one file would cut through step 3's
    and step 4's; hidden for the call, restored after."""
    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


def save_tokenizer(tokenizer, folder: Path) -> None:
    """Saved so that pipeline("fill-mask") feeds the model only what its forward takes, and without the options
    it was loaded with (AutoTokenizer.from_pretrained of a folder records is_local and local_files_only)."""
    tokenizer.model_input_names = MODEL_INPUT_NAMES
    tokenizer.init_kwargs["model_input_names"] = MODEL_INPUT_NAMES  # what save_pretrained writes
    drop_load_options(tokenizer)
    tokenizer.save_pretrained(str(folder))


def save_model(model, tokenizer, folder: Path, state: dict, card: dict | None = None) -> Path:
    """save_pretrained (safetensors, plus the modeling code and auto_map, see models/__init__.py) + tokenizer +
    a small JSON state + the model card README.md, all or nothing.

    card: what the model card reports beyond the model itself (see train.model_card.model_card).
    """
    card = {**(card or {}), "architecture": model.config.to_dict(), "mask_token": tokenizer.mask_token}
    with atomic_dir(folder) as tmp_dir, without_transformers_bars():
        model.save_pretrained(str(tmp_dir), safe_serialization=True)
        save_tokenizer(tokenizer, tmp_dir)
        write_json_atomic(tmp_dir / "trainer_state.json", state)
        (tmp_dir / "README.md").write_text(model_card(card), encoding="utf-8")
        use_default_file_modes(tmp_dir)  # safetensors writes 0600; others must be able to read the model
    return folder


def mark_latest(save_path: str, tag: str) -> None:
    tmp = Path(save_path) / f".{LATEST_FILE}.tmp"
    tmp.write_text(tag + "\n", encoding="utf-8")
    tmp.replace(Path(save_path) / LATEST_FILE)


def find_run(save_path: str, run: str | None, run_first: str) -> Path:
    """`run` is a tag under save_path, a path, or None for the last finished run."""
    if run is None:
        latest = Path(save_path) / LATEST_FILE
        if not latest.is_file():
            raise PipelineError(
                f"no finished training run in {save_path}/: run `{run_first}` first, or pass --run PATH"
            )
        run = latest.read_text(encoding="utf-8").strip()
    run_dir = Path(run) if Path(run).is_dir() else Path(save_path) / run
    if not (run_dir / MODEL_DIR).is_dir():
        raise PipelineError(
            f"run '{run}' has no finished model ({run_dir / MODEL_DIR} missing): run `{run_first}` first"
        )
    return run_dir


def load_model(folder: Path):
    """Load a saved model; a missing or corrupt checkpoint becomes a one-line error."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    import models  # noqa: F401  registers the encoder with the Auto classes

    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise PipelineError(f"{weights} is missing: the checkpoint is incomplete; train the run again")
    try:
        with without_transformers_bars():
            model = AutoModelForMaskedLM.from_pretrained(str(folder))
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as error:  # safetensors, json and shape errors all mean "corrupt"
        reason = first_line(error)
        raise PipelineError(f"checkpoint {folder} is corrupt ({reason}); train the run again") from None
    return model, tokenizer
