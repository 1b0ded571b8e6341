"""Shared test helpers: run a step script as a user would, tiny configs, and checks on its outputs."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import subprocess
import sys
from pathlib import Path

from config_utils import contracts
from config_utils.contracts import step_script

# the keys step 4's routing_stats.json holds per MoE layer (DESIGN.md's contract)
ROUTING_LAYER_KEYS = {
    "layer",
    "layer_index",
    "nmi",
    "nmi_ci",
    "p_value",
    "js",
    "js_ci",
    "topic_expert_counts",
    "token_class",
    "token_id",
    "conditional_topic",
    "vocabulary",
    "coactivation",
}

REPO = Path(__file__).resolve().parents[1]
STEP_SCRIPTS = {step: step_script(step) for step in contracts.STEP_SCRIPTS}
STEP_MODULES = contracts.STEP_MODULES
DEMO_CONFIGS = [
    "--config-dataset",
    "demo/dataset_params.yaml",
    "--config-model",
    "demo/model_params.yaml",
    "--config-train",
    "demo/train_params.yaml",
]


def step_config_args(step: int) -> list[str]:
    """The demo configs, with the option names each step script takes."""
    if step == 1:
        return ["--config-name", "demo/dataset_params.yaml"]
    if step == 2:
        return DEMO_CONFIGS[:4]
    return list(DEMO_CONFIGS)


def sets(**overrides: object) -> list[str]:
    """sets(**{"dataset.seed": 3}) -> ["--set", "dataset.seed=3"]."""
    args = []
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    return args


def tiny_sets(tmp_path: Path, **extra: object) -> list[str]:
    """A few hundred builtin documents, outputs under tmp_path, a tiny model and a few training steps."""
    overrides = {
        "dataset.load_params.builtin.n_docs": 600,
        "dataset.load_params.train_len": 300,
        "dataset.load_params.valid_len": 40,
        "dataset.load_params.test_len": 40,
        "dataset.load_params.topic_len": 40,
        "dataset.data_params.tokenizer_vocab_size": 300,
        "dataset.data_params.processed_dir": tmp_path / "processed",
        "dataset.data_params.masked_dir": tmp_path / "masked",
        "model.seq_len": 32,
        "model.embedding_dim": 16,
        "model.num_head": 2,
        "model.n_encoder_blocks": 1,
        "model.moe_dim": 16,
        "train.max_steps": 2,
        "train.batch_size": 8,
        "train.eval_steps": 2,
        "train.eval_batches": 1,
        "train.save_steps": 2,
        "train.save_path": tmp_path / "runs",
        "train.aim_repo": tmp_path,
        "train.device": "cpu",
    }
    overrides.update(extra)
    return sets(**overrides)


def prepare_tiny_data(tmp_path: Path, **extra: object) -> list[str]:
    """Steps 1 and 2 on the tiny builtin corpus of tiny_sets (with `extra` overrides); returns the options."""
    options = tiny_sets(tmp_path, **extra)
    check_ok(run_step(1, *step_config_args(1), *options, cwd=tmp_path))
    check_ok(run_step(2, *step_config_args(2), *options, cwd=tmp_path))
    return options


def run_step(step: int, *args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a step script as `python SCRIPT ARGS` from `cwd` (not the repo root: scripts must run from anywhere)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)  # the scripts must find the project themselves
    return subprocess.run(
        [sys.executable, str(STEP_SCRIPTS[step]), *args],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_step_in_process(step: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Like run_step, but calls the script's main() here: no second start of torch (seconds per call).

    The exit path is the script's own (config_utils.cli.run_step); any other exception propagates to the test.
    """
    from config_utils.cli import run_step as run_main

    saved_path, saved_argv, saved_cwd = list(sys.path), list(sys.argv), os.getcwd()
    stdout, stderr = io.StringIO(), io.StringIO()
    returncode = 0
    try:
        module = importlib.import_module(STEP_MODULES[step])  # its import points sys.path[0] at the repo
        sys.argv = [str(STEP_SCRIPTS[step]), *map(str, args)]
        os.chdir(cwd)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            run_main(module.main)
    except SystemExit as exit_:
        returncode = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.path[:], sys.argv = saved_path, saved_argv
        os.chdir(saved_cwd)
    return subprocess.CompletedProcess(sys.argv, returncode, stdout.getvalue(), stderr.getvalue())


def without(options: list[str], *keys: str) -> list[str]:
    """Drop the `--set KEY=...` pairs for these keys from a list of options."""
    kept = []
    for flag, value in zip(options[::2], options[1::2]):
        if not (flag == "--set" and value.split("=", 1)[0] in keys):
            kept += [flag, value]
    return kept


def check_ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def error_line(result: subprocess.CompletedProcess) -> str:
    """Assert the step failed the documented way (exit 2, one 'error:' line last, no traceback); return the line."""
    details = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 2, details
    assert "Traceback" not in result.stderr, details
    lines = [line for line in result.stderr.splitlines() if line.strip()]  # splitlines also splits tqdm's \r
    assert lines, details
    assert lines[-1].startswith("error: "), details
    assert sum(line.startswith("error:") for line in lines) == 1, details
    return lines[-1]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under folder -> (size, mtime_ns), to check a failed step changed nothing."""
    if not folder.exists():
        return {}
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def leftover_temporaries(folder: Path) -> list[Path]:
    """Temporary folders or files of atomic writes (.NAME.tmp-PID / .NAME.old-PID) left behind."""
    if not folder.exists():
        return []
    return [path for path in folder.rglob(".*") if ".tmp" in path.name or ".old-" in path.name]


def small_moe_config(**overrides):
    """A two-block, four-expert model small enough for a unit test; overrides change any setting."""
    from models import MoEEncoderConfig

    settings = dict(
        vocab_size=50,
        embedding_dim=16,
        seq_len=16,
        num_head=2,
        n_encoder_blocks=2,
        n_experts=4,
        top_k_experts=2,
        moe_dim=16,
        dropout=0.0,
    )
    return MoEEncoderConfig(**{**settings, **overrides})


def relative_error(actual, expected) -> float:
    """||actual - expected|| / ||expected||, in float64 on the CPU (tensors of any dtype and device)."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return ((actual - expected).norm() / expected.norm().clamp(min=1e-30)).item()


def forward_with_nan_loss_at(call: int):
    """A replacement MoEEncoderForMaskedLM.forward whose `call`-th training forward returns a NaN MLM loss."""
    from models import MoEEncoderForMaskedLM

    original_forward, calls = MoEEncoderForMaskedLM.forward, []

    def forward(self, *args, **kwargs):
        output = original_forward(self, *args, **kwargs)
        if self.training:
            calls.append(1)
            if len(calls) == call:
                output.mlm_loss = output.mlm_loss * float("nan")
        return output

    return forward
