"""Fault injection against the step scripts: damaged inputs, kill -9, races, odd corpora, odd configs.

Not a pytest module: a standalone probe that prints one row per case (name, command, exit code, first meaningful
line, verdict) and exits 1 if any case FAILs. It imports nothing from the checkout under test: every step runs as
`python REPO/<script>` in a subprocess (cwd: the case's folder), so --repo can point at an older commit's worktree.

    .venv/bin/python tests/faults/run_faults.py                       # every case but the slow ones (~5 min)
    .venv/bin/python tests/faults/run_faults.py --only corpus --only kill/step4 --markdown faults.md
    .venv/bin/python tests/faults/run_faults.py --only slow            # the sweep and study kills (~6 min)

Expectations: refuse = exit 2, exactly one `error: ` line and it is stderr's last, no traceback anywhere, no
`.NAME.tmp-PID` / `.NAME.old-PID` temporaries left, and no file that existed before changed (nor any new one but
lock files); works = exit 0, no temporaries; rerun-equal (kill -9 cases) = the rerun exits 0 and its outputs equal
an uninterrupted run's (JSON without timings, dates, hashes of such files and paths; tables and tensors by value).
Steps 1-4 run once on a tiny builtin corpus as the shared base; each case works on a copy in --workdir/cases/<case>,
and every command's output is kept in --workdir/logs/.
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

SCRIPTS = {1: "data_processors/load_dataset.py", 2: "data_processors/dataset.py", 3: "train/train.py"}
SCRIPTS.update({4: "inference/inference.py", "sweep": "process_exp_results/experiments/sweep.py"})
SCRIPTS["study"] = "process_exp_results/experiments/study.py"
ALL_CONFIGS = ["--config-dataset", "demo/dataset_params.yaml", "--config-model", "demo/model_params.yaml"]
ALL_CONFIGS += ["--config-train", "demo/train_params.yaml"]
CONFIGS = {1: ["--config-name", "demo/dataset_params.yaml"], 2: ALL_CONFIGS[:4], 3: ALL_CONFIGS, 4: ALL_CONFIGS}
# tests/helpers.py tiny_sets, with four training steps and a checkpoint every two
TINY = dict(
    pair.split("=", 1)
    for pair in """
    dataset.load_params.builtin.n_docs=600 dataset.load_params.train_len=300 dataset.load_params.valid_len=40
    dataset.load_params.test_len=40 dataset.load_params.topic_len=40 dataset.data_params.tokenizer_vocab_size=300
    model.seq_len=32 model.embedding_dim=16 model.num_head=2 model.n_encoder_blocks=1 model.moe_dim=16
    train.max_steps=4 train.batch_size=8 train.eval_steps=2 train.eval_batches=1 train.save_steps=2 train.device=cpu
    """.split()
)
PATH_KEYS = ("dataset.data_params.processed_dir", "dataset.data_params.masked_dir", "train.save_path", "train.aim_repo")
STEP4_FAST = {"--n-boot": 5, "--n-perm": 5, "--n-random-routers": 2}
TRAINED = ("processed", "masked", "runs", ".aim")  # the base without its step-4 results
REFUSE, WORKS, EITHER, SAME = "refuse", "works", "refuse-or-works", "rerun-equal"
TEMPORARY = re.compile(r"^\..+\.(tmp|old|deleting)-\d+$")
PROGRESS = re.compile(r"\d+%\||\d+it \[|(it|step|docs)/s[\],]|s/(it|step)[\],]")  # tqdm bars are not output lines
# JSON keys a rerun may change: timings, dates, commits, and hashes (of files holding timings, or of HF datasets'
# state.json with its per-run _fingerprint): the files themselves are compared
VOLATILE = re.compile(
    r"seconds|sha256|manifest_hash|fingerprint|aim_run_hash|(^|_)(time|date|started|finished|git|versions)(_|$)"
)
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
    alone: bool = False  # timing matters (kills, races): run when no other case runs
    base: bool = True  # needs the shared base


CASES: list[Case] = []
LIVE: list[subprocess.Popen] = []  # every process started, ended on the way out
STOP = threading.Event()


def case(name: str, expect: str, fn: Callable | None = None, **flags):
    """Register fn(ctx) -> Outcome as a case; without fn, a decorator."""
    if fn is None:
        return lambda fn: case(name, expect, fn, **flags)
    CASES.append(Case(name, expect, fn, **flags))
    return fn


class Probe:
    """What every case shares: the checkout under test, the work folder, the step environment, the base."""

    def __init__(self, args: argparse.Namespace):
        self.repo = Path(args.repo).resolve()
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix="faults-")).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        os.chmod(self.work, 0o755)  # an unprivileged user must reach the case folders
        self.timeout, self.base = args.timeout, self.work / "base"
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.env.pop("PYTHONPATH", None)
        if args.jobs > 1:  # one thread count for every run, the base's included: reruns must compare equal
            self.env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
        self._lock, self._base, self._unprivileged = threading.Lock(), None, None

    def ensure_base(self) -> None:
        """Steps 1-4 once (tag base, checkpoints at steps 2 and 4, results in base/results)."""
        with self._lock:
            if self._base is None:
                ctx, self._base = Ctx(self, "base", folder=self.base), ""
                steps = [(1, []), (2, []), (3, ["--tag", "base"]), (4, step4_args(self.base / "results"))]
                try:
                    for step, args in steps:
                        run = ctx.step(step, *args)
                        log(f"base: step {step} exit {run.rc} in {run.seconds:.1f} s")
                        if run.rc != 0:
                            self._base = f"the base's step {step} failed (exit {run.rc}): {first_line(run)}"
                            break
                except Exception as error:
                    self._base = f"the base failed: {error}"
        if self._base:
            raise RuntimeError(self._base)

    def unprivileged(self) -> tuple[list[str], str] | None:
        """A command prefix that runs without root's bypass of file modes, and its description."""
        with self._lock:
            if self._unprivileged is None:
                self._unprivileged = self._find_unprivileged() or ()
            return self._unprivileged or None

    def _find_unprivileged(self):
        if os.geteuid() != 0:
            return [], "as this user"
        caps = "-dac_override,-dac_read_search"
        for prefix, how in (
            (["runuser", "-u", "nobody", "--"], "as nobody"),
            (["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}"], "as root without CAP_DAC_OVERRIDE"),
        ):
            probe = [*prefix, sys.executable, "-c", f"import torch, os; os.stat({str(self.repo / SCRIPTS[3])!r})"]
            if not shutil.which(prefix[0]):
                continue
            if subprocess.run(probe, capture_output=True, cwd="/", env=self.env).returncode == 0:
                return prefix, how
            log(f"perm: cannot run the steps {how} (the venv's python or the repository is not readable)")
        return None


class Ctx:
    """One case: its folder and its commands."""

    def __init__(self, probe: Probe, name: str, folder: Path | None = None):
        self.probe, self.name, self.count = probe, name.replace("/", "__"), 0
        self.dir = folder or probe.work / "cases" / self.name
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)

    def copy_base(self, *parts: str) -> None:
        for part in parts:
            shutil.copytree(self.probe.base / part, self.dir / part, symlinks=True)

    def sets(self, over: dict | None = None, root: Path | None = None) -> list[str]:
        """TINY, the output paths under root (this case's folder), then `over` (a None value drops the key)."""
        root = root or self.dir
        paths = dict(zip(PATH_KEYS, (root / "processed", root / "masked", root / "runs", root)))
        merged = {**TINY, **paths, **(over or {})}
        return [text for key, value in merged.items() if value is not None for text in ("--set", f"{key}={value}")]

    def rel(self, text: str) -> str:
        text = text.replace(str(self.dir), ".").replace(str(self.probe.base), "BASE")
        return text if len(text) <= 60 else text[:40] + f"...({len(text)} chars)"

    def short(self, step, args, over, configs=None) -> str:
        words = [f"s{step}", *map(str, configs or []), *map(str, args)]
        words += [f"--set {key}={value}" for key, value in (over or {}).items() if value is not None]
        return " ".join(self.rel(word) for word in words)

    def argv(self, step, args=(), over=None, configs=None) -> list[str]:
        configs = CONFIGS[step] if configs is None else configs
        script = str(self.probe.repo / SCRIPTS[step])
        return [sys.executable, script, *map(str, configs), *self.sets(over), *map(str, args)]

    def step(self, step, *args, over=None, configs=None, timeout=None, wrap=(), shown=None) -> Run:
        """Run a step; shown: the --set options its short form names (default: over)."""
        argv = [*wrap, *self.argv(step, args, over, configs)]
        return self.command(argv, self.short(step, args, over if shown is None else shown, configs), timeout)

    def start(self, argv: list[str]):
        """Popen in its own process group, output to log files (a full pipe would stall the step)."""
        if STOP.is_set():
            raise RuntimeError("the probe is stopping")
        self.count += 1
        stem = self.probe.work / "logs" / f"{self.name}.{self.count}"
        stem.parent.mkdir(exist_ok=True)
        paths = Path(f"{stem}.out"), Path(f"{stem}.err")
        options = dict(cwd=self.dir, env=self.probe.env, stdin=subprocess.DEVNULL, start_new_session=True)
        with open(paths[0], "wb") as out, open(paths[1], "wb") as err:
            process = subprocess.Popen(argv, stdout=out, stderr=err, **options)
        LIVE.append(process)
        return process, *paths

    def finish(self, started, short: str, began: float, limit: float) -> Run:
        process, out_path, err_path = started
        timed_out = False
        try:
            process.wait(timeout=max(0.1, limit - (time.monotonic() - began)))
        except subprocess.TimeoutExpired:
            kill_group(process)
            timed_out = True
        out, err = (path.read_text(encoding="utf-8", errors="replace") for path in (out_path, err_path))
        return Run(short, process.returncode, out, err, time.monotonic() - began, limit, timed_out)

    def command(self, argv: list[str], short: str, timeout=None) -> Run:
        began = time.monotonic()
        return self.finish(self.start(argv), short, began, timeout or self.probe.timeout)


def step4_args(save_path: Path, **options) -> list:
    flat = [str(item) for pair in {**STEP4_FAST, **options}.items() for item in pair]
    return ["--run", "base", *flat, "--save_path", save_path]


def step4(ctx: Ctx, save_path: Path | None = None, **options) -> Run:
    return ctx.step(4, *step4_args(save_path or ctx.dir / "results", **options))


# ---- checks ---------------------------------------------------------------------------------------------------------


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def first_line(run: Run) -> str:
    """The error line, else the exception of a traceback, else the first stderr line, else stdout's; no tqdm bars."""
    lines = [line.strip() for line in re.split(r"[\r\n]", run.err) if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        return errors[-1]
    if "Traceback (most recent call last)" in run.err:  # the exception, not the traceback's header
        last = run.err[run.err.rindex("Traceback (most recent call last)") :].splitlines()[1:]
        raised = [line for line in last if line.strip() and not line[0].isspace()]
        return (raised or ["Traceback"])[0]
    lines = [line for line in lines if not PROGRESS.search(line)]
    return (lines or [line.strip() for line in run.out.splitlines() if line.strip()] or [""])[0]


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under folder -> (size, sha1); lock files are not outputs."""
    return {
        str(path.relative_to(folder)): (path.stat().st_size, hashlib.sha1(path.read_bytes()).hexdigest())
        for path in sorted(folder.rglob("*"))
        if not path.is_symlink() and path.is_file() and not path.name.endswith(".lock")
    }


def leftovers(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob(".*") if TEMPORARY.match(path.name))


def changes(folder: Path, before: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    after = snapshot(folder)
    found = [f"changed {name}" for name in before if name in after and after[name] != before[name]]
    found += [f"removed {name}" for name in before if name not in after]
    found += [f"new {name}" for name in after if name not in before]
    return [text for text in found if not text.split(" ", 1)[1].startswith(ignore)]


def listing(items: list[str], most: int = 3) -> str:
    return ", ".join(items[:most]) + (f" (+{len(items) - most})" if len(items) > most else "")


def refusal_problems(run: Run) -> list[str]:
    lines = [line for line in re.split(r"[\r\n]", run.err) if line.strip()]
    problems = ["traceback"] if "Traceback" in run.err + run.out else []
    if not lines or not lines[-1].startswith("error: "):
        problems.append("last stderr line is not 'error: '")
    if sum(line.startswith("error:") for line in lines) > 1:
        problems.append("several 'error:' lines")
    return problems


def judge(ctx: Ctx, run: Run, expect: str, before=None, check=None, prefix="", ignore=()) -> Outcome:
    """The verdict on a case's last run. before: the case folder's snapshot, which a refusal must leave as it was
    (ignore: path prefixes it may change); check(run) -> a problem or None."""
    cmd, line = prefix + run.short, first_line(run)[:400]
    if run.timed_out:
        return Outcome(cmd, "timeout", line, "FAIL", f"ran past {run.limit:.0f} s")
    if run.rc == 0 and expect in (WORKS, EITHER):
        problems, what = (["traceback on stderr"] if "Traceback" in run.err else []), "works"
    elif run.rc == 2 and expect in (REFUSE, EITHER):
        problems, what = refusal_problems(run), "refused in one line"
        changed = changes(ctx.dir, before, ignore) if before is not None else []
        problems += [listing(changed)] if changed else []
    else:
        tail = " (traceback)" if "Traceback" in run.err else ""
        return Outcome(cmd, run.rc, line, "FAIL", f"expected {expect}, got exit {run.rc}{tail}")
    problems += ["temporaries left: " + listing(leftovers(ctx.dir))] if leftovers(ctx.dir) else []
    extra = check(run) if check else None
    problems += [extra] if extra else []
    return Outcome(cmd, run.rc, line, "FAIL" if problems else "ok", "; ".join(problems) or what)


def must_say(*texts: str):
    """A check: a refusal's line holds these texts."""
    return lambda run: None if run.rc != 2 or all(t in first_line(run) for t in texts) else f"line lacks {texts!r}"


def simple(name: str, expect: str, parts: tuple, prepare, run, check=None, **flags) -> None:
    """A case that copies `parts` of the base, calls prepare(ctx), then judges run(ctx) (check(ctx) -> a check)."""

    def fn(ctx: Ctx) -> Outcome:
        ctx.copy_base(*parts)
        prepare(ctx)
        before = snapshot(ctx.dir)
        return judge(ctx, run(ctx), expect, before, check(ctx) if check else None)

    case(name, expect, fn, base=bool(parts), **flags)


# ---- comparing a rerun with an uninterrupted run ----------------------------------------------------------------


def normal_json(value, roots: tuple[str, ...]):
    """Without volatile keys or null values; a resumed sweep's "done earlier" is the "ok" of a whole one."""
    if isinstance(value, dict):
        if value.get("status") == "done earlier":
            value = {**value, "status": "ok"}
        return {k: normal_json(v, roots) for k, v in value.items() if not VOLATILE.search(str(k)) and v is not None}
    if isinstance(value, list):
        return [normal_json(item, roots) for item in value]
    return normal_text(value, roots, timings=False) if isinstance(value, str) else value


def normal_text(text: str, roots: tuple[str, ...], timings=True) -> str:
    for root in roots:
        text = text.replace(root, "<ROOT>")
    return re.sub(r"\d+(\.\d+)?\s*(s|min)\b", "<T>", text) if timings else text


def read_table(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        return pq.read_table(path)
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all()


def same_content(a: Path, b: Path, roots: tuple[str, ...]) -> bool:
    if a.read_bytes() == b.read_bytes():
        return True
    try:
        if a.suffix == ".json":
            load = lambda p: normal_json(json.loads(p.read_text(encoding="utf-8")), roots)  # noqa: E731
            return load(a) == load(b)
        if a.suffix in (".csv", ".md", ".html", ".txt", ".yaml", ".jsonl"):
            return normal_text(a.read_text(errors="replace"), roots) == normal_text(
                b.read_text(errors="replace"), roots
            )
        if a.suffix in (".parquet", ".arrow"):
            return read_table(a).equals(read_table(b))
        if a.suffix == ".safetensors":
            import torch
            from safetensors.torch import load_file

            ta, tb = load_file(str(a)), load_file(str(b))
            return ta.keys() == tb.keys() and all(torch.equal(ta[key], tb[key]) for key in ta)
        if a.suffix == ".npy":
            import numpy as np

            return np.array_equal(np.load(a), np.load(b))
    except Exception:  # unreadable on either side: they differ
        return False
    return False


def compare_trees(got: Path, want: Path, roots: tuple[Path, ...], skip=lambda rel: False) -> list[str]:
    """Files missing, extra or different in content; roots: the folders holding each run (paths in files)."""
    texts = tuple(sorted({str(root) for root in roots}, key=len, reverse=True))

    def files(root: Path) -> set[str]:
        found = (str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())
        return {rel for rel in found if not rel.endswith(".lock") and not skip(rel)} if root.exists() else set()

    mine, theirs = files(got), files(want)
    diffs = [f"missing {name}" for name in sorted(theirs - mine)] + [f"extra {name}" for name in sorted(mine - theirs)]
    return diffs + [name for name in sorted(mine & theirs) if not same_content(got / name, want / name, texts)]


# ---- [corrupt] ------------------------------------------------------------------------------------------------------


def flip(path: Path, n: int) -> None:
    data = bytearray(path.read_bytes())
    for i in range(max(0, len(data) // 2 - n // 2), min(len(data), len(data) // 2 + n - n // 2)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {"truncated": truncate, "empty": lambda path: path.write_bytes(b""), "flipped": lambda path: flip(path, 64)}


def interrupt(ctx: Ctx) -> Path:
    """The copied base run as if killed after its step-2 checkpoint; returns that (newest) checkpoint."""
    run = ctx.dir / "runs/base"
    for path in (run / "model", run / "checkpoints/step-000004"):
        shutil.rmtree(path)
    for path in [run / "manifest.json", *(run / "routing_snapshots").glob("step-000004*")]:
        path.unlink()
    return run / "checkpoints/step-000002"


def resume(ctx: Ctx, **over) -> Run:
    return ctx.step(3, "--tag", "base", "--resume", "latest", over=over)


def train(ctx: Ctx, **over) -> Run:
    return ctx.step(3, "--tag", "t", over=over)


for _how, _damage in DAMAGE.items():
    _final = lambda ctx, damage=_damage: damage(ctx.dir / "runs/base/model/model.safetensors")  # noqa: E731
    simple(f"corrupt/final_model_{_how}", REFUSE, TRAINED, _final, step4)
    for _file in ("model", "optimizer"):
        _checkpoint = lambda ctx, damage=_damage, f=_file: damage(interrupt(ctx) / f"{f}.safetensors")  # noqa: E731
        simple(f"corrupt/checkpoint_{_file}_{_how}", REFUSE, TRAINED, _checkpoint, resume)
for _split in ("test", "train"):
    _flip = lambda ctx, split=_split: flip(ctx.dir / f"processed/{split}.parquet", 32)  # noqa: E731
    simple(f"corrupt/step1_{_split}_parquet_flipped", REFUSE, ("processed",), _flip, lambda ctx: ctx.step(2))
_arrow = lambda ctx: flip(ctx.dir / "masked/train/data-00000-of-00001.arrow", 64)  # noqa: E731
simple("corrupt/step2_train_arrow_flipped", REFUSE, ("processed", "masked"), _arrow, train)


def edit_json(path: Path, keys: tuple, change) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    holder = data
    for key in keys[:-1]:
        holder = holder[key]
    holder[keys[-1]] = change(holder[keys[-1]])
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


MANIFEST_EDITS = {  # name: (manifest, keys, change (None: truncate), the step that reads it)
    "step1_count": ("processed/manifest.json", ("counts", "train"), lambda n: n + 1, lambda ctx: ctx.step(2)),
    "step1_truncated": ("processed/manifest.json", (), None, lambda ctx: ctx.step(2)),
    "step2_seq_len": ("masked/manifest.json", ("seq_len",), lambda n: n * 2, train),
    "step2_count": ("masked/manifest.json", ("counts", "train", "documents"), lambda n: n + 1, train),
    "step2_truncated": ("masked/manifest.json", (), None, train),
    "run_seq_len": ("runs/base/manifest.json", ("config", "model", "seq_len"), lambda n: n * 2, step4),
    "run_n_parameters": ("runs/base/manifest.json", ("n_parameters",), lambda n: n + 1, step4),
    "run_truncated": ("runs/base/manifest.json", (), None, step4),
}
for _name, (_file, _keys, _change, _run) in MANIFEST_EDITS.items():

    def _edit(ctx, f=_file, k=_keys, c=_change):
        truncate(ctx.dir / f) if c is None else edit_json(ctx.dir / f, k, c)

    simple(f"corrupt/manifest_{_name}", REFUSE, TRAINED, _edit, _run)


# ---- [kill] ---------------------------------------------------------------------------------------------------------


def kill_and_rerun(ctx: Ctx, argv, short, ready, want: Path, got: Path, roots, kept=None, skip=None) -> Outcome:
    """Start argv; kill -9 its process group once ready(); `kept` (folder, snapshot) must have survived; rerun;
    compare `got` with `want`, the uninterrupted run's output."""
    began, started = time.monotonic(), ctx.start(argv)
    while not ready() and started[0].poll() is None and time.monotonic() - began < ctx.probe.timeout:
        time.sleep(0.005)
    if started[0].poll() is not None or not ready():
        run = ctx.finish(started, short, began, ctx.probe.timeout)
        return Outcome(short, run.rc, first_line(run), "FAIL", "probe: the process ended before the kill point")
    kill_group(started[0])
    after = f"killed at {time.monotonic() - began:.1f} s"
    if kept and changes(*kept):
        return Outcome(short, -9, after, "FAIL", "the earlier output changed: " + listing(changes(*kept)))
    rerun = ctx.command(argv, short)
    if rerun.rc != 0 or rerun.timed_out:
        return Outcome(short, rerun.rc, first_line(rerun), "FAIL", f"{after}; the rerun failed")
    diffs, temporaries = compare_trees(got, want, roots, skip or (lambda rel: False)), leftovers(ctx.dir)
    line = f"{after}; the rerun differs: {listing(diffs)}" if diffs else f"{after}; the rerun equals a whole run"
    reason = "; ".join(([f"{len(diffs)} file(s) differ"] if diffs else []) + [f"left {t}" for t in temporaries[:2]])
    return Outcome(short, rerun.rc, line, "FAIL" if reason else "ok", reason or "same result")


def tmp_holds(parent: Path, name: str, inside: str) -> bool:
    return any((tmp / inside).exists() for tmp in parent.glob(f".{name}.tmp-*"))


@case("kill/step4_while_writing", SAME, alone=True)
def _kill_step4(ctx):
    ctx.copy_base(*TRAINED, "results")
    (ctx.dir / "results/base/old_marker.txt").write_text("the previous output\n", encoding="utf-8")
    kept = (ctx.dir / "results/base", snapshot(ctx.dir / "results/base"))  # atomic: whole until replaced
    ready = lambda: tmp_holds(ctx.dir / "results", "base", "metrics.csv")  # noqa: E731
    argv, short = ctx.argv(4, step4_args(ctx.dir / "results")), "s4 --run base --save_path results (killed, rerun)"
    want, got, roots = ctx.probe.base / "results/base", ctx.dir / "results/base", (ctx.dir, ctx.probe.base)
    return kill_and_rerun(ctx, argv, short, ready, want, got, roots, kept)


@case("kill/step2_while_writing", SAME, alone=True)
def _kill_step2(ctx):
    ctx.copy_base("processed")
    ready = lambda: tmp_holds(ctx.dir, "masked", "train")  # noqa: E731
    want, got, roots = ctx.probe.base / "masked", ctx.dir / "masked", (ctx.dir, ctx.probe.base)
    return kill_and_rerun(ctx, ctx.argv(2), "s2 (killed, rerun)", ready, want, got, roots)


def not_results(rel: str) -> bool:
    """Logs and Aim repositories are not results."""
    return bool({"logs", ".aim"} & set(rel.split("/")))


def kill_sweep_like(ctx: Ctx, argv_for, ready, short: str, folder: str) -> Outcome:
    """The uninterrupted run first, in the folder the killed one then uses (moved aside: the same paths inside)."""
    live, want = ctx.dir / "run", ctx.dir / "uninterrupted"
    reference = ctx.command(argv_for(ctx, live), f"{short.split()[0]} (uninterrupted)")
    if reference.rc != 0:
        return Outcome(reference.short, reference.rc, first_line(reference), "FAIL", "the uninterrupted run failed")
    live.rename(want)
    argv, got = argv_for(ctx, live), live / folder
    return kill_and_rerun(ctx, argv, short, lambda: ready(got), want / folder, got, (live,), skip=not_results)


def sweep_argv(ctx: Ctx, root: Path) -> list[str]:
    sets = ctx.sets({key: None for key in PATH_KEYS[:3]} | {"train.max_steps": 2}, root)
    grid = ["--grid", "train.random_seed=[0,1]", "--results", str(root / "sweep")]
    return [sys.executable, str(ctx.probe.repo / SCRIPTS["sweep"]), *ALL_CONFIGS, *sets, *grid]


def study_argv(ctx: Ctx, root: Path) -> list[str]:
    sets = ctx.sets({key: None for key in PATH_KEYS} | {"model.seq_len": None, "train.max_steps": 2}, root)
    options = "--quick --corpus builtin --designs seen --seeds 1 --n-boot 5 --n-perm 5".split()
    return [sys.executable, str(ctx.probe.repo / SCRIPTS["study"]), *options, "--out", str(root / "study"), *sets]


def has_runs(folder: Path, n: int) -> bool:
    return folder.is_dir() and sum(path.is_dir() for path in folder.iterdir()) >= n


@case("kill/sweep_mid_run", SAME, slow=True, alone=True, base=False)
def _kill_sweep(ctx):
    ready = lambda sweep: (sweep / "runs/random_seed-1/checkpoints").exists()  # noqa: E731
    short = "sweep --grid train.random_seed=[0,1] (killed in run 2's step 3, rerun)"
    return kill_sweep_like(ctx, sweep_argv, ready, short, "sweep")


@case("kill/study_mid_run", SAME, slow=True, alone=True, base=False)
def _kill_study(ctx):
    ready = lambda study: has_runs(study / "builtin-seen/runs", 3)  # noqa: E731
    short = "study --quick --corpus builtin --designs seen --seeds 1 (killed in run 3's step 3, rerun)"
    return kill_sweep_like(ctx, study_argv, ready, short, "study")


@case("kill/rerun_steps_1_2_unchanged_keeps_trained_run", WORKS, base=False)
def _rerun_same(ctx):
    """What a rerun after a kill does to what was made before: steps 1-2 again with the same settings (the same
    data) must leave a run trained on them usable by step 4."""
    steps = [(1, [], None), (2, [], None), (3, ["--tag", "base"], None), (1, [], None), (2, [], None)]
    outcome = steps_in_turn(ctx, [*steps, (4, step4_args(ctx.dir / "results"), None)], expect=WORKS)
    outcome.cmd = "s1; s2; s3 --tag base; s1; s2 (same settings); " + outcome.cmd.rsplit("; ", 1)[-1]
    return outcome


# ---- [concurrency] --------------------------------------------------------------------------------------------------


@case("concurrency/two_step4_one_save_path", EITHER, alone=True)
def _two_step4(ctx):
    ctx.copy_base(*TRAINED)
    argv, began = ctx.argv(4, step4_args(ctx.dir / "results")), time.monotonic()
    both = [ctx.start(argv), ctx.start(argv)]
    runs = [ctx.finish(started, "2 x s4 --run base --save_path results", began, ctx.probe.timeout) for started in both]
    codes, refused = sorted(run.rc for run in runs), [run for run in runs if run.rc == 2]
    diffs = compare_trees(ctx.dir / "results/base", ctx.probe.base / "results/base", (ctx.dir, ctx.probe.base))
    problems = [f"exits {codes}"] if codes not in ([0, 0], [0, 2]) else []
    problems += [f"the result differs from one run's: {listing(diffs)}"] if diffs else []
    problems += [f"left {listing(leftovers(ctx.dir))}"] if leftovers(ctx.dir) else []
    problems += [f"the refusal: {problem}" for run in refused for problem in refusal_problems(run)]
    what = "one refused, one complete" if refused else "both complete and equal"
    line = first_line(refused[0] if refused else runs[0])
    return Outcome(
        runs[0].short, "/".join(map(str, codes)), line, "FAIL" if problems else "ok", "; ".join(problems) or what
    )


def mount_tmpfs(folder: Path, size: str, *options: str) -> str | None:
    folder.mkdir(parents=True, exist_ok=True)
    option = ",".join([f"size={size}", *options])
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", option, "tmpfs", str(folder)], capture_output=True, text=True)
    return None if done.returncode == 0 else (done.stderr.strip() or "mount failed")


def on_tmpfs(name: str, size: str, options: tuple, fill: bool) -> None:
    """A case: step 4 with --save_path on a small tmpfs (root only) holding the previous results (kept), filled up
    (fill) or mounted read-only (options)."""

    def fn(ctx: Ctx) -> Outcome:
        ctx.copy_base(*TRAINED)
        mounted = ctx.dir / "mounted"
        problem = mount_tmpfs(mounted, size, *[option for option in options if option != "ro"])
        if problem:
            return Outcome("s4 --save_path mounted/results", "-", problem, "skip", "cannot mount a tmpfs (needs root)")
        try:
            shutil.copytree(ctx.probe.base / "results", mounted / "results")  # the previous output, to be kept
            stat = os.statvfs(mounted)
            if fill:
                (mounted / "filler").write_bytes(b"0" * max(0, stat.f_bavail * stat.f_frsize - 16 * 1024))
            if "ro" in options:
                subprocess.run(["mount", "-o", "remount,ro", str(mounted)], check=True, capture_output=True)
            before = snapshot(ctx.dir)
            return judge(ctx, step4(ctx, mounted / "results"), REFUSE, before)
        finally:
            subprocess.run(["umount", "-l", str(mounted)], capture_output=True)

    case(name, REFUSE, fn)


on_tmpfs("concurrency/disk_full_step4", "2m", (), fill=True)


# ---- [corpus] -------------------------------------------------------------------------------------------------------


def write_csv(path: Path, rows, newline="\n", bom=False, encoding="utf-8") -> None:
    quote = lambda value: '"' + str(value).replace('"', '""') + '"'  # noqa: E731
    text = newline.join(["body,subreddit", *(f"{quote(t)},{quote(c)}" for t, c in rows)]) + newline
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode(encoding))


def plain(topics=("a", "b"), n=120) -> list[tuple]:
    return [(f"doc {i} on {t} with words {i} {i * 3} {i * 11}", t) for t in topics for i in range(n)]


def drawn(alphabet, topics, lo=4, hi=14, sep=" ", n=120) -> list[tuple]:
    rng, rows = random.Random(0), []
    for topic in topics:
        texts = {sep.join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi))) for _ in range(n)}
        rows += [(text, topic) for text in sorted(texts)]
    return rows


EMOJI = [chr(c) for c in range(0x1F600, 0x1F640)] + ["👍🏽", "❤️", "🇫🇷", "👨‍👩‍👧", "🧑🏿‍💻"]
RTL = "مرحبا كتاب مدرسة بيت شمس قمر ماء سماء שלום ספר בית מים שמש ירח עולם אור \u200f".split(" ")
LONG_LABEL = "L" * 10_000
CORPORA = {  # name: (rows (None: a symlink loop), eval_topics, extra --set, write_csv options)
    "one_topic": (plain(("a",), 240), [], {}, {}),
    "topic_with_one_document": (plain() + [("the only document of c", "c")], ["c"], {}, {}),
    "test_len_0": (plain(), ["b"], {"dataset.load_params.test_len": 0}, {}),
    "corpus_too_small_for_splits": (plain(n=3), ["b"], {}, {}),
    "all_texts_empty": ([("", t) for t in "ab" for _ in range(50)], ["b"], {}, {}),
    "emoji_only": (drawn(EMOJI, ("🐱", "🐶"), sep=""), ["🐶"], {}, {}),
    "cjk_only": (drawn([chr(c) for c in range(0x4E00, 0x4F90)], ("猫", "犬"), 8, 30, sep=""), ["犬"], {}, {}),
    "rtl_only": (drawn(RTL, ("عربي", "עברית")), ["עברית"], {}, {}),
    "control_chars_only": (drawn([chr(c) for c in [*range(1, 32), 0x7F, 0x85]], "ab", sep=""), ["b"], {}, {}),
    "nul_bytes_in_texts": ([(t.replace(" on ", " o\x00n "), c) for t, c in plain()], ["b"], {}, {}),
    "csv_crlf": (plain(), ["b"], {}, {"newline": "\r\n"}),
    "csv_utf8_bom": (plain(), ["b"], {}, {"bom": True}),
    "topic_label_10000_chars": (plain(("a", LONG_LABEL)), [LONG_LABEL], {}, {}),
    "ten_thousand_topics": (
        [(f"doc {i} of {i % 10_000} w {i * 7}", f"t{i % 10_000}") for i in range(20_000)],
        ["t0"],
        {},
        {},
    ),
    "latin1_file": (drawn("café naïve façade déjà über smörgåsbord".split(), "ab"), ["b"], {}, {"encoding": "latin-1"}),
    "symlink_loop": (None, ["b"], {}, {}),
}


def corpus_sets(path: Path, eval_topics: list[str], extra: dict) -> dict:
    files = {"source": "files", "data_files": json.dumps([str(path)]), "text_field": "body", "topic_field": "subreddit"}
    sizes = {"train_len": 60, "valid_len": 10, "test_len": 10, "topic_len": 30}
    topics = {"dataset.data_params.eval_topics": json.dumps(eval_topics, ensure_ascii=False)}
    return {f"dataset.load_params.{key}": value for key, value in {**files, **sizes}.items()} | topics | extra


def steps_in_turn(ctx: Ctx, steps, expect=EITHER, shown=None) -> Outcome:
    """Run (step, args, over) in turn; the row is the first that does not exit 0 cleanly, or the last."""
    done = ""
    for number, (step, args, over) in enumerate(steps):
        before = snapshot(ctx.dir)
        outcome = judge(ctx, ctx.step(step, *args, over=over, shown=shown), expect, before, prefix=done)
        if outcome.rc != 0 or number == len(steps) - 1 or outcome.verdict != "ok":
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
        over, shown = corpus_sets(path, eval_topics, extra), {"...data_files": "[corpus.csv]", **extra}
        return steps_in_turn(ctx, [(1, [], over), (2, [], over)], shown=shown)


# ---- [sizes] --------------------------------------------------------------------------------------------------------

ONE_STEP = {"train.max_steps": 1, "train.save_steps": 1, "train.eval_steps": 1}
STEP2_SIZES = [("model.seq_len", 1), ("model.seq_len", 2), ("model.seq_len", 4096)]
STEP2_SIZES.append(("dataset.data_params.tokenizer_vocab_size", 5))
for _key, _value in STEP2_SIZES:  # step 2, then one step of step 3

    @case(f"sizes/{_key.rsplit('.', 1)[1]}_{_value}", EITHER)
    def _step2_size(ctx, shown={_key: _value}):  # noqa: B006
        ctx.copy_base("processed")
        over = {**shown, **ONE_STEP}
        return steps_in_turn(ctx, [(2, [], over), (3, ["--tag", "t"], over)], shown=shown)


SIZES = {  # step 3 on the base's data, two steps
    "n_experts_1000": {"model.n_experts": 1000},
    "top_k_experts_0": {"model.top_k_experts": 0},
    "top_k_experts_above_n_experts": {"model.top_k_experts": 5},
    "capacity_factor_0": {"model.capacity_factor": 0},
    "learning_rate_negative": {"train.learning_rate": -1},
    "learning_rate_nan": {"train.learning_rate": ".nan"},
    "batch_size_above_data_set": {"train.batch_size": 100_000},
}
for _name, _over in SIZES.items():
    simple(f"sizes/{_name}", EITHER, ("processed", "masked"), lambda ctx: None,
           lambda ctx, over=_over: train(ctx, **over, **{"train.max_steps": 2}))  # fmt: skip


# ---- [resume] -------------------------------------------------------------------------------------------------------

simple("resume/changed_model_n_experts", REFUSE, TRAINED, interrupt, lambda ctx: resume(ctx, **{"model.n_experts": 8}))
_lr = {"train.learning_rate": 0.002}
simple("resume/changed_learning_rate", REFUSE, TRAINED, interrupt, lambda ctx: resume(ctx, **_lr))


def not_mixed(tag: str):
    """A check: a run resumed from another tag's checkpoint leaves that run alone and starts its own Aim run."""

    def check(ctx: Ctx):
        before = snapshot(ctx.dir / "runs/base")

        def problems(run: Run) -> str | None:
            if run.rc != 0:
                return None
            found = [f"base: {text}" for text in changes(ctx.dir / "runs/base", before)]
            manifest = ctx.dir / "runs" / tag / "manifest.json"
            ours = json.loads(manifest.read_text(encoding="utf-8")) if manifest.is_file() else {}
            theirs = json.loads((ctx.probe.base / "runs/base/manifest.json").read_text(encoding="utf-8"))
            if ours.get("aim_run_hash") == theirs.get("aim_run_hash"):
                found.append(f"tag {tag} continued base's Aim run {theirs.get('aim_run_hash')}")
            return "; ".join(found) or None

        return problems

    return check


# --help: "--resume latest|PATH: continue the run --tag from its newest checkpoint, or from a checkpoint folder"
simple(
    "resume/other_tags_checkpoint_by_path", EITHER, TRAINED, interrupt,
    lambda ctx: ctx.step(3, "--tag", "fresh", "--resume", ctx.dir / "runs/base/checkpoints/step-000002"),
    not_mixed("fresh"),
)  # fmt: skip
_copy_in = lambda ctx: shutil.copytree(interrupt(ctx).parent, ctx.dir / "runs/copied/checkpoints")  # noqa: E731
simple(
    "resume/other_tags_checkpoints_copied_in", REFUSE, TRAINED, _copy_in,
    lambda ctx: ctx.step(3, "--tag", "copied", "--resume", "latest"), not_mixed("copied"),
)  # fmt: skip


# ---- [yaml] ---------------------------------------------------------------------------------------------------------

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
  eval_topics: [programming, gaming]
  train_topics: []
  mask_prob: 0.15
  tokenizer_name: null
  tokenizer_vocab_size: 300
"""


def anchors_resolved(ctx: Ctx):
    def check(run: Run) -> str | None:
        if run.rc != 0:
            return None
        load = json.loads((ctx.dir / "processed/manifest.json").read_text(encoding="utf-8"))["config"]["load_params"]
        found = (load["test_len"], load["topic_len"], load["builtin"]["n_topics"], load["builtin"]["n_docs"])
        return None if found == (40, 40, 4, 600) else f"the anchors gave {found}, not (40, 40, 4, 600)"

    return check


YAML_FILES = {  # name: (edit of the demo dataset config's text, expect, texts a refusal's line holds)
    "tab_indentation": (lambda t: t.replace("\n  source:", "\n\tsource:"), REFUSE, ()),
    "duplicate_key": (lambda t: t.replace("  mask_prob: 0.15", "  mask_prob: 0.15\n  mask_prob: 0.3"), REFUSE, ()),
    "anchors_aliases_merge": (lambda t: ANCHORS, WORKS, ()),
    "unknown_key": (lambda t: t.replace("  mask_prob:", "  shuffle_buffer: 100\n  mask_prob:"), REFUSE, ()),
    "typo_one_edit_away": (lambda t: t.replace("  mask_prob:", "  mask_prb:"), REFUSE, ("did you mean",)),
}
NO_LOAD_SETS = {key: None for key in TINY if key.startswith("dataset.load_params")}  # the file's own values
for _name, (_edit_text, _expect, _texts) in YAML_FILES.items():

    def _write(ctx, edit=_edit_text):
        demo = (ctx.probe.repo / "configs/demo/dataset_params.yaml").read_text(encoding="utf-8")
        (ctx.dir / "dataset_params.yaml").write_text(edit(demo), encoding="utf-8")

    _run = lambda ctx: ctx.step(1, over=NO_LOAD_SETS, configs=["--config-name", ctx.dir / "dataset_params.yaml"])  # noqa: E731
    _check = anchors_resolved if _expect == WORKS else (lambda ctx, texts=_texts: must_say(*texts))
    simple(f"yaml/file_{_name}", _expect, (), _write, _run, _check)


def _model_typo(ctx: Ctx) -> None:
    demo = (ctx.probe.repo / "configs/demo/model_params.yaml").read_text(encoding="utf-8")
    (ctx.dir / "model_params.yaml").write_text(demo.replace("n_experts:", "n_expert:"), encoding="utf-8")


_configs = lambda ctx: [*CONFIGS[2][:2], "--config-model", ctx.dir / "model_params.yaml"]  # noqa: E731
simple(
    "yaml/file_model_typo_step2", REFUSE, ("processed",), _model_typo,
    lambda ctx: ctx.step(2, over={"model.n_experts": None}, configs=_configs(ctx)), lambda ctx: must_say("did you mean"),
)  # fmt: skip
simple(
    "yaml/config_path_is_a_folder", REFUSE, (), lambda ctx: (ctx.dir / "a_folder.yaml").mkdir(),
    lambda ctx: ctx.step(1, configs=["--config-name", ctx.dir / "a_folder.yaml"]),
)  # fmt: skip
YAML_SETS = {  # name: (--set, expect, texts a refusal's line holds)
    "unknown_key": ({"dataset.load_params.shuffle_buffer": 100}, REFUSE, ()),
    "typo_one_edit_away": ({"dataset.data_params.mask_prb": 0.2}, REFUSE, ("did you mean",)),
    "typo_in_section": ({"dataset.load_param.train_len": 300}, REFUSE, ("did you mean",)),
    "duplicate_key_in_value": ({"dataset.load_params.builtin": "{n_docs: 600, n_docs: 700}"}, REFUSE, ()),
    "merge_key_in_value": ({"dataset.load_params.builtin": "{<<: {n_topics: 4}, n_docs: 600}"}, WORKS, ()),
    "tab_in_value": ({"dataset.load_params.builtin": "{n_docs:\t600}"}, EITHER, ()),
}
for _name, (_over, _expect, _texts) in YAML_SETS.items():
    _over = {"dataset.load_params.builtin.n_docs": None, **_over}  # the dotted key would override the mapping
    simple(f"yaml/set_{_name}", _expect, (), lambda ctx: None, lambda ctx, over=_over: ctx.step(1, over=over),
           lambda ctx, texts=_texts: must_say(*texts))  # fmt: skip


# ---- [perm] ---------------------------------------------------------------------------------------------------------


def unwritable(step: int, parts: tuple, args: Callable, over: Callable = lambda ctx: None):
    """A case: the step's output folder is inside a folder without write permission (mode 0555), run unprivileged."""

    def fn(ctx: Ctx) -> Outcome:
        ctx.copy_base(*parts)
        found, locked = ctx.probe.unprivileged(), ctx.dir / "locked"
        if found is None:
            return Outcome(f"s{step}", "-", "", "skip", "neither nobody nor root without CAP_DAC_OVERRIDE can run it")
        locked.mkdir()
        os.chmod(locked, 0o555)
        try:
            before = snapshot(ctx.dir)
            outcome = judge(ctx, ctx.step(step, *args(locked), over=over(locked), wrap=found[0]), REFUSE, before)
        finally:
            os.chmod(locked, 0o755)
        outcome.reason += f" ({found[1]})"
        return outcome

    return fn


_processed_in = lambda locked: {"dataset.data_params.processed_dir": locked / "processed"}  # noqa: E731
case("perm/step1_output_folder_not_writable", REFUSE, unwritable(1, (), lambda locked: [], _processed_in), base=False)
case("perm/step4_save_path_not_writable", REFUSE, unwritable(4, TRAINED, lambda locked: step4_args(locked / "results")))
on_tmpfs("perm/step4_save_path_on_read_only_fs", "4m", ("ro",), fill=False)


# ---- [aim] ----------------------------------------------------------------------------------------------------------


def aim_case(name: str, damage) -> None:
    """Train a new tag on a damaged Aim repository: it warns and trains, or refuses before its first step (the run
    folder stays empty; the .aim folder itself may change)."""

    def fn(ctx: Ctx) -> Outcome:
        ctx.copy_base("processed", "masked", ".aim")
        holder = damage(ctx.dir / ".aim")
        try:
            before = snapshot(ctx.dir)
            run = ctx.step(3, "--tag", "t", timeout=min(90, ctx.probe.timeout))
        finally:
            if holder is not None:
                kill_group(holder)
        return judge(ctx, run, EITHER, before, ignore=(".aim",))

    case(name, EITHER, fn)


def garbage(aim: Path) -> None:
    rng = random.Random(1)
    for path in aim.rglob("*"):
        if path.is_file():
            path.write_bytes(rng.randbytes(max(64, min(path.stat().st_size, 4096))))


def stale_soft_lock(aim: Path) -> None:
    (aim / "locks").mkdir(exist_ok=True)
    (aim / "locks/structured_db_lock").write_text("", encoding="utf-8")  # Aim's SoftFileLock is this file existing


def sqlite_held(aim: Path) -> subprocess.Popen:
    """Another process holds an exclusive transaction on the repository's run database (as a busy writer would)."""
    code = "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
    code += "c.execute('BEGIN EXCLUSIVE'); print('held', flush=True); time.sleep(600)"
    argv = [sys.executable, "-c", code, str(aim / "run_metadata.sqlite")]
    holder = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True)
    LIVE.append(holder)
    holder.stdout.readline()
    return holder


aim_case("aim/corrupt_repository", garbage)
aim_case("aim/stale_soft_lock", stale_soft_lock)
aim_case("aim/database_locked_by_another_process", sqlite_held)


# ---- [scale] --------------------------------------------------------------------------------------------------------


def huge(option: str):
    """Step 4 with a huge resample count: a quick one-line refusal with a time estimate (or a quick run), within
    90 s; a silent long run is a FAIL."""

    def fn(ctx: Ctx) -> Outcome:
        ctx.copy_base(*TRAINED)
        before = snapshot(ctx.dir)
        run = ctx.step(4, *step4_args(ctx.dir / "results", **{option: 10_000_000}), timeout=90)
        outcome = judge(ctx, run, EITHER, before)
        if run.timed_out:
            outcome.reason = "ran past 90 s without an estimate"
        elif run.rc == 2 and outcome.verdict == "ok" and run.seconds > 60:
            outcome.verdict, outcome.reason = "FAIL", f"refused only after {run.seconds:.0f} s"
        elif run.rc == 2 and outcome.verdict == "ok" and not TIME_ESTIMATE.search(first_line(run)):
            outcome.verdict, outcome.reason = "FAIL", "refused without a time estimate"
        return outcome

    return fn


case("scale/step4_n_perm_10000000", EITHER, huge("--n-perm"))
case("scale/step4_n_boot_10000000", EITHER, huge("--n-boot"))


# ---- running --------------------------------------------------------------------------------------------------------


def run_case(probe: Probe, item: Case) -> tuple[Case, Outcome, float]:
    began = time.monotonic()
    try:
        if item.base:
            probe.ensure_base()
        outcome = item.fn(Ctx(probe, item.name))
    except Exception as error:  # a broken case is a FAIL row, never the end of the probe
        text = (str(error).strip().splitlines() or [""])[0]
        outcome = Outcome("-", "-", f"{type(error).__name__}: {text}", "FAIL", "probe error")
    seconds = time.monotonic() - began
    log(f"{outcome.verdict:4} {item.name} ({seconds:.0f} s): {outcome.reason}")
    return item, outcome, seconds


def table(rows, cut: bool) -> list[str]:
    short = lambda text, n: text if not cut or len(text) <= n else text[: n - 3] + "..."  # noqa: E731
    lines = ["| case | command | exit | first line | verdict |", "|---|---|---|---|---|"]
    for item, outcome, _ in rows:
        verdict = f"{outcome.verdict}: {outcome.reason}" if outcome.reason else outcome.verdict
        cells = (item.name, short(outcome.cmd, 80), outcome.rc, short(outcome.line, 160), short(verdict, 120))
        lines.append("| " + " | ".join(str(cell).replace("|", "\\|").replace("\n", " ") for cell in cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=str(Path(__file__).resolve().parents[2]), help="the checkout under test")
    parser.add_argument("--only", action="append", default=[], help="cases whose name holds this (repeatable)")
    parser.add_argument("--skip", action="append", default=[], help="leave out cases whose name holds this")
    parser.add_argument("--slow", action="store_true", help="also the slow cases (sweep and study kills)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--markdown", help="also write the table (lines not cut) to this file")
    parser.add_argument("--workdir", help="work folder (default: a fresh temporary one, kept)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per command (default 300)")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2)")
    args = parser.parse_args()

    def chosen(item: Case) -> bool:
        names = [item.name] + (["slow"] if item.slow else [])
        matches = lambda texts: any(text in name for text in texts for name in names)  # noqa: E731
        return (matches(args.only) if args.only else args.slow or not item.slow) and not matches(args.skip)

    selected = [item for item in CASES if chosen(item)]
    if args.list:
        for item in CASES:
            flags = " ".join(flag for flag in ("slow", "alone") if getattr(item, flag))
            print(f"{item.name:50} {item.expect:16} {flags:11}{'' if item in selected else '(not selected)'}")
        return 0
    probe, began, rows = Probe(args), time.monotonic(), []
    log(f"probe: {len(selected)} case(s) against {probe.repo}; work folder {probe.work}")
    pool = ThreadPoolExecutor(max(1, args.jobs))
    try:
        rows += pool.map(lambda item: run_case(probe, item), [item for item in selected if not item.alone])
        rows += [run_case(probe, item) for item in selected if item.alone]
    finally:  # also when interrupted: no step goes on running in the background
        STOP.set()
        for process in LIVE:
            if process.poll() is None:
                kill_group(process)
        pool.shutdown(cancel_futures=True)
    rows.sort(key=lambda row: CASES.index(row[0]))
    counts = {verdict: sum(row[1].verdict == verdict for row in rows) for verdict in ("ok", "FAIL", "skip")}
    summary = f"cases {len(rows)}, ok {counts['ok']}, FAIL {counts['FAIL']}, skip {counts['skip']}; "
    summary += f"{time.monotonic() - began:.0f} s; work folder {probe.work}"
    print("\n".join([*table(rows, cut=True), "", summary]))
    if args.markdown:
        Path(args.markdown).write_text("\n".join([*table(rows, cut=False), "", summary, ""]), encoding="utf-8")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
