"""Smoke tests of benchmarks/bench_train.py on tiny shapes: JSON schema, checks, CLI, and that every
implementation actually trains (the loss falls over 20 steps on a fixed batch)."""

import json
import subprocess
import sys

import pytest
import torch

from benchmarks import bench_train
from tests.helpers import REPO

TINY = dict(vocab_size=120, embedding_dim=16, n_layers=1, num_head=2, moe_dim=24, seq_len=12, batch_size=4)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes gain nothing from threads, and on a busy machine OpenMP waits would dominate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_shapes(**extra) -> bench_train.Shapes:
    return bench_train.Shapes(**{**TINY, **extra})


def test_run_benchmark_schema_without_memory():
    payload = bench_train.run_benchmark(
        tiny_shapes(pad_frac=0.25), repeats=1, warmup=0, threads=1, memory=False, log=None
    )
    cases = payload["cases"]
    assert [(c["impl"], c["n_experts"], c["top_k"], c["mlm_head"], c["step"]) for c in cases] == [
        ("ours_dense", 1, 1, "masked", "train.py"),
        ("ours_dense", 1, 1, "masked", "bare"),
        ("ours_dense", 1, 1, "all", "bare"),
        ("hf_bert", 1, 1, "all", "bare"),
        ("ours_moe", 8, 1, "masked", "train.py"),
        ("ours_moe", 8, 1, "masked", "bare"),
        ("ours_moe", 8, 2, "masked", "train.py"),
        ("ours_moe", 8, 2, "masked", "bare"),
    ]
    for c in cases:
        assert "skipped" not in c, c
        assert set(c) >= {"impl", "n_experts", "top_k", "steps_per_s", "tokens_per_s", "peak_mem_mb"}
        assert c["steps_per_s"] > 0 and c["tokens_per_s"] > 0
        assert c["peak_mem_mb"] is None  # memory=False
        assert c["tokens_per_s"] == pytest.approx(c["steps_per_s"] * payload["meta"]["tokens_per_step"])
    assert payload["meta"]["tokens_per_step"] < TINY["batch_size"] * TINY["seq_len"]  # padding is not counted
    assert [c["status"] for c in payload["checks"]][2:] == ["info"] * 4
    assert all(c["status"] in ("PASS", "FAIL") for c in payload["checks"][:2])
    json.dumps(payload)  # serialisable
    table = bench_train.format_table(cases)
    assert "hf_bert" in table and "ours_moe" in table and "train.py" in table and "x bare" in table


def test_same_shapes_and_sdpa():
    shapes = tiny_shapes()
    ours = bench_train.build_model("ours_dense", shapes)
    bert = bench_train.build_model("hf_bert", shapes)
    assert ours.config.n_experts == 1 and ours.config.expert_type == "mlp"
    assert bert.config._attn_implementation == "sdpa" and bert.config.hidden_act == "gelu"
    assert (bert.config.hidden_size, bert.config.num_hidden_layers, bert.config.intermediate_size) == (
        ours.config.embedding_dim,
        ours.config.n_encoder_blocks,
        ours.config.moe_dim,
    )
    # parameter counts differ only by BERT's token-type embeddings (2 x d) and layout details
    n = lambda m: sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())  # noqa: E731
    assert abs(n(ours) - n(bert)) <= 4 * TINY["embedding_dim"]


@pytest.mark.parametrize(
    "impl,n_experts,top_k,head",
    [
        ("ours_dense", 1, 1, "masked"),
        ("ours_dense", 1, 1, "all"),
        ("hf_bert", 1, 1, "all"),
        ("ours_moe", 8, 1, "masked"),
    ],
)
def test_loss_falls_on_a_fixed_batch(impl, n_experts, top_k, head):
    shapes = tiny_shapes(dropout=0.0, lr=3e-3)
    torch.manual_seed(0)
    model = bench_train.build_model(impl, shapes, n_experts, top_k).train()
    optimizer = bench_train.make_optimizer(model, shapes, torch.device("cpu"))
    batch = bench_train.make_batch(shapes, seed=1)
    losses = [float(bench_train.bare_step(model, optimizer, batch, head)) for _ in range(20)]
    assert losses[-1] < 0.8 * losses[0], losses


def test_checks_from_numbers():
    def row(impl, n_experts, top_k, head, step, ms):
        return {"impl": impl, "n_experts": n_experts, "top_k": top_k, "mlm_head": head, "step": step, "ms_median": ms}

    cases = [
        row("ours_dense", 1, 1, "masked", "train.py", 11.0),
        row("ours_dense", 1, 1, "masked", "bare", 10.0),
        row("ours_dense", 1, 1, "all", "bare", 20.0),
        row("hf_bert", 1, 1, "all", "bare", 9.0),
        row("ours_moe", 8, 1, "masked", "train.py", 14.3),
        row("ours_moe", 8, 1, "masked", "bare", 12.0),
    ]
    checks = bench_train.check_summary(cases)
    assert [c["status"] for c in checks] == ["FAIL", "FAIL", "n/a", "info", "info", "info"]
    assert checks[0]["value"] == pytest.approx(10 / 9, abs=1e-3)  # bare vs bare: BERT has no train.py step
    assert checks[1]["value"] == pytest.approx(14.3 / 11, abs=1e-3)  # the MoE check reads the train.py rows
    assert checks[3]["value"] == pytest.approx(20 / 9, abs=1e-3)
    assert checks[4]["value"] == pytest.approx(11 / 10, abs=1e-3)
    assert checks[5]["value"] == pytest.approx(14.3 / 12, abs=1e-3)
    table = bench_train.format_table(
        [{**c, "steps_per_s": 1e3 / c["ms_median"], "tokens_per_s": 1.0, "peak_mem_mb": None} for c in cases]
    )
    assert "1.10" in table.splitlines()[2]  # the train.py row's "x bare": 11 / 10


def test_train_py_rows_call_train_loop_train_step(monkeypatch):
    """The "train.py" rows must time train.loop.train_step itself (with a RoutingRecorder that sees the routing),
    and only those rows: if the benchmark stops calling it, this fails."""
    import train.loop
    from train.tracking import RoutingRecorder

    real, calls = train.loop.train_step, []

    def counting(accelerator, model, optimizer, scheduler, micro_batches, recorder, *args, **kwargs):
        result = real(accelerator, model, optimizer, scheduler, micro_batches, recorder, *args, **kwargs)
        calls.append((isinstance(recorder, RoutingRecorder), int(recorder.expert_counts.sum()), kwargs["step"]))
        return result

    monkeypatch.setattr(train.loop, "train_step", counting)
    payload = bench_train.run_benchmark(
        tiny_shapes(),
        impls=("ours_dense", "ours_moe"),
        experts=(4,),
        top_ks=(1,),
        repeats=2,
        warmup=1,
        threads=1,
        memory=False,
        log=None,
    )
    assert [c["step"] for c in payload["cases"]] == ["train.py", "bare", "bare", "train.py", "bare"]
    assert all("skipped" not in c for c in payload["cases"]), payload["cases"]
    assert len(calls) == 2 * (1 + 2)  # two train.py rows, one warm-up and two timed steps each
    assert all(is_recorder for is_recorder, _, _ in calls)
    assert sorted(step for _, _, step in calls) == [1, 1, 2, 2, 3, 3]  # each row counts its own steps
    assert max(counted for _, counted, _ in calls) > 0  # the MoE's recorder counted its routed tokens


def test_train_py_step_and_bare_step_start_from_the_same_loss():
    """Same weights, same batch, no dropout: the first train.py step's loss equals the bare step's."""
    payload = bench_train.run_benchmark(
        tiny_shapes(dropout=0.0),
        impls=("ours_dense", "ours_moe"),
        experts=(4,),
        top_ks=(2,),
        repeats=1,
        warmup=1,
        threads=1,
        memory=False,
        log=None,
    )
    first = {(c["impl"], c["step"]): c["loss_first"] for c in payload["cases"] if c["mlm_head"] == "masked"}
    for impl in ("ours_dense", "ours_moe"):
        assert first[(impl, "train.py")] == pytest.approx(first[(impl, "bare")], abs=2e-4), first


def test_cli_with_memory_probe_writes_json(tmp_path):
    out = tmp_path / "r" / "train.json"
    args = [
        "--vocab-size",
        "120",
        "--d-model",
        "16",
        "--heads",
        "2",
        "--layers",
        "1",
        "--d-ffn",
        "24",
        "--seq-len",
        "12",
        "--batch-size",
        "4",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--probe-steps",
        "1",
        "--impls",
        "ours_dense",
        "--threads",
        "1",
        "--json",
        str(out),
    ]
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_train.py"), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "checks" in result.stdout
    payload = json.loads(out.read_text())
    case = payload["cases"][0]
    assert [(c["impl"], c["mlm_head"], c["step"]) for c in payload["cases"]] == [
        ("ours_dense", "masked", "train.py"),
        ("ours_dense", "masked", "bare"),
        ("ours_dense", "all", "bare"),
    ]
    assert case["impl"] == "ours_dense" and case["steps_per_s"] > 0 and case["tokens_per_s"] > 0
    assert case["peak_mem_mb"] is not None and case["peak_mem_mb"] >= 0
    assert not list(out.parent.glob(".*.tmp"))  # atomic write left nothing behind


def test_memory_probe_does_not_inherit_the_parents_peak():
    """Linux carries ru_maxrss over fork + exec: a big parent must not inflate the child's number."""
    ballast = torch.ones(300 * 2**20 // 4)  # 300 MiB resident in this (the parent) process
    result = bench_train.run_probe(
        ("ours_dense", 1, 1, "masked", "train.py", "fp32"), tiny_shapes(), "cpu", threads=1, seed=0, steps=1
    )
    assert 0 <= result["peak_mem_mb"] < 150, result
    assert result["peak_rss_mb"] < result["base_rss_mb"] + 150, result
    del ballast
