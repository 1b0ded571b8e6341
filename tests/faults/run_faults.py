"""Fault injection against the step scripts: corrupt inputs, kill -9, races, odd corpora, odd configs.

Not a pytest module: a standalone probe that prints one row per case (name, command, exit code, first meaningful
line, verdict) and exits 1 if any case FAILs. It imports nothing from the checkout under test: every step runs as
`python REPO/<script>` in a subprocess, so --repo can point at an older commit in a git worktree.

    .venv/bin/python tests/faults/run_faults.py                      # every case but the slow ones
    .venv/bin/python tests/faults/run_faults.py --only corpus --only kill/step4 --markdown faults.md
    .venv/bin/python tests/faults/run_faults.py --only slow           # the sweep and study kill cases

A refusal is correct when it is exit 2 with exactly one `error: ` line, last on stderr, no traceback anywhere, no
`.NAME.tmp-PID` / `.old-PID` temporaries left and nothing that existed before changed. Steps 1-4 run once on a tiny
builtin corpus as a shared base; each case works on its own copy under --workdir/cases/<case>.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

SCRIPTS = {
    1: "data_processors/load_dataset.py",
    2: "data_processors/dataset.py",
    3: "train/train.py",
    4: "inference/inference.py",
    "sweep": "process_exp_results/sweep.py",
    "study": "process_exp_results/study.py",
}
ALL_CONFIGS = ["--config-dataset", "demo/dataset_params.yaml", "--config-model", "demo/model_params.yaml"]
ALL_CONFIGS += ["--config-train", "demo/train_params.yaml"]
CONFIGS = {1: ["--config-name", "demo/dataset_params.yaml"], 2: ALL_CONFIGS[:4], 3: ALL_CONFIGS, 4: ALL_CONFIGS}
TINY = {  # tests/helpers.py tiny_sets, with four training steps and a checkpoint every two
    "dataset.load_params.builtin.n_docs": 600,
    "dataset.load_params.train_len": 300,
    "dataset.load_params.valid_len": 40,
    "dataset.load_params.test_len": 40,
    "dataset.load_params.topic_len": 40,
    "dataset.data_params.tokenizer_vocab_size": 300,
    "model.seq_len": 32,
    "model.embedding_dim": 16,
    "model.num_head": 2,
    "model.n_encoder_blocks": 1,
    "model.moe_dim": 16,
    "train.max_steps": 4,
    "train.batch_size": 8,
    "train.eval_steps": 2,
    "train.eval_batches": 1,
    "train.save_steps": 2,
    "train.device": "cpu",
}
PATH_KEYS = ("dataset.data_params.processed_dir", "dataset.data_params.masked_dir", "train.save_path", "train.aim_repo")
STEP4_FAST = ["--n-boot", "5", "--n-perm", "5", "--n-random-routers", "2"]
BASE_PARTS = ("processed", "masked", "runs", "results", ".aim")
REFUSE, WORKS, EITHER, SAME = "refuse", "works", "refuse-or-works", "rerun-equal"
TEMPORARY = re.compile(r"^\..+\.(tmp|old|deleting)-\d+$")
PROGRESS = re.compile(r"\d+%\||\d+it \[|it/s\]|s/it\]|step/s|s/step")  # tqdm bars are not output lines
VOLATILE = re.compile(r"seconds|^time|_time$|date|started|finished|duration|^git|versions|aim_run_hash|created", re.I)
TIME_ESTIMATE = re.compile(r"\d[\d.,]*\s*(s|sec|seconds?|min|minutes?|h|hours?|days?)\b", re.I)


@dataclass
class Run:
    short: str
    rc: int | None
    out: str
    err: str
    seconds: float
    limit: float
    timed_out: bool = False


@dataclass
class Outcome:
    cmd: str
    rc: object
    line: str
    verdict: str  # ok | FAIL | skip
    reason: str = ""


@dataclass
class Case:
    name: str
    expect: str
    fn: Callable
    slow: bool = False  # left out unless --slow or --only names it
    alone: bool = False  # timing matters (kills, races, time limits): run when no other case runs
    base: bool = True  # needs the shared base (steps 1-4 done once)

    @property
    def group(self) -> str:
        return self.name.split("/")[0]


CASES: list[Case] = []


def case(name: str, expect: str, **flags):
    def register(fn):
        CASES.append(Case(name, expect, fn, **flags))
        return fn

    return register


class Probe:
    """What every case shares: the checkout under test, the work folder, the step environment, the base."""

    def __init__(self, args: argparse.Namespace):
        self.repo = Path(args.repo).resolve()
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix="faults-")).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        os.chmod(self.work, 0o755)  # an unprivileged user must reach the case folders
        self.timeout = args.timeout
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.env.pop("PYTHONPATH", None)
        if args.jobs > 1:  # the same thread count for every run, base included: reruns must compare equal
            self.env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
        self.base = self.work / "base"
        self._base_lock, self._base_error, self._unprivileged = threading.Lock(), None, None

    def ensure_base(self) -> None:
        with self._base_lock:
            if self._base_error is None and not (self.base / "results" / "base" / "metrics.csv").is_file():
                ctx = Ctx(self, "base", folder=self.base)
                for step, args in ((1, []), (2, []), (3, ["--tag", "base"]), (4, ["--run", "base", *STEP4_FAST])):
                    run = ctx.step(step, *args)
                    log(f"base: step {step} exit {run.rc} in {run.seconds:.1f} s")
                    if run.rc != 0:
                        self._base_error = f"base step {step} exit {run.rc}: {first_line(run)}"
                        break
            if self._base_error:
                raise RuntimeError(self._base_error)

    def unprivileged(self) -> tuple[list[str], str] | None:
        """A prefix that runs a command without root's bypass of file modes, and what it is."""
        with self._base_lock:
            if self._unprivileged is None:
                self._unprivileged = self._find_unprivileged()
            return self._unprivileged or None

    def _find_unprivileged(self):
        if os.geteuid() != 0:
            return [], "as this user"
        probe = [sys.executable, "-c", f"import torch, os; os.stat({str(self.repo / SCRIPTS[3])!r})"]
        for prefix, what in (
            (["runuser", "-u", "nobody", "--"], "as nobody"),
            (
                [
                    "setpriv",
                    "--bounding-set=-dac_override,-dac_read_search",
                    "--inh-caps=-dac_override,-dac_read_search",
                ],
                "as root without CAP_DAC_OVERRIDE (nobody cannot run this venv's python)",
            ),
        ):
            if shutil.which(prefix[0]):
                done = subprocess.run([*prefix, *probe], capture_output=True, cwd="/", env=self.env, timeout=120)
                if done.returncode == 0:
                    return prefix, what
        return False


class Ctx:
    """One case's folder and its step runs."""

    def __init__(self, probe: Probe, name: str, folder: Path | None = None):
        self.probe, self.name = probe, name.replace("/", "__")
        self.dir = folder or probe.work / "cases" / self.name
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.count = 0

    def copy_base(self, *parts: str) -> None:
        for part in parts or BASE_PARTS:
            source = self.probe.base / part
            if source.is_dir():
                shutil.copytree(source, self.dir / part, symlinks=True)

    def sets(self, over: dict | None = None, root: Path | None = None) -> list[str]:
        root = root or self.dir
        paths = dict(zip(PATH_KEYS, (root / "processed", root / "masked", root / "runs", root)))
        merged = {**TINY, **paths, **(over or {})}
        return [text for key, value in merged.items() if value is not None for text in ("--set", f"{key}={value}")]

    def rel(self, text: str) -> str:
        text = text.replace(str(self.dir), ".").replace(str(self.probe.base), "BASE")
        return text if len(text) <= 60 else text[:45] + f"...({len(text)} chars)"

    def short(self, step, args, over, configs=None) -> str:
        words = [f"s{step}" if isinstance(step, int) else step, *map(str, configs or []), *map(str, args)]
        words += [f"--set {key}={value}" for key, value in (over or {}).items() if value is not None]
        return " ".join(self.rel(word) for word in words)

    def argv(self, step, args, over, configs) -> list[str]:
        configs = CONFIGS[step] if configs is None else configs
        return [sys.executable, str(self.probe.repo / SCRIPTS[step]), *configs, *self.sets(over), *map(str, args)]

    def step(self, step, *args, over=None, configs=None, timeout=None, wrap=(), env=None) -> Run:
        argv = [*wrap, *self.argv(step, args, over, configs)]
        return self.command(argv, self.short(step, args, over, configs), timeout, env)

    def _logs(self):
        self.count += 1
        stem = self.probe.work / "logs" / f"{self.name}.{self.count}"
        stem.parent.mkdir(exist_ok=True)
        return Path(f"{stem}.out"), Path(f"{stem}.err")

    def start(self, argv: list[str], env=None):
        """Popen in its own process group, output to log files (a full pipe would stall the step)."""
        out_path, err_path = self._logs()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            process = subprocess.Popen(
                argv,
                cwd=self.dir,
                env=env or self.probe.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        return process, out_path, err_path

    def finish(self, started, short: str, began: float, limit: float) -> Run:
        process, out_path, err_path = started
        try:
            process.wait(timeout=max(0.1, limit - (time.monotonic() - began)))
            timed_out = False
        except subprocess.TimeoutExpired:
            kill_group(process)
            timed_out = True
        read = lambda path: path.read_text(encoding="utf-8", errors="replace")  # noqa: E731
        seconds = time.monotonic() - began
        return Run(short, process.returncode, read(out_path), read(err_path), seconds, limit, timed_out)

    def command(self, argv: list[str], short: str, timeout=None, env=None) -> Run:
        limit = timeout or self.probe.timeout
        began = time.monotonic()
        return self.finish(self.start(argv, env), short, began, limit)


# ---- checks ---------------------------------------------------------------------------------------------------------


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def lines_of(text: str) -> list[str]:
    return [line.strip() for line in re.split(r"[\r\n]", text) if line.strip() and not PROGRESS.search(line)]


def first_line(run: Run) -> str:
    errors = [line for line in lines_of(run.err) if line.startswith("error:")]
    return (errors or lines_of(run.err) or lines_of(run.out) or [""])[-1 if errors else 0]


def digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under folder -> (size, sha1); lock files are not outputs."""
    return {
        str(path.relative_to(folder)): (path.stat().st_size, digest(path))
        for path in sorted(folder.rglob("*"))
        if not path.is_symlink() and path.is_file() and not path.name.endswith(".lock")
    }


def leftovers(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob(".*") if TEMPORARY.match(path.name))


def changes(folder: Path, before: dict) -> list[str]:
    after = snapshot(folder)
    changed = [f"changed {name}" for name in before if name in after and after[name] != before[name]]
    gone = [f"removed {name}" for name in before if name not in after]
    new = [f"new {name}" for name in after if name not in before]
    return changed + gone + new


def listing(items: list[str], most: int = 3) -> str:
    return ", ".join(items[:most]) + (f" (+{len(items) - most})" if len(items) > most else "")


def refusal_problems(run: Run) -> list[str]:
    lines = [line for line in re.split(r"[\r\n]", run.err) if line.strip()]
    problems = []
    if "Traceback" in run.err + run.out:
        problems.append("traceback")
    if not lines or not lines[-1].startswith("error: "):
        problems.append("last stderr line is not 'error: '")
    if sum(line.startswith("error:") for line in lines) > 1:
        problems.append("several 'error:' lines")
    return problems


def judge(ctx: Ctx, run: Run, expect: str, before: dict | None = None, check=None, prefix="", ignore=()) -> Outcome:
    """The verdict on the case's last run: exit code, the one error line, temporaries, untouched earlier output
    (before: the case folder's snapshot; ignore: path prefixes a refusal may change)."""
    cmd, line = prefix + run.short, first_line(run)[:400]
    if run.timed_out:
        return Outcome(cmd, "timeout", line, "FAIL", f"ran past {run.limit:.0f} s")
    if run.rc == 0 and expect in (WORKS, EITHER):
        problems, what = [], "works"
        if "Traceback" in run.err:
            problems.append("traceback on stderr")
    elif run.rc == 2 and expect in (REFUSE, EITHER):
        problems, what = refusal_problems(run), "refused in one line"
        changed = (
            [c for c in changes(ctx.dir, before) if not c.split(" ", 1)[1].startswith(ignore)]
            if before is not None
            else []
        )
        problems += [listing(changed)] if changed else []
    else:
        tail = " (traceback)" if "Traceback" in run.err else ""
        return Outcome(cmd, run.rc, line, "FAIL", f"expected {expect}, got exit {run.rc}{tail}")
    if leftovers(ctx.dir):
        problems.append("temporaries left: " + listing(leftovers(ctx.dir)))
    extra = check(run) if check else None
    problems += [extra] if extra else []
    return Outcome(cmd, run.rc, line, "FAIL" if problems else "ok", "; ".join(problems) or what)


def must_say(*texts: str):
    """An extra check for a refusal: its line contains these texts."""
    return lambda run: None if run.rc != 2 or all(t in first_line(run) for t in texts) else f"line lacks {texts!r}"


# ---- comparing a rerun with an uninterrupted run ----------------------------------------------------------------


def normal_json(value, roots: tuple[str, ...]):
    if isinstance(value, dict):
        return {key: normal_json(item, roots) for key, item in value.items() if not VOLATILE.search(str(key))}
    if isinstance(value, list):
        return [normal_json(item, roots) for item in value]
    if isinstance(value, str):
        for root in roots:
            value = value.replace(root, "<ROOT>")
    return value


def normal_text(text: str, roots: tuple[str, ...]) -> str:
    for root in roots:
        text = text.replace(root, "<ROOT>")
    return re.sub(r"\d+(\.\d+)?\s*(s|min)\b", "<T>", text)


def same_content(a: Path, b: Path, roots: tuple[str, ...]) -> bool:
    if a.read_bytes() == b.read_bytes():
        return True
    suffix = a.suffix
    try:
        if suffix == ".json":
            load = lambda p: normal_json(json.loads(p.read_text(encoding="utf-8")), roots)  # noqa: E731
            return load(a) == load(b)
        if suffix in (".csv", ".md", ".html", ".txt", ".py", ".yaml", ".jsonl"):
            return normal_text(a.read_text(errors="replace"), roots) == normal_text(
                b.read_text(errors="replace"), roots
            )
        if suffix in (".parquet", ".arrow"):
            return read_table(a).equals(read_table(b))
        if suffix == ".safetensors":
            import torch
            from safetensors.torch import load_file

            ta, tb = load_file(str(a)), load_file(str(b))
            return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
        if suffix == ".npy":
            import numpy as np

            return np.array_equal(np.load(a), np.load(b))
    except Exception:  # unreadable on either side: they differ
        return False
    return False


def read_table(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        return pq.read_table(path)
    with pa.memory_map(str(path)) as source:
        try:
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            return pa.ipc.open_file(source).read_all()


def compare_trees(got: Path, want: Path, roots: tuple[Path, ...], skip=lambda rel: False) -> list[str]:
    """Files that differ in content (volatile JSON keys, timings and the roots, the two folders that hold the
    compared runs, aside), are missing or extra."""
    roots = tuple(sorted({str(root) for root in roots}, key=len, reverse=True))
    files = lambda root: {  # noqa: E731
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not p.name.endswith(".lock") and not skip(str(p.relative_to(root)))
    }
    mine, theirs = files(got) if got.exists() else set(), files(want)
    diffs = [f"missing {name}" for name in sorted(theirs - mine)] + [f"extra {name}" for name in sorted(mine - theirs)]
    return diffs + [name for name in sorted(mine & theirs) if not same_content(got / name, want / name, roots)]


# ---- file damage ----------------------------------------------------------------------------------------------------


def flip(path: Path, n: int) -> None:
    data = bytearray(path.read_bytes())
    start = max(0, len(data) // 2 - n // 2)
    for i in range(start, min(len(data), start + n)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "empty": lambda path: path.write_bytes(b""),
    "flipped": lambda path: flip(path, 64),
}


def interrupted_base(ctx: Ctx) -> Path:
    """The base run as if killed after its step-2 checkpoint: no model, manifest or step-4 checkpoint."""
    ctx.copy_base("processed", "masked", "runs", ".aim")
    run = ctx.dir / "runs" / "base"
    for path in (run / "model", run / "checkpoints" / "step-000004"):
        shutil.rmtree(path)
    (run / "manifest.json").unlink()
    for snap in (run / "routing_snapshots").glob("step-000004*"):
        snap.unlink()
    return run / "checkpoints" / "step-000002"


def step4(ctx: Ctx, *extra, save_path: Path | None = None, **kw) -> Run:
    return ctx.step(4, "--run", "base", *STEP4_FAST, "--save_path", save_path or ctx.dir / "results", *extra, **kw)


# ---- [corrupt] ------------------------------------------------------------------------------------------------------

for _how, _damage in DAMAGE.items():

    @case(f"corrupt/final_model_{_how}", REFUSE)
    def _final_model(ctx, damage=_damage):
        ctx.copy_base("processed", "masked", "runs", ".aim")
        damage(ctx.dir / "runs/base/model/model.safetensors")
        before = snapshot(ctx.dir)
        return judge(ctx, step4(ctx), REFUSE, before)

    for _file in ("model", "optimizer"):

        @case(f"corrupt/checkpoint_{_file}_{_how}", REFUSE)
        def _checkpoint(ctx, damage=_damage, file=_file):
            damage(interrupted_base(ctx) / f"{file}.safetensors")
            before = snapshot(ctx.dir)
            return judge(ctx, ctx.step(3, "--tag", "base", "--resume", "latest"), REFUSE, before)


for _split in ("test", "train"):

    @case(f"corrupt/step1_{_split}_parquet_flipped", REFUSE)
    def _parquet(ctx, split=_split):
        ctx.copy_base("processed")
        flip(ctx.dir / "processed" / f"{split}.parquet", 32)
        before = snapshot(ctx.dir)
        return judge(ctx, ctx.step(2), REFUSE, before)


@case("corrupt/step2_train_arrow_flipped", REFUSE)
def _arrow(ctx):
    ctx.copy_base("processed", "masked")
    flip(ctx.dir / "masked/train/data-00000-of-00001.arrow", 64)
    before = snapshot(ctx.dir)
    return judge(ctx, ctx.step(3, "--tag", "t"), REFUSE, before)


def _edit(path: Path, keys: tuple, change) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    holder = data
    for key in keys[:-1]:
        holder = holder[key]
    holder[keys[-1]] = change(holder[keys[-1]])
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


MANIFEST_EDITS = {  # name: (manifest, keys, change or None = truncate, the step that reads it)
    "step1_count": ("processed/manifest.json", ("counts", "train"), lambda n: n + 1, 2),
    "step1_truncated": ("processed/manifest.json", (), None, 2),
    "step2_seq_len": ("masked/manifest.json", ("seq_len",), lambda n: n * 2, 3),
    "step2_count": ("masked/manifest.json", ("counts", "train", "documents"), lambda n: n + 1, 3),
    "step2_truncated": ("masked/manifest.json", (), None, 3),
    "run_seq_len": ("runs/base/manifest.json", ("config", "model", "seq_len"), lambda n: n * 2, 4),
    "run_n_parameters": ("runs/base/manifest.json", ("n_parameters",), lambda n: n + 1, 4),
    "run_truncated": ("runs/base/manifest.json", (), None, 4),
}
for _name, (_file, _keys, _change, _step) in MANIFEST_EDITS.items():

    @case(f"corrupt/manifest_{_name}", REFUSE)
    def _manifest(ctx, file=_file, keys=_keys, change=_change, step=_step):
        ctx.copy_base("processed", "masked", "runs", ".aim")
        path = ctx.dir / file
        if change is None:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        else:
            _edit(path, keys, change)
        before = snapshot(ctx.dir)
        run = {2: lambda: ctx.step(2), 3: lambda: ctx.step(3, "--tag", "t"), 4: lambda: step4(ctx)}[step]()
        return judge(ctx, run, REFUSE, before)


# ---- [kill] ---------------------------------------------------------------------------------------------------------


def wait_until(ready: Callable[[], bool], process: subprocess.Popen, limit: float) -> bool:
    """Poll every 5 ms until ready() (True), the process ends or limit seconds pass (False)."""
    end = time.monotonic() + limit
    while time.monotonic() < end and process.poll() is None:
        if ready():
            return True
        time.sleep(0.005)
    return False


def has_temporary_with(parent: Path, name: str, inside: str) -> bool:
    return any((tmp / inside).exists() for tmp in parent.glob(f".{name}.tmp-*"))


def kill_and_rerun(ctx, argv, short, ready, want: Path, got: Path, roots, kept=None, skip=lambda r: False) -> Outcome:
    """Start argv, kill -9 its process group once ready(), check `kept` (folder, snapshot) survived, rerun, compare."""
    began = time.monotonic()
    started = ctx.start(argv)
    if not wait_until(ready, started[0], ctx.probe.timeout):
        run = ctx.finish(started, short, began, ctx.probe.timeout)
        return Outcome(short, run.rc, first_line(run), "FAIL", "probe: the process ended before the kill point")
    kill_group(started[0])
    after = f"killed at {time.monotonic() - began:.1f} s"
    if kept and changes(*kept):
        return Outcome(short, -9, after, "FAIL", "the earlier output changed: " + listing(changes(*kept)))
    rerun = ctx.command(argv, short)
    if rerun.rc != 0 or rerun.timed_out:
        return Outcome(short, rerun.rc, first_line(rerun), "FAIL", f"{after}; the rerun failed")
    diffs = compare_trees(got, want, roots, skip)
    temporaries = leftovers(ctx.dir)
    line = f"{after}; rerun differs: {listing(diffs)}" if diffs else f"{after}; rerun equals an uninterrupted run"
    reason = "; ".join(([f"{len(diffs)} file(s) differ"] if diffs else []) + [f"left {t}" for t in temporaries[:2]])
    return Outcome(short, rerun.rc, line, "FAIL" if reason else "ok", reason or "same result")


@case("kill/step4_while_writing", SAME, alone=True)
def _kill_step4(ctx):
    ctx.copy_base()
    (ctx.dir / "results/base/old_marker.txt").write_text("the previous output\n", encoding="utf-8")
    kept = (ctx.dir / "results", snapshot(ctx.dir / "results"))
    argv = ctx.argv(4, ["--run", "base", *STEP4_FAST, "--save_path", ctx.dir / "results"], None, None)
    ready = lambda: has_temporary_with(ctx.dir / "results", "base", "metrics.csv")  # noqa: E731
    want, got, roots = ctx.probe.base / "results/base", ctx.dir / "results/base", (ctx.dir, ctx.probe.base)
    return kill_and_rerun(ctx, argv, "s4 --run base --save_path results", ready, want, got, roots, kept)


@case("kill/step2_while_writing", SAME, alone=True)
def _kill_step2(ctx):
    ctx.copy_base("processed")
    ready = lambda: has_temporary_with(ctx.dir, "masked", "train")  # noqa: E731
    want, got, roots = ctx.probe.base / "masked", ctx.dir / "masked", (ctx.dir, ctx.probe.base)
    return kill_and_rerun(ctx, ctx.argv(2, [], None, None), "s2", ready, want, got, roots)


def _sweep_argv(ctx: Ctx, root: Path) -> list[str]:
    sets = ctx.sets({key: None for key in PATH_KEYS[:3]} | {"train.max_steps": 2}, root)
    return [sys.executable, str(ctx.probe.repo / SCRIPTS["sweep"]), *ALL_CONFIGS, *sets,
            "--grid", "train.random_seed=[0,1]", "--results", str(root / "sweep")]  # fmt: skip


def _no_logs(rel: str) -> bool:
    """Logs, Aim repositories and sweep.json (compared apart) are not results."""
    parts = rel.split("/")
    return "logs" in parts or ".aim" in parts or parts[-1] == "sweep.json"


def sweep_json_diffs(got: Path, want: Path, roots) -> list[str]:
    """sweep.json of a resumed sweep says "done earlier" where a whole one says "ok"; otherwise the same."""
    found = []
    for path in sorted(want.rglob("sweep.json")):
        mine = got / path.relative_to(want)
        load = lambda p: normal_json(json.loads(p.read_text(encoding="utf-8")), roots)  # noqa: E731
        theirs, ours = load(path), load(mine) if mine.is_file() else None
        for run in (ours or {}).get("runs", []):
            run["status"] = "ok" if run.get("status") == "done earlier" else run.get("status")
        if ours != theirs:
            found.append(str(path.relative_to(want)))
    return found


def kill_sweep_like(ctx: Ctx, argv_for, ready, short: str, folder: str) -> Outcome:
    want, got = ctx.dir / "uninterrupted", ctx.dir / "killed"
    reference = ctx.command(argv_for(ctx, want), f"{short.split()[0]} (uninterrupted)")
    if reference.rc != 0:
        return Outcome(reference.short, reference.rc, first_line(reference), "FAIL", "the uninterrupted run failed")
    roots = (want, got)
    outcome = kill_and_rerun(ctx, argv_for(ctx, got), short, lambda: ready(got / folder), want / folder,
                             got / folder, roots, None, _no_logs)  # fmt: skip
    differ = sweep_json_diffs(got / folder, want / folder, tuple(sorted(map(str, roots), key=len, reverse=True)))
    if differ and outcome.rc == 0:
        outcome.verdict, outcome.reason = "FAIL", f"{outcome.reason}; sweep.json differs: {listing(differ)}"
    return outcome


@case("kill/sweep_mid_run", SAME, slow=True, alone=True, base=False)
def _kill_sweep(ctx):
    ready = lambda sweep: (sweep / "runs/random_seed-1/checkpoints").exists()  # noqa: E731
    return kill_sweep_like(ctx, _sweep_argv, ready, "sweep --grid train.random_seed=[0,1] (kill in run 2's step 3)",
                           "sweep")  # fmt: skip


def _study_argv(ctx: Ctx, root: Path) -> list[str]:
    sets = ctx.sets({key: None for key in PATH_KEYS} | {"model.seq_len": None, "train.max_steps": 2}, root)
    return [sys.executable, str(ctx.probe.repo / SCRIPTS["study"]), "--quick", "--corpora", "builtin",
            "--designs", "seen", "--seeds", "1", "--n-boot", "5", "--n-perm", "5", "--out", str(root / "study"),
            *sets]  # fmt: skip


@case("kill/study_mid_run", SAME, slow=True, alone=True, base=False)
def _kill_study(ctx):
    def ready(study: Path) -> bool:
        runs = study / "builtin-seen/runs"
        return runs.is_dir() and len([path for path in runs.iterdir() if path.is_dir()]) >= 3

    short = "study --quick --corpora builtin --designs seen --seeds 1 (kill in run 3's step 3)"
    return kill_sweep_like(ctx, _study_argv, ready, short, "study")


# ---- [concurrency] --------------------------------------------------------------------------------------------------


@case("concurrency/two_step4_one_save_path", EITHER, alone=True)
def _two_step4(ctx):
    ctx.copy_base("processed", "masked", "runs", ".aim")
    argv = ctx.argv(4, ["--run", "base", *STEP4_FAST, "--save_path", ctx.dir / "results"], None, None)
    began = time.monotonic()
    both = [ctx.start(argv), ctx.start(argv)]
    runs = [ctx.finish(started, "2 x s4 --run base --save_path results", began, ctx.probe.timeout) for started in both]
    codes = sorted(run.rc for run in runs)
    diffs = compare_trees(ctx.dir / "results/base", ctx.probe.base / "results/base", (ctx.dir, ctx.probe.base))
    problems = [f"result differs from one run's: {listing(diffs)}"] if diffs else []
    problems += [f"left {listing(leftovers(ctx.dir))}"] if leftovers(ctx.dir) else []
    refused = [run for run in runs if run.rc == 2]
    problems += [f"the refusal: {p}" for run in refused for p in refusal_problems(run)]
    if codes not in ([0, 0], [0, 2]):
        problems.insert(0, f"exits {codes}")
    line = first_line(refused[0]) if refused else first_line(runs[0])
    return Outcome(runs[0].short, "/".join(map(str, codes)), line, "FAIL" if problems else "ok",
                   "; ".join(problems) or ("one refused, one complete" if refused else "both complete and equal"))  # fmt: skip


def mount_tmpfs(folder: Path, size: str, *options: str) -> str | None:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(folder)],
                          capture_output=True, text=True)  # fmt: skip
    return None if done.returncode == 0 else (done.stderr.strip() or "mount failed")


def unmount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@case("concurrency/disk_full_step4", REFUSE)
def _disk_full(ctx):
    ctx.copy_base("processed", "masked", "runs", ".aim")
    small = ctx.dir / "small"
    problem = mount_tmpfs(small, "2m")
    if problem:
        return Outcome("s4 --save_path small/results", "-", problem, "skip", "cannot mount a tmpfs (needs root)")
    try:
        shutil.copytree(ctx.probe.base / "results", small / "results")  # the previous output, to be kept
        stat = os.statvfs(small)
        (small / "filler").write_bytes(b"0" * max(0, stat.f_bavail * stat.f_frsize - 16 * 1024))
        before = snapshot(ctx.dir)
        return judge(ctx, step4(ctx, save_path=small / "results"), REFUSE, before)
    finally:
        unmount(small)


# ---- [corpus] -------------------------------------------------------------------------------------------------------


def write_csv(path: Path, rows, newline="\n", bom=False, encoding="utf-8") -> None:
    quote = lambda value: '"' + str(value).replace('"', '""') + '"'  # noqa: E731
    text = newline.join(["body,subreddit", *(f"{quote(t)},{quote(c)}" for t, c in rows)]) + newline
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode(encoding))


def plain(topics=("a", "b"), n=120, start=0) -> list[tuple]:
    return [(f"doc {i} on {t} with words {i} {i * 3} {i * 11}", t) for t in topics for i in range(start, start + n)]


def drawn(alphabet, topics, lo=4, hi=14, sep=" ", n=120, seed=0) -> list[tuple]:
    rng, rows = random.Random(seed), []
    for topic in topics:
        texts = {sep.join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi))) for _ in range(n)}
        rows += [(text, topic) for text in sorted(texts)]
    return rows


EMOJI = [chr(c) for c in range(0x1F600, 0x1F640)] + ["👍🏽", "❤️", "🇫🇷", "👨‍👩‍👧", "🧑🏿‍💻"]
CJK = [chr(c) for c in range(0x4E00, 0x4E00 + 400)]
RTL = "مرحبا كتاب مدرسة بيت شمس قمر ماء سماء שלום ספר בית מים שמש ירח עולם אור \u200f".split(" ")
CONTROL = [chr(c) for c in [*range(1, 32), 0x7F, 0x85]]
LONG_LABEL = "L" * 10_000
LATIN = "café naïve façade déjà über smörgåsbord".split()

CORPORA = {  # name: (rows, eval_topics, extra --set, file options)
    "one_topic": (plain(("a",), 240), [], {}, {}),
    "topic_with_one_document": (plain() + [("the only document of c", "c")], ["c"], {}, {}),
    "test_len_0": (plain(), ["b"], {"dataset.load_params.test_len": 0}, {}),
    "corpus_too_small_for_splits": (plain(n=3), ["b"], {}, {}),
    "all_texts_empty": ([("", t) for t in "ab" for _ in range(50)], ["b"], {}, {}),
    "emoji_only": (drawn(EMOJI, ("🐱", "🐶"), sep=""), ["🐶"], {}, {}),
    "cjk_only": (drawn(CJK, ("猫", "犬"), 8, 30, sep=""), ["犬"], {}, {}),
    "rtl_only": (drawn(RTL, ("عربي", "עברית")), ["עברית"], {}, {}),
    "control_chars_only": (drawn(CONTROL, ("a", "b"), sep=""), ["b"], {}, {}),
    "nul_bytes_in_texts": ([(t.replace(" on ", " o\x00n "), c) for t, c in plain()], ["b"], {}, {}),
    "csv_crlf": (plain(), ["b"], {}, {"newline": "\r\n"}),
    "csv_utf8_bom": (plain(), ["b"], {}, {"bom": True}),
    "topic_label_10000_chars": (plain(("a", LONG_LABEL)), [LONG_LABEL], {}, {}),
    "ten_thousand_topics": (
        [(f"doc {i} of topic {i % 10_000} words {i * 7}", f"t{i % 10_000}") for i in range(20_000)],
        ["t0"],
        {},
        {},
    ),
    "latin1_file": (drawn(LATIN, ("a", "b")), ["b"], {}, {"encoding": "latin-1"}),
    "symlink_loop": (None, ["b"], {}, {}),
}


def corpus_sets(path: Path, eval_topics: list[str], extra: dict) -> dict:
    return {
        "dataset.load_params.source": "files",
        "dataset.load_params.data_files": json.dumps([str(path)]),
        "dataset.load_params.text_field": "body",
        "dataset.load_params.topic_field": "subreddit",
        "dataset.load_params.train_len": 60,
        "dataset.load_params.valid_len": 10,
        "dataset.load_params.test_len": 10,
        "dataset.load_params.topic_len": 30,
        "dataset.data_params.eval_topics": json.dumps(eval_topics, ensure_ascii=False),
        **extra,
    }


def steps_until_refused(ctx: Ctx, steps, expect=EITHER, **kw) -> Outcome:
    """Run the steps in order (each (step, args, over)); the row is the first that does not exit 0, or the last."""
    done = ""
    for number, (step, args, over) in enumerate(steps):
        before = snapshot(ctx.dir)
        run = ctx.step(step, *args, over=over, **kw)
        outcome = judge(ctx, run, expect, before, prefix=done)
        if run.rc != 0 or number == len(steps) - 1 or outcome.verdict != "ok":
            return outcome
        done += f"s{step} ok; "


for _name, (_rows, _eval, _extra, _options) in CORPORA.items():

    @case(f"corpus/{_name}", EITHER, base=False)
    def _corpus(ctx, rows=_rows, eval_topics=_eval, extra=_extra, options=_options):
        path = ctx.dir / "corpus.csv"
        if rows is None:  # corpus.csv -> loop.csv -> corpus.csv
            os.symlink(ctx.dir / "loop.csv", path)
            os.symlink(path, ctx.dir / "loop.csv")
        else:
            write_csv(path, rows, **options)
        over = corpus_sets(path, eval_topics, extra)
        return steps_until_refused(ctx, [(1, [], over), (2, [], over)])


# ---- [sizes] --------------------------------------------------------------------------------------------------------

ONE_STEP = {"train.max_steps": 1, "train.save_steps": 1, "train.eval_steps": 1}
for _seq_len in (1, 2, 4096):

    @case(f"sizes/seq_len_{_seq_len}", EITHER)
    def _seq_len(ctx, seq_len=_seq_len):
        ctx.copy_base("processed")
        over = {"model.seq_len": seq_len, **ONE_STEP}
        return steps_until_refused(ctx, [(2, [], over), (3, ["--tag", "t"], over)])


@case("sizes/tokenizer_vocab_size_5", EITHER)
def _vocab(ctx):
    ctx.copy_base("processed")
    over = {"dataset.data_params.tokenizer_vocab_size": 5, **ONE_STEP}
    return steps_until_refused(ctx, [(2, [], over), (3, ["--tag", "t"], over)])


SIZES = {
    "n_experts_1000": {"model.n_experts": 1000},
    "top_k_experts_0": {"model.top_k_experts": 0},
    "top_k_experts_above_n_experts": {"model.top_k_experts": 5},
    "capacity_factor_0": {"model.capacity_factor": 0},
    "learning_rate_negative": {"train.learning_rate": -1},
    "learning_rate_nan": {"train.learning_rate": ".nan"},
    "batch_size_above_data_set": {"train.batch_size": 100_000},
}
for _name, _over in SIZES.items():

    @case(f"sizes/{_name}", EITHER)
    def _size(ctx, over=_over):
        ctx.copy_base("processed", "masked")
        before = snapshot(ctx.dir)
        return judge(ctx, ctx.step(3, "--tag", "t", over={**over, "train.max_steps": 2}), EITHER, before)


# ---- [resume] -------------------------------------------------------------------------------------------------------

for _name, _over in {"changed_model_n_experts": {"model.n_experts": 8}, "changed_learning_rate": {
        "train.learning_rate": 0.002}}.items():  # fmt: skip

    @case(f"resume/{_name}", REFUSE)
    def _resume_changed(ctx, over=_over):
        interrupted_base(ctx)
        before = snapshot(ctx.dir)
        return judge(ctx, ctx.step(3, "--tag", "base", "--resume", "latest", over=over), REFUSE, before)


def _not_mixed(ctx: Ctx, tag: str, before_base: dict):
    """A resume from another tag's checkpoint may work (--help: --resume PATH), but leaves that run alone and
    starts its own Aim run."""

    def check(run: Run) -> str | None:
        if run.rc != 0:
            return None
        problems = changes(ctx.dir / "runs/base", before_base)
        if not (ctx.dir / "runs" / tag / "manifest.json").is_file():
            return f"no manifest.json in runs/{tag}"
        ours = json.loads((ctx.dir / "runs" / tag / "manifest.json").read_text(encoding="utf-8"))
        theirs = json.loads((ctx.probe.base / "runs/base/manifest.json").read_text(encoding="utf-8"))
        if ours.get("aim_run_hash") == theirs.get("aim_run_hash"):
            problems.append(f"tag {tag} continued base's Aim run {theirs.get('aim_run_hash')}")
        return "; ".join(problems) or None

    return check


@case("resume/other_tags_checkpoint_by_path", EITHER)
def _resume_path(ctx):
    checkpoint = interrupted_base(ctx)
    before, before_base = snapshot(ctx.dir), snapshot(ctx.dir / "runs/base")
    run = ctx.step(3, "--tag", "fresh", "--resume", checkpoint)
    return judge(ctx, run, EITHER, before, _not_mixed(ctx, "fresh", before_base))


@case("resume/other_tags_checkpoints_copied_in", REFUSE)
def _resume_copied(ctx):
    interrupted_base(ctx)
    shutil.copytree(ctx.dir / "runs/base/checkpoints", ctx.dir / "runs/copied/checkpoints")
    before, before_base = snapshot(ctx.dir), snapshot(ctx.dir / "runs/base")
    run = ctx.step(3, "--tag", "copied", "--resume", "latest")
    return judge(ctx, run, REFUSE, before, _not_mixed(ctx, "copied", before_base))


# ---- [yaml] ---------------------------------------------------------------------------------------------------------

LOAD_KEYS = {key: None for key in TINY if key.startswith("dataset.load_params")}
ANCHORS = """\
seed: 11
load_params:
  source: builtin
  dataset_url: sentence-transformers/reddit-title-body
  data_files: []
  text_field: text
  topic_field: topic
  train_len: 300
  valid_len: &small 40
  test_len: *small
  topic_len: *small
  builtin: {<<: &four {n_topics: 4, topic_overlap: 0.0}, n_docs: 600}
data_params:
  eval_topics: &held [programming, gaming]
  train_topics: []
  mask_prob: 0.15
  tokenizer_name: null
  tokenizer_vocab_size: 300
"""


def demo_text(ctx: Ctx, role: str) -> str:
    return (ctx.probe.repo / "configs/demo" / f"{role}_params.yaml").read_text(encoding="utf-8")


YAML_FILES = {  # name: (edit of the demo dataset config text, expect, texts the line must hold)
    "tab_indentation": (lambda t: t.replace("\n  source:", "\n\tsource:"), REFUSE, ()),
    "duplicate_key": (lambda t: t.replace("  mask_prob: 0.15", "  mask_prob: 0.15\n  mask_prob: 0.3"), REFUSE, ()),
    "anchors_aliases_merge": (lambda t: ANCHORS, WORKS, ()),
    "unknown_key": (lambda t: t.replace("  mask_prob:", "  shuffle_buffer: 100\n  mask_prob:"), REFUSE, ()),
    "typo_one_edit_away": (lambda t: t.replace("  mask_prob:", "  mask_prb:"), REFUSE, ("did you mean",)),
}
for _name, (_edit_text, _expect, _texts) in YAML_FILES.items():

    @case(f"yaml/file_{_name}", _expect, base=False)
    def _yaml_file(ctx, edit=_edit_text, expect=_expect, texts=_texts):
        path = ctx.dir / "dataset_params.yaml"
        path.write_text(edit(demo_text(ctx, "dataset")), encoding="utf-8")
        before = snapshot(ctx.dir)
        run = ctx.step(1, over=LOAD_KEYS, configs=["--config-name", path])
        check = _anchors_resolved(ctx) if expect == WORKS else must_say(*texts)
        return judge(ctx, run, expect, before, check)


def _anchors_resolved(ctx: Ctx):
    def check(run: Run) -> str | None:
        if run.rc != 0:
            return None
        load = json.loads((ctx.dir / "processed/manifest.json").read_text(encoding="utf-8"))["config"]["load_params"]
        found = (load["test_len"], load["topic_len"], load["builtin"]["n_topics"], load["builtin"]["n_docs"])
        return None if found == (40, 40, 4, 600) else f"anchors resolved to {found}, not (40, 40, 4, 600)"

    return check


@case("yaml/file_model_typo_step2", REFUSE)
def _yaml_model_typo(ctx):
    ctx.copy_base("processed")
    path = ctx.dir / "model_params.yaml"
    path.write_text(demo_text(ctx, "model").replace("n_experts:", "n_expert:"), encoding="utf-8")
    run = ctx.step(2, over={"model.n_experts": None}, configs=[*CONFIGS[2][:2], "--config-model", path])
    return judge(ctx, run, REFUSE, snapshot(ctx.dir), must_say("did you mean"))


@case("yaml/config_path_is_a_folder", REFUSE, base=False)
def _yaml_folder(ctx):
    (ctx.dir / "a_folder.yaml").mkdir()
    return judge(ctx, ctx.step(1, configs=["--config-name", ctx.dir / "a_folder.yaml"]), REFUSE, snapshot(ctx.dir))


YAML_SETS = {
    "unknown_key": ({"dataset.load_params.shuffle_buffer": 100}, REFUSE, ()),
    "typo_one_edit_away": ({"dataset.data_params.mask_prb": 0.2}, REFUSE, ("did you mean",)),
    "typo_in_section": ({"dataset.load_param.train_len": 300}, REFUSE, ("did you mean",)),
    "duplicate_key_in_value": ({"dataset.load_params.builtin": "{n_docs: 600, n_docs: 700}"}, REFUSE, ()),
    "merge_key_in_value": ({"dataset.load_params.builtin": "{<<: {n_topics: 4}, n_docs: 600}"}, WORKS, ()),
    "tab_in_value": ({"dataset.load_params.builtin": "{n_docs:\t600}"}, EITHER, ()),
}
for _name, (_over, _expect, _texts) in YAML_SETS.items():

    @case(f"yaml/set_{_name}", _expect, base=False)
    def _yaml_set(ctx, over=_over, expect=_expect, texts=_texts):
        extra = {"dataset.load_params.builtin.n_docs": None} if "dataset.load_params.builtin" in over else {}
        return judge(ctx, ctx.step(1, over={**extra, **over}), expect, snapshot(ctx.dir), must_say(*texts))


# ---- [perm] ---------------------------------------------------------------------------------------------------------


def _as_unprivileged(ctx: Ctx, step, parent: Path, *args, over=None) -> Outcome:
    found = ctx.probe.unprivileged()
    if found is None:
        return Outcome(ctx.short(step, args, over), "-", "", "skip", "no way to run without root's file access here")
    prefix, how = found
    parent.mkdir(exist_ok=True)
    os.chmod(parent, 0o555)
    try:
        before = snapshot(ctx.dir)
        outcome = judge(ctx, ctx.step(step, *args, over=over, wrap=prefix), REFUSE, before)
    finally:
        os.chmod(parent, 0o755)
    outcome.reason += f" ({how})"
    return outcome


@case("perm/step1_output_folder_not_writable", REFUSE, base=False)
def _perm_step1(ctx):
    locked = ctx.dir / "locked"
    return _as_unprivileged(ctx, 1, locked, over={"dataset.data_params.processed_dir": locked / "processed"})


@case("perm/step4_save_path_not_writable", REFUSE)
def _perm_step4(ctx):
    ctx.copy_base("processed", "masked", "runs", ".aim")
    locked = ctx.dir / "locked"
    return _as_unprivileged(ctx, 4, locked, "--run", "base", *STEP4_FAST, "--save_path", locked / "results")


@case("perm/step4_save_path_on_read_only_fs", REFUSE)
def _perm_read_only(ctx):
    ctx.copy_base("processed", "masked", "runs", ".aim")
    mounted = ctx.dir / "ro"
    problem = mount_tmpfs(mounted, "1m", "ro")
    if problem:
        return Outcome("s4 --save_path ro/results", "-", problem, "skip", "cannot mount a read-only tmpfs")
    try:
        before = snapshot(ctx.dir)
        return judge(ctx, step4(ctx, save_path=mounted / "results"), REFUSE, before)
    finally:
        unmount(mounted)


# ---- [aim] ----------------------------------------------------------------------------------------------------------


def _aim_case(ctx: Ctx, damage) -> Outcome:
    """Train a new tag on a damaged Aim repository: it warns and trains, or refuses before the first step."""
    ctx.copy_base("processed", "masked", ".aim")
    holder = damage(ctx.dir / ".aim")
    try:
        before = snapshot(ctx.dir)
        run = ctx.step(3, "--tag", "t", timeout=min(90, ctx.probe.timeout))
    finally:
        if holder is not None:
            kill_group(holder)
    return judge(ctx, run, EITHER, before, ignore=(".aim",))


def _garbage(aim: Path):
    rng = random.Random(1)
    for path in aim.rglob("*"):
        if path.is_file():
            path.write_bytes(bytes(rng.randrange(256) for _ in range(max(64, min(path.stat().st_size, 4096)))))


def _stale_softlock(aim: Path):
    (aim / "locks").mkdir(exist_ok=True)
    (aim / "locks" / "structured_db_lock").write_text("", encoding="utf-8")  # Aim's SoftFileLock is this file


def _sqlite_held(aim: Path):
    """Another process holds an exclusive transaction on the repository's run database (as a busy reader would)."""
    code = ("import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "c.execute('BEGIN EXCLUSIVE'); print('held', flush=True); time.sleep(600)")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", code, str(aim / "run_metadata.sqlite")], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)  # fmt: skip
    holder.stdout.readline()
    return holder


@case("aim/corrupt_repository", EITHER)
def _aim_corrupt(ctx):
    return _aim_case(ctx, _garbage)


@case("aim/stale_soft_lock", EITHER)
def _aim_softlock(ctx):
    return _aim_case(ctx, _stale_softlock)


@case("aim/database_locked_by_another_process", EITHER)
def _aim_sqlite(ctx):
    return _aim_case(ctx, _sqlite_held)


# ---- [scale] --------------------------------------------------------------------------------------------------------

for _option in ("--n-perm", "--n-boot"):

    @case(f"scale/step4{_option.replace('--', '_').replace('-', '_')}_10000000", EITHER)
    def _scale(ctx, option=_option):
        ctx.copy_base("processed", "masked", "runs", ".aim")
        before = snapshot(ctx.dir)
        run = step4(ctx, option, "10000000", timeout=90)
        outcome = judge(ctx, run, EITHER, before)
        if run.timed_out:
            outcome.reason = "ran past 90 s without an estimate"
        elif run.rc == 2 and outcome.verdict == "ok" and run.seconds > 60:
            outcome.verdict, outcome.reason = "FAIL", f"refused only after {run.seconds:.0f} s"
        elif run.rc == 2 and outcome.verdict == "ok" and not TIME_ESTIMATE.search(first_line(run)):
            outcome.verdict, outcome.reason = "FAIL", "refused without a time estimate"
        return outcome


# ---- running --------------------------------------------------------------------------------------------------------


def run_case(probe: Probe, item: Case) -> tuple[Case, Outcome, float]:
    began = time.monotonic()
    try:
        if item.base:
            probe.ensure_base()
        outcome = item.fn(Ctx(probe, item.name))
    except Exception as error:  # a broken case is a FAIL row, never the end of the probe
        text = (str(error).strip().splitlines() or [type(error).__name__])[0]
        outcome = Outcome("-", "-", f"{type(error).__name__}: {text}", "FAIL", "probe error")
    seconds = time.monotonic() - began
    log(f"{outcome.verdict:4} {item.name} ({seconds:.0f} s): {outcome.reason}")
    return item, outcome, seconds


def table(rows, width: bool) -> list[str]:
    cut = (lambda text, n: text if len(text) <= n else text[: n - 3] + "...") if width else (lambda text, n: text)
    clean = lambda text: str(text).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| case | command | exit | first line | verdict |", "|---|---|---|---|---|"]
    for item, outcome, _ in rows:
        verdict = f"{outcome.verdict}: {outcome.reason}" if outcome.reason else outcome.verdict
        cells = (item.name, cut(outcome.cmd, 70), outcome.rc, cut(outcome.line, 140), cut(verdict, 110))
        lines.append("| " + " | ".join(clean(cell) for cell in cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=str(Path(__file__).resolve().parents[2]), help="checkout under test")
    parser.add_argument("--only", action="append", default=[], help="run cases whose name holds this (repeatable)")
    parser.add_argument("--skip", action="append", default=[], help="leave out cases whose name holds this")
    parser.add_argument("--slow", action="store_true", help="also the slow cases (sweep and study kills, ~5 min)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--markdown", help="also write the table (untruncated) to this file")
    parser.add_argument("--workdir", help="work folder (default: a fresh temporary one, kept)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per command (default 300)")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2)")
    args = parser.parse_args()

    def chosen(item: Case) -> bool:
        names = (item.name, "slow" if item.slow else "")
        if args.only and not any(text in name for text in args.only for name in names):
            return False
        if any(text in name for text in args.skip for name in names):
            return False
        return args.slow or bool(args.only) or not item.slow

    selected = [item for item in CASES if chosen(item)]
    if args.list:
        for item in CASES:
            flags = " ".join(flag for flag in ("slow", "alone") if getattr(item, flag))
            print(f"{item.name:55} {item.expect:16} {flags}{'' if item in selected else '  (not selected)'}")
        return 0
    probe = Probe(args)
    log(f"probe: {len(selected)} case(s) against {probe.repo}, work folder {probe.work}")
    began = time.monotonic()
    rows = []
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        rows += pool.map(lambda item: run_case(probe, item), [item for item in selected if not item.alone])
    rows += [run_case(probe, item) for item in selected if item.alone]
    rows.sort(key=lambda row: CASES.index(row[0]))
    print("\n".join(table(rows, width=True)))
    counts = {verdict: sum(row[1].verdict == verdict for row in rows) for verdict in ("ok", "FAIL", "skip")}
    total = time.monotonic() - began
    summary = f"cases {len(rows)}, ok {counts['ok']}, FAIL {counts['FAIL']}, skip {counts['skip']} in {total:.0f} s"
    print(f"\n{summary}")
    if args.markdown:
        Path(args.markdown).write_text("\n".join([*table(rows, width=False), "", summary, ""]), encoding="utf-8")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
