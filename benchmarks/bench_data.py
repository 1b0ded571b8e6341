"""Benchmark the data pipeline: step 1 (load + split) and step 2 (tokenize + mask) on the builtin corpus.

Each step runs as a user runs it, `python data_processors/<step>.py ... --set ...`, in a child process, on
builtin corpora of several sizes; step 2 runs once per `--num-proc` value (1 and all cores by default).
Measured per run:
  step_s      the step's own time, from its manifest ("seconds": after imports and config parsing)
  wall_s      the child's wall time, including interpreter start and imports
  docs_per_s  documents / step_s (the throughput; docs_per_s_wall = documents / wall_s)
  anon_peak_mb the memory the machine needs, and the one the memory check uses: the peak of the summed
              proportional anonymous memory (Pss_Anon + Pss_Shmem of /proc/PID/smaps_rollup) of the child
              and all its descendants, sampled every 50 ms (None without psutil or smaps_rollup; the
              check then falls back to peak_rss_mb). Anonymous memory is what the processes allocated
              (Python objects, Arrow buffers); it can only leave RAM through swap. Pages shared by
              forked map workers are counted once, split between the sharers.
  pss_peak_mb the peak of the summed proportional RSS (Pss) of the tree: anonymous plus file-backed
  peak_rss_mb the child's peak resident set size, from os.wait4 (ru_maxrss: the largest single process of
              the child and its waited-for workers, not their sum; Linux starts it at this small parent's
              RSS, carried over fork + exec). Raw, kept for comparison: it includes file-backed pages
  tree_peak_mb the summed RSS of the child and all its descendants, sampled with the above (raw: pages
              shared by forked workers count once per process, file-backed pages count)
Why not RSS: step 2 reads and writes its data through memory-mapped Arrow files, and every page it
touches (e.g. when save_to_disk copies the mapped result of datasets.map) stays in its RSS as RssFile
for as long as the file is mapped: about the size of the output (1 GiB at 1M documents). Those pages
are clean page cache that the kernel drops under memory pressure and reads again on demand, so they
grow with the corpus without being memory the machine must have.
"Documents" are the documents the step wrote: step 1, the rows it kept in train/valid/test (the corpus is
split with train_len = n_docs - 2, valid_len = test_len = 1 and no evaluation topic, so every generated
document is kept); step 2, the documents in all its output splits (from its manifest), i.e. every document
tokenized and masked.

Step 2 uses a tokenizer trained once beforehand (step 2 on a small corpus, timed and reported as
`tokenizer_training`), loaded with data_params.tokenizer_name, so training it does not dominate step 2.
Step 1 has no parallel mode (one process reads and splits the corpus): it runs once per size.
The HF datasets cache of the children is pointed into the work folder and emptied before every step 2 run
(each run starts cold, as a first run does: no map results cached by an earlier run); the folder is removed
at the end.
Examples:
    python benchmarks/bench_data.py --quick
    python benchmarks/bench_data.py --json results/bench_data.json       # 10k, 100k, 1M documents
    python benchmarks/bench_data.py --sizes 10000 100000 --num-proc 1 2 4 --repeats 3
"""

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a script: import the project, not this folder

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time

from benchmarks.common import finish, make_parser
from config_utils.contracts import step_script

REPO = Path(__file__).resolve().parents[1]
STEP1, STEP2 = step_script(1), step_script(2)

ROWS_PER_PROCESS = 2000  # data_processors/dataset.py: one map worker per this many rows of a split, at most
LINEARITY_MAX_FACTOR = 1.5  # docs/s at the smallest size / docs/s at the largest size (step 2)
MEMORY_MAX_RATIO = 2.0  # step 2 peak anonymous memory at the largest size / at a size 10x smaller (1M vs 100k)


# --------------------------------------------------------------------------------------------------
# Running one child and measuring it
# --------------------------------------------------------------------------------------------------


def smaps_rollup_kib(pid: int) -> dict[str, int] | None:
    """The fields of /proc/PID/smaps_rollup in KiB (Linux >= 4.14), None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            text = f.read()
    except OSError:
        return None
    fields = {}
    for line in text.splitlines()[1:]:
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            fields[key] = int(parts[0])
    return fields


class TreeSampler:
    """Peaks of the summed memory of a process and its descendants, sampled in a thread (needs psutil).

    peak_rss: RSS summed (raw); peak_pss: Pss summed; peak_anon: Pss_Anon + Pss_Shmem summed (bytes;
    the last two None where smaps_rollup cannot be read).
    """

    def __init__(self, pid: int, interval: float = 0.05):
        self.peak_rss = self.peak_pss = self.peak_anon = None
        try:
            import psutil
        except ImportError:
            self._thread = None
            return
        self.peak_rss = 0
        self._smaps = smaps_rollup_kib(pid) is not None
        if self._smaps:
            self.peak_pss = self.peak_anon = 0
        self._psutil, self._pid, self._interval = psutil, pid, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        psutil = self._psutil
        try:
            root = psutil.Process(self._pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            rss = pss = anon = 0
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.Error:
                break
            for proc in procs:
                try:
                    rss += proc.memory_info().rss
                except psutil.Error:
                    continue
                if self._smaps:
                    fields = smaps_rollup_kib(proc.pid) or {}
                    pss += fields.get("Pss", 0) * 1024
                    anon += (fields.get("Pss_Anon", 0) + fields.get("Pss_Shmem", 0)) * 1024
            self.peak_rss = max(self.peak_rss, rss)
            if self._smaps:
                self.peak_pss, self.peak_anon = max(self.peak_pss, pss), max(self.peak_anon, anon)
            self._stop.wait(self._interval)

    def stop(self) -> dict:
        """{"tree_peak_mb", "pss_peak_mb", "anon_peak_mb"} in MiB, None where not measured."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        return {
            key: None if value is None else value / 2**20
            for key, value in (
                ("tree_peak_mb", self.peak_rss),
                ("pss_peak_mb", self.peak_pss),
                ("anon_peak_mb", self.peak_anon),
            )
        }


def run_child(argv: list[str], env: dict, log_path: Path) -> dict:
    """Run argv, wait with os.wait4 (the child's own rusage); wall time, peak RSS, return code."""
    with open(log_path, "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait again
        peaks = sampler.stop()
    return {
        "rc": proc.returncode,
        "wall_s": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # KiB on Linux
        **peaks,
        "cpu_s": usage.ru_utime + usage.ru_stime,
    }


def tail(path: Path, n: int = 15) -> str:
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-n:])


def step1_args(n_docs: int, processed_dir: Path) -> list[str]:
    return [
        sys.executable,
        str(STEP1),
        "--config-name",
        "demo/dataset_params.yaml",
        *sets(
            {
                "dataset.load_params.builtin.n_docs": n_docs,
                "dataset.load_params.train_len": max(n_docs - 2, 1),
                "dataset.load_params.valid_len": 1,
                "dataset.load_params.test_len": 1,
                "dataset.load_params.topic_len": 1,
                "dataset.data_params.eval_topics": "[]",
                "dataset.data_params.processed_dir": processed_dir,
            }
        ),
    ]


def step2_args(
    processed_dir: Path, masked_dir: Path, num_proc: int, tokenizer: str | None, vocab_size: int
) -> list[str]:
    # step 2 checks that its dataset settings match step 1's manifest: pass the same step-1 overrides
    n_docs = json.loads((processed_dir / "manifest.json").read_text())["config"]["load_params"]["builtin"]["n_docs"]
    step1_sets = step1_args(n_docs, processed_dir)[4:]
    return [
        sys.executable,
        str(STEP2),
        "--config-dataset",
        "demo/dataset_params.yaml",
        "--config-model",
        "demo/model_params.yaml",
        *step1_sets,
        *sets(
            {
                "dataset.data_params.masked_dir": masked_dir,
                "dataset.data_params.num_proc": num_proc,
                "dataset.data_params.tokenizer_name": tokenizer if tokenizer else "null",
                "dataset.data_params.tokenizer_vocab_size": vocab_size,
            }
        ),
    ]


def sets(overrides: dict) -> list[str]:
    args = []
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    return args


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def step2_documents(m: dict) -> int:
    return sum(int(c["documents"]) for c in m["counts"].values())


def step1_documents(m: dict) -> int:
    counts = m["counts"]
    return sum(int(counts[name]) for name in ("train", "valid", "test")) + sum(
        int(v) for v in counts["topics"].values()
    )


class ChildFailed(RuntimeError):
    pass


def measured(argv, env, log_path, what: str) -> dict:
    result = run_child(argv, env, log_path)
    if result["rc"] != 0:
        raise ChildFailed(f"{what} exited {result['rc']}; last lines of {log_path}:\n{tail(log_path)}")
    return result


# --------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------


def train_tokenizer(work: Path, env: dict, n_docs: int, vocab_size: int, log=print) -> tuple[str, dict]:
    """Steps 1 and 2 on a small corpus with tokenizer training; returns (tokenizer folder, timing)."""
    processed, masked = work / "tok_processed", work / "tok_masked"
    measured(step1_args(n_docs, processed), env, work / "tok_step1.log", "step 1 (tokenizer corpus)")
    r = measured(
        step2_args(processed, masked, 1, None, vocab_size), env, work / "tok_step2.log", "step 2 (tokenizer training)"
    )
    m = manifest(masked)
    if log:
        log(
            f"  tokenizer: trained on {n_docs} documents (vocab {m['tokenizer']['vocab_size']}) in step 2 of "
            f"{m['seconds']:.1f} s (with tokenizing them)"
        )
    shutil.rmtree(processed, ignore_errors=True)
    return str(masked / "tokenizer"), {
        "train_docs": n_docs,
        "vocab_size": m["tokenizer"]["vocab_size"],
        "step2_with_training_s": float(m["seconds"]),
        "wall_s": round(r["wall_s"], 3),
    }


def run_benchmark(
    sizes,
    num_procs,
    repeats=1,
    tokenizer=None,
    tokenizer_docs=10000,
    vocab_size=2000,
    workdir=None,
    keep=False,
    log=print,
) -> dict:
    """Every size: step 1 `repeats` times, then step 2 per num_proc `repeats` times (order rotating)."""
    own_work = workdir is None
    work = Path(tempfile.mkdtemp(prefix="bench_data_")) if own_work else Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        HF_DATASETS_CACHE=str(work / "hf_cache"),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TQDM_DISABLE="1",
    )
    cases, meta = [], {"cpu_count": os.cpu_count(), "repeats": repeats, "python": sys.version.split()[0]}
    try:
        if tokenizer is None:
            tokenizer, meta["tokenizer_training"] = train_tokenizer(work, env, tokenizer_docs, vocab_size, log)
        meta["tokenizer"] = tokenizer
        for n_docs in sizes:
            processed = work / f"processed_{n_docs}"
            runs1 = []
            for r in range(repeats):
                res = measured(
                    step1_args(n_docs, processed), env, work / f"step1_{n_docs}_{r}.log", f"step 1 (n_docs={n_docs})"
                )
                m = manifest(processed)
                res.update(step_s=float(m["seconds"]), documents=step1_documents(m))
                runs1.append(res)
            cases.append(summarise("step1", n_docs, None, runs1))
            if log:
                log("  " + one_row(cases[-1]))
            runs2 = {p: [] for p in num_procs}
            for r in range(repeats):
                order = num_procs[r % len(num_procs) :] + num_procs[: r % len(num_procs)]
                for p in order:
                    masked = work / f"masked_{n_docs}_{p}"
                    # every run starts cold: no Arrow/map cache from an earlier run of the same input
                    shutil.rmtree(work / "hf_cache", ignore_errors=True)
                    res = measured(
                        step2_args(processed, masked, p, tokenizer, vocab_size),
                        env,
                        work / f"step2_{n_docs}_{p}_{r}.log",
                        f"step 2 (n_docs={n_docs}, num_proc={p})",
                    )
                    m = manifest(masked)
                    res.update(
                        step_s=float(m["seconds"]),
                        documents=step2_documents(m),
                        workers=min(p, m["counts"]["train"]["documents"] // ROWS_PER_PROCESS) or 1,
                    )
                    runs2[p].append(res)
                    if not keep:
                        shutil.rmtree(masked, ignore_errors=True)
            for p in num_procs:
                cases.append(summarise("step2", n_docs, p, runs2[p]))
                if log:
                    log("  " + one_row(cases[-1]))
            if not keep:
                shutil.rmtree(processed, ignore_errors=True)
                shutil.rmtree(work / "hf_cache", ignore_errors=True)
    finally:
        if own_work and not keep:
            shutil.rmtree(work, ignore_errors=True)
    meta["workdir"] = str(work) if keep else None
    meta["method"] = (
        "children run as `python data_processors/<step>.py`; step_s from the step's manifest; "
        "sampled every 50 ms over the process tree: anon_peak_mb = peak of summed Pss_Anon + Pss_Shmem "
        "(smaps_rollup; the memory check), pss_peak_mb = peak of summed Pss, tree_peak_mb = peak of "
        "summed RSS (raw); peak_rss_mb = os.wait4 ru_maxrss (largest single process, raw)"
    )
    return {"cases": cases, "checks": check_summary(cases), "meta": meta}


def summarise(step: str, n_docs: int, num_proc, runs: list[dict]) -> dict:
    step_s = statistics.median(r["step_s"] for r in runs)
    wall_s = statistics.median(r["wall_s"] for r in runs)
    documents = runs[0]["documents"]

    def peak(key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return round(max(values), 1) if values else None

    return {
        "step": step,
        "n_docs": n_docs,
        "num_proc": num_proc,
        "workers": runs[0].get("workers"),
        "documents": documents,
        "step_s": round(step_s, 3),
        "wall_s": round(wall_s, 3),
        "docs_per_s": documents / step_s if step_s > 0 else None,
        "docs_per_s_wall": documents / wall_s if wall_s > 0 else None,
        "peak_rss_mb": peak("peak_rss_mb"),
        "tree_peak_mb": peak("tree_peak_mb"),
        "pss_peak_mb": peak("pss_peak_mb"),
        "anon_peak_mb": peak("anon_peak_mb"),
        "step_s_all": [round(r["step_s"], 3) for r in runs],
        "wall_s_all": [round(r["wall_s"], 3) for r in runs],
    }


def one_row(c: dict) -> str:
    proc = "-" if c["num_proc"] is None else str(c["num_proc"])
    if c.get("workers") and c["workers"] != c["num_proc"]:
        proc += f"({c['workers']})"  # step 2 started fewer workers: a split too small
    rate = "-" if c["docs_per_s"] is None else f"{c['docs_per_s']:.0f}"
    rate_wall = "-" if c["docs_per_s_wall"] is None else f"{c['docs_per_s_wall']:.0f}"
    mib = {
        key: "-" if c.get(key) is None else f"{c[key]:.0f}"
        for key in ("peak_rss_mb", "tree_peak_mb", "pss_peak_mb", "anon_peak_mb")
    }
    return (
        f"{c['step']:<6} {c['n_docs']:>9} {proc:>8} {c['documents']:>9} {c['step_s']:>8.2f} {c['wall_s']:>8.2f} "
        f"{rate:>10} {rate_wall:>10} {mib['anon_peak_mb']:>9} {mib['pss_peak_mb']:>9} {mib['peak_rss_mb']:>9} "
        f"{mib['tree_peak_mb']:>9}"
    )


# anon: the memory check's number; pss, rss (largest process) and tree (summed RSS) include file-backed pages
HEADER = (
    f"{'step':<6} {'n_docs':>9} {'num_proc':>8} {'docs':>9} {'step_s':>8} {'wall_s':>8} "
    f"{'docs/s':>10} {'docs/s_w':>10} {'anon_MiB':>9} {'pss_MiB':>9} {'rss_MiB':>9} {'tree_MiB':>9}"
)


def format_table(cases: list[dict]) -> str:
    lines = [HEADER, "-" * len(HEADER)]
    previous = None
    for c in cases:
        if previous is not None and c["step"] != previous:
            lines.append("")
        previous = c["step"]
        lines.append(one_row(c))
    return "\n".join(lines)


def check_summary(cases: list[dict]) -> list[dict]:
    """Linearity (docs/s roughly constant over sizes) and flat memory, for step 2 at each num_proc;
    step 1 is reported alongside (status `info`). Memory is the peak anonymous memory of the process
    tree (anon_peak_mb; peak_rss_mb where that was not measured); the raw RSS ratios are in the detail."""
    checks = []
    for step in ("step2", "step1"):
        procs = sorted({c["num_proc"] for c in cases if c["step"] == step}, key=lambda p: -1 if p is None else p)
        for p in procs:
            rows = sorted((c for c in cases if c["step"] == step and c["num_proc"] == p), key=lambda c: c["n_docs"])
            label = f"{step}" + ("" if p is None else f" num_proc={p}")
            if len(rows) < 2:
                checks.append(
                    {"check": f"{label}: linear cost", "value": None, "status": "n/a", "detail": "needs two sizes"}
                )
                continue
            small, large = rows[0], rows[-1]
            factor = small["docs_per_s"] / large["docs_per_s"] if small["docs_per_s"] and large["docs_per_s"] else None
            rates = ", ".join(f"{r['n_docs']}: {r['docs_per_s']:.0f}/s" for r in rows)
            fit = linear_fit([r["n_docs"] for r in rows], [r["step_s"] for r in rows])
            if fit:
                rates += f"; fit step_s = {fit[0]:.2f} s + n / {fit[1]:.0f} docs/s"
            status = (
                "info"
                if step == "step1"
                else ("n/a" if factor is None else "PASS" if factor <= LINEARITY_MAX_FACTOR else "FAIL")
            )
            checks.append(
                {
                    "check": f"{label}: linear cost (docs/s at {small['n_docs']} / at {large['n_docs']} "
                    f"<= {LINEARITY_MAX_FACTOR})",
                    "value": None if factor is None else round(factor, 3),
                    "status": status,
                    "detail": rates
                    + (
                        "; < 1 means faster at the large size (fixed costs)"
                        if factor is not None and factor < 1
                        else ""
                    ),
                }
            )
            # memory: the largest size vs the size 10x smaller if measured, else the next smaller one
            ref = next((r for r in rows if r["n_docs"] * 10 == large["n_docs"]), rows[-2])
            anon = bool(large.get("anon_peak_mb") and ref.get("anon_peak_mb"))
            key, what = ("anon_peak_mb", "anonymous memory") if anon else ("peak_rss_mb", "RSS")
            ratio = large[key] / ref[key]
            detail = f"{large[key]:.0f} vs {ref[key]:.0f} MiB " + (
                "(Pss_Anon + Pss_Shmem summed over the process tree)" if anon else "(largest process)"
            )
            raw = [
                (name, k)
                for name, k in (
                    ("largest-process RSS", "peak_rss_mb"),
                    ("tree RSS sum", "tree_peak_mb"),
                    ("tree Pss", "pss_peak_mb"),
                )
                if k != key and large.get(k) and ref.get(k)
            ]
            if raw:
                detail += "; with file-backed pages: " + ", ".join(
                    f"{name} {large[k]:.0f} vs {ref[k]:.0f} MiB ({large[k] / ref[k]:.2f}x)" for name, k in raw
                )
            status = "info" if step == "step1" else ("PASS" if ratio <= MEMORY_MAX_RATIO else "FAIL")
            checks.append(
                {
                    "check": f"{label}: peak {what} at {large['n_docs']} <= {MEMORY_MAX_RATIO} x at {ref['n_docs']}",
                    "value": round(ratio, 3),
                    "status": status,
                    "detail": detail,
                }
            )
    return checks


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """Least squares ys = fixed + xs / rate; (fixed seconds, marginal docs/s), None if not defined."""
    if len(xs) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    if slope <= 0:
        return None
    return my - slope * mx, 1.0 / slope


def parse_args(argv=None) -> argparse.Namespace:
    parser = make_parser(
        "python benchmarks/bench_data.py",
        "Throughput (documents/s) and peak memory of pipeline steps 1 and 2 on builtin corpora of several sizes, "
        "single process and with all cores.",
        "Defaults: sizes 10000 100000 1000000, num_proc 1 and all cores, 1 repeat. --quick: sizes 2000 20000, "
        "tokenizer trained on 2000 documents.",
    )
    parser.add_argument("--quick", action="store_true", help="sizes 2000 20000 (a minute or two on 2 cores)")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="builtin corpus sizes in documents (default 10000 100000 1000000)",
    )
    parser.add_argument(
        "--num-proc",
        type=int,
        nargs="+",
        default=None,
        metavar="P",
        help=f"step 2 data_params.num_proc values (default 1 {os.cpu_count()}); step 2 uses at "
        f"most one worker per 2000 documents of a split",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per (step, size, num_proc); median (default 1)")
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="PATH",
        help="a tokenizer folder for step 2 (default: train one first and report its time)",
    )
    parser.add_argument(
        "--tokenizer-docs",
        type=int,
        default=None,
        help="documents to train that tokenizer on (default 10000; --quick 2000)",
    )
    parser.add_argument("--vocab-size", type=int, default=2000, help="tokenizer vocabulary (default 2000, the demo's)")
    parser.add_argument("--workdir", default=None, help="where outputs go (default: a temp folder, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the step outputs and logs")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON (atomically)")
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = [2000, 20000] if args.quick else [10000, 100000, 1000000]
    if args.num_proc is None:
        args.num_proc = sorted({1, os.cpu_count() or 1})
    if args.tokenizer_docs is None:
        args.tokenizer_docs = 2000 if args.quick else 10000
    if min(args.sizes) < 3 or min(args.num_proc) < 1 or args.repeats < 1:
        parser.error("--sizes must be >= 3, --num-proc and --repeats >= 1")
    args.sizes = sorted(set(args.sizes))
    args.num_proc = list(dict.fromkeys(args.num_proc))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    print(
        f"data pipeline: sizes {args.sizes}, step 2 num_proc {args.num_proc}, {args.repeats} repeat(s), "
        f"{os.cpu_count()} cores"
    )
    start = time.perf_counter()
    try:
        payload = run_benchmark(
            args.sizes,
            args.num_proc,
            args.repeats,
            args.tokenizer,
            args.tokenizer_docs,
            args.vocab_size,
            args.workdir,
            args.keep,
        )
    except ChildFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return finish(payload, format_table(payload["cases"]), "step 2 is checked; step 1 shown as info", start, args.json)


if __name__ == "__main__":
    sys.exit(main())
