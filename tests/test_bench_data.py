"""benchmarks/bench_data.py: the memory it measures (anonymous vs file-backed) and the checks built on it."""

import os
import sys
import textwrap

import pytest

from benchmarks import bench_data

LINUX_SMAPS = sys.platform.startswith("linux") and bench_data.smaps_rollup_kib(os.getpid()) is not None


def child(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


@pytest.mark.skipif(not LINUX_SMAPS, reason="needs /proc/PID/smaps_rollup")
def test_smaps_rollup_fields():
    fields = bench_data.smaps_rollup_kib(os.getpid())
    assert {"Rss", "Pss", "Pss_Anon", "Pss_File"} <= set(fields)
    assert 0 < fields["Pss_Anon"] <= fields["Pss"] <= fields["Rss"]
    assert bench_data.smaps_rollup_kib(2**22 + 12345) is None  # no such process


@pytest.mark.skipif(not LINUX_SMAPS, reason="needs /proc/PID/smaps_rollup")
def test_anonymous_memory_counts_allocations_not_touched_mapped_files(tmp_path):
    pytest.importorskip("psutil")
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(1 << 20) * 160)  # 160 MiB
    mapped = bench_data.run_child(
        child(f"""
        import mmap, time
        with open({str(data)!r}, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            total = sum(m[i] for i in range(0, len(m), 4096))  # touch every page
            time.sleep(0.5)
        """),
        os.environ,
        tmp_path / "mapped.log",
    )
    allocated = bench_data.run_child(
        child("""
        import time
        block = bytearray(160 << 20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        time.sleep(0.5)
        """),
        os.environ,
        tmp_path / "allocated.log",
    )
    assert mapped["rc"] == allocated["rc"] == 0
    # a touched 160 MiB memory map is resident (RSS) but file-backed: not anonymous memory
    assert mapped["peak_rss_mb"] > 150 and mapped["tree_peak_mb"] > 150 and mapped["pss_peak_mb"] > 150
    assert mapped["anon_peak_mb"] < 60
    assert allocated["anon_peak_mb"] > 150 and allocated["peak_rss_mb"] > 150


@pytest.mark.skipif(not LINUX_SMAPS, reason="needs /proc/PID/smaps_rollup")
def test_pages_shared_with_forked_workers_count_once(tmp_path):
    pytest.importorskip("psutil")
    result = bench_data.run_child(
        child("""
        import os, time
        block = bytearray(120 << 20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        pids = [os.fork() for _ in range(1)]
        if pids[0] == 0:
            time.sleep(0.6)
            os._exit(0)
        time.sleep(0.6)
        os.waitpid(pids[0], 0)
        """),
        os.environ,
        tmp_path / "fork.log",
    )
    assert result["rc"] == 0
    assert result["tree_peak_mb"] > 220  # RSS summed: the shared 120 MiB twice
    assert 110 < result["anon_peak_mb"] < 180  # proportional: once


def case(step, n_docs, num_proc, step_s, anon, rss, tree=None, pss=None):
    return {
        "step": step,
        "n_docs": n_docs,
        "num_proc": num_proc,
        "workers": num_proc,
        "documents": n_docs,
        "step_s": step_s,
        "wall_s": step_s + 1,
        "docs_per_s": n_docs / step_s,
        "docs_per_s_wall": n_docs / (step_s + 1),
        "peak_rss_mb": rss,
        "tree_peak_mb": tree or rss,
        "pss_peak_mb": pss,
        "anon_peak_mb": anon,
    }


def test_memory_check_uses_anonymous_memory_and_shows_raw_rss():
    cases = [
        case("step2", 100_000, 1, 10.0, anon=300, rss=520, pss=500),
        case("step2", 1_000_000, 1, 100.0, anon=330, rss=1400, pss=1300),
        case("step2", 100_000, 2, 6.0, anon=480, rss=520, tree=1380, pss=630),
        case("step2", 1_000_000, 2, 200.0, anon=1100, rss=1300, tree=1600, pss=1500),
    ]
    checks = {c["check"]: c for c in bench_data.check_summary(cases)}
    memory = [c for name, c in checks.items() if "memory" in name]
    assert [c["status"] for c in memory] == ["PASS", "FAIL"]
    assert memory[0]["value"] == 1.1 and "anonymous memory" in memory[0]["check"]
    assert "largest-process RSS 1400 vs 520 MiB (2.69x)" in memory[0]["detail"]
    assert memory[1]["value"] == round(1100 / 480, 3)
    linear = [c for name, c in checks.items() if "linear" in name]
    assert [c["status"] for c in linear] == ["PASS", "FAIL"]  # 10000/s vs 10000/s; 16667/s vs 5000/s
    table = bench_data.format_table(cases)
    assert "anon_MiB" in table and "1100" in table


def test_memory_check_falls_back_to_rss_without_smaps():
    cases = [
        case("step2", 100_000, 1, 10.0, anon=None, rss=500),
        case("step2", 1_000_000, 1, 100.0, anon=None, rss=900),
    ]
    (memory,) = [c for c in bench_data.check_summary(cases) if "memory" in c["check"] or "RSS" in c["check"]]
    assert "peak RSS" in memory["check"] and memory["value"] == 1.8 and memory["status"] == "PASS"
    assert "-" in bench_data.one_row(cases[0])  # anon not measured
