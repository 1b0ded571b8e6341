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
    payload = bench_train.run_benchmark(tiny_shapes(pad_frac=0.25), repeats=1, warmup=0, threads=1,
                                         memory=False, log=None)
    cases = payload["cases"]
    assert [(c["impl"], c["n_experts"], c["top_k"], c["mlm_head"]) for c in cases] == [
        ("ours_dense", 1, 1, "masked"), ("ours_dense", 1, 1, "all"), ("hf_bert", 1, 1, "all"),
        ("ours_moe", 8, 1, "masked"), ("ours_moe", 8, 2, "masked")]
    for c in cases:
        assert "skipped" not in c, c
        assert set(c) >= {"impl", "n_experts", "top_k", "steps_per_s", "tokens_per_s", "peak_mem_mb"}
        assert c["steps_per_s"] > 0 and c["tokens_per_s"] > 0
        assert c["peak_mem_mb"] is None  # memory=False
        assert c["tokens_per_s"] == pytest.approx(c["steps_per_s"] * payload["meta"]["tokens_per_step"])
    assert payload["meta"]["tokens_per_step"] < TINY["batch_size"] * TINY["seq_len"]  # padding is not counted
    assert [c["status"] for c in payload["checks"]][2:] == ["info", "info"]
    assert all(c["status"] in ("PASS", "FAIL") for c in payload["checks"][:2])
    json.dumps(payload)  # serialisable
    table = bench_train.format_table(cases)
    assert "hf_bert" in table and "ours_moe" in table


def test_same_shapes_and_sdpa():
    shapes = tiny_shapes()
    ours = bench_train.build_model("ours_dense", shapes)
    bert = bench_train.build_model("hf_bert", shapes)
    assert ours.config.n_experts == 1 and ours.config.expert_type == "mlp"
    assert bert.config._attn_implementation == "sdpa" and bert.config.hidden_act == "gelu"
    assert (bert.config.hidden_size, bert.config.num_hidden_layers, bert.config.intermediate_size) == (
        ours.config.embedding_dim, ours.config.n_encoder_blocks, ours.config.moe_dim)
    # parameter counts differ only by BERT's token-type embeddings (2 x d) and layout details
    n = lambda m: sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())  # noqa: E731
    assert abs(n(ours) - n(bert)) <= 4 * TINY["embedding_dim"]


@pytest.mark.parametrize("impl,n_experts,top_k,head", [("ours_dense", 1, 1, "masked"), ("ours_dense", 1, 1, "all"),
                                                       ("hf_bert", 1, 1, "all"), ("ours_moe", 8, 1, "masked")])
def test_loss_falls_on_a_fixed_batch(impl, n_experts, top_k, head):
    shapes = tiny_shapes(dropout=0.0, lr=3e-3)
    torch.manual_seed(0)
    model = bench_train.build_model(impl, shapes, n_experts, top_k).train()
    optimizer = bench_train.make_optimizer(model, shapes, torch.device("cpu"))
    batch = bench_train.make_batch(shapes, seed=1)
    losses = [float(bench_train.train_step(model, optimizer, batch, head)) for _ in range(20)]
    assert losses[-1] < 0.8 * losses[0], losses


def test_checks_from_numbers():
    cases = [{"impl": "ours_dense", "n_experts": 1, "top_k": 1, "mlm_head": "masked", "ms_median": 10.0},
             {"impl": "ours_dense", "n_experts": 1, "top_k": 1, "mlm_head": "all", "ms_median": 20.0},
             {"impl": "hf_bert", "n_experts": 1, "top_k": 1, "mlm_head": "all", "ms_median": 9.0},
             {"impl": "ours_moe", "n_experts": 8, "top_k": 1, "mlm_head": "masked", "ms_median": 12.0}]
    checks = bench_train.check_summary(cases)
    assert [c["status"] for c in checks] == ["FAIL", "PASS", "n/a", "info"]
    assert checks[3]["value"] == pytest.approx(20 / 9, abs=1e-3)
    assert checks[0]["value"] == pytest.approx(10 / 9, abs=1e-3)


def test_cli_with_memory_probe_writes_json(tmp_path):
    out = tmp_path / "r" / "train.json"
    args = ["--vocab-size", "120", "--d-model", "16", "--heads", "2", "--layers", "1", "--d-ffn", "24",
            "--seq-len", "12", "--batch-size", "4", "--repeats", "1", "--warmup", "0", "--probe-steps", "1",
            "--impls", "ours_dense", "--threads", "1", "--json", str(out)]
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_train.py"), *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "checks" in result.stdout
    payload = json.loads(out.read_text())
    case = payload["cases"][0]
    assert [(c["impl"], c["mlm_head"]) for c in payload["cases"]] == [("ours_dense", "masked"), ("ours_dense", "all")]
    assert case["impl"] == "ours_dense" and case["steps_per_s"] > 0 and case["tokens_per_s"] > 0
    assert case["peak_mem_mb"] is not None and case["peak_mem_mb"] >= 0
    assert not list(out.parent.glob(".*.tmp"))  # atomic write left nothing behind


def test_memory_probe_does_not_inherit_the_parents_peak():
    """Linux carries ru_maxrss over fork + exec: a big parent must not inflate the child's number."""
    ballast = torch.ones(300 * 2**20 // 4)  # 300 MiB resident in this (the parent) process
    result = bench_train.run_probe("ours_dense", 1, 1, "masked", tiny_shapes(), "cpu", threads=1, seed=0, steps=1)
    assert 0 <= result["peak_mem_mb"] < 150, result
    assert result["peak_rss_mb"] < result["base_rss_mb"] + 150, result
    del ballast
