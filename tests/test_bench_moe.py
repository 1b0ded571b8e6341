"""benchmarks/bench_moe.py on tiny shapes: JSON schema, skip reasons, and `ours` == the seed loop layer."""

import importlib
import json
import sys

import pytest
import torch

from config_utils import write_json_atomic

D_MODEL, D_EXPERT, TOKENS, SEQ_LEN, N_EXPERTS = 32, 64, 64, 16, 4
CASE_KEYS = {"impl", "n_experts", "top_k", "tokens", "d_model", "d_expert", "expert_type", "ms_median"}


@pytest.fixture(scope="module")
def bench():
    saved = list(sys.path)
    try:
        return importlib.import_module("benchmarks.bench_moe")  # its import points sys.path[0] at the repo
    finally:
        sys.path[:] = saved


@pytest.fixture(scope="module")
def payload(bench, tmp_path_factory):
    threads = torch.get_num_threads()
    try:
        result = bench.run_benchmark(
            [N_EXPERTS], [1, 2], TOKENS, SEQ_LEN, D_MODEL, D_EXPERT, repeats=1, warmup=1, threads=2, log=None
        )
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("bench") / "out" / "bench.json"
    write_json_atomic(path, result)
    assert [p.name for p in path.parent.iterdir()] == ["bench.json"]  # the temp file was renamed, not left behind
    return json.loads(path.read_text())


def test_json_schema(bench, payload):
    cases = payload["cases"]
    assert {(c["n_experts"], c["top_k"]) for c in cases} == {(N_EXPERTS, 1), (N_EXPERTS, 2)}
    for top_k in (1, 2):
        assert [c["impl"] for c in cases if c["top_k"] == top_k] == list(bench.IMPLS)
    for c in cases:
        assert CASE_KEYS <= set(c), c
        assert (c["tokens"], c["d_model"], c["d_expert"]) == (TOKENS, D_MODEL, D_EXPERT)
        if "skipped" in c:  # a skipped implementation says why and has no time
            assert isinstance(c["skipped"], str) and c["skipped"].strip()
            assert c["ms_median"] is None
        else:
            assert isinstance(c["ms_median"], float) and c["ms_median"] > 0, c
    # The baselines run everywhere; only hf_* may be skipped (and then with a reason, checked above).
    ran = {c["impl"] for c in cases if "skipped" not in c}
    assert {"ours", "dense", "seed_loop"} <= ran


def test_table_and_checks_come_from_the_data(bench, payload):
    table = bench.format_table(payload["cases"])
    for impl in bench.IMPLS:
        assert impl in table
    for c in payload["cases"]:
        if "skipped" in c:
            assert f"skipped: {c['skipped']}" in table
    checks = payload["checks"]
    assert len(checks) == 4 and all(c["status"] in ("PASS", "FAIL", "n/a") for c in checks)
    # E=8 is not in this run: the two floor checks have nothing to measure.
    assert [c["status"] for c in checks[:2]] == ["n/a", "n/a"]
    ms = lambda impl, k: bench._ms(payload["cases"], impl, N_EXPERTS, k)  # noqa: E731
    speedups = [ms("seed_loop", k) / ms("ours", k) for k in (1, 2)]
    assert checks[3]["value"] == pytest.approx(min(speedups), abs=1e-3)  # the worst case over k, not hard-coded


def test_batched_mm_is_skipped_over_the_memory_budget(bench):
    cases = bench.run_case(
        N_EXPERTS,
        1,
        TOKENS,
        SEQ_LEN,
        D_MODEL,
        D_EXPERT,
        impls=("dense", "hf_batched_mm"),
        repeats=1,
        warmup=0,
        mem_budget_gib=1e-6,
    )
    skipped = {c["impl"]: c.get("skipped") for c in cases}
    assert skipped["dense"] is None and "budget" in skipped["hf_batched_mm"]


def test_cli_quick_arguments(bench):
    args = bench.parse_args(["--quick"])
    assert (args.experts, args.top_k, args.repeats, args.tokens) == ([8], [1, 2], 3, 4096)
    args = bench.parse_args(
        [
            "--experts",
            "8",
            "64",
            "--top-k",
            "1",
            "2",
            "--d-model",
            "768",
            "--d-expert",
            "3072",
            "--tokens",
            "16384",
            "--dtype",
            "bfloat16",
        ]
    )
    assert (args.experts, args.d_model, args.d_expert, args.tokens, args.dtype) == (
        [8, 64],
        768,
        3072,
        16384,
        "bfloat16",
    )
    with pytest.raises(SystemExit):
        bench.parse_args(["--tokens", "100", "--seq-len", "128"])


def seed_and_ours(bench, expert_type: str, top_k: int):
    """A seed-loop layer with large random weights (so the routing is not near-uniform) and `ours` holding them."""
    from benchmarks.reference_layers import SeedLoopMoE, copy_seed_into_ours

    torch.manual_seed(0)
    layer, actual, note = bench.build_ours(D_MODEL, D_EXPERT, N_EXPERTS, top_k, expert_type)
    assert actual == expert_type and not note  # the layout is fixed: a mismatch is a bug, not a skip
    seed = SeedLoopMoE(D_MODEL, D_EXPERT, N_EXPERTS, top_k, expert_type=expert_type)
    for p in seed.parameters():
        torch.nn.init.normal_(p, std=0.2)
    copy_seed_into_ours(seed, layer)
    return seed, layer


def padded_input():
    hidden = torch.randn(TOKENS // SEQ_LEN, SEQ_LEN, D_MODEL)
    mask = torch.ones(hidden.shape[:2], dtype=torch.bool)
    mask[1, 10:] = False  # padding: routed nowhere by both
    return hidden, mask


@pytest.mark.parametrize("expert_type", ["swiglu", "mlp"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_ours_matches_the_seed_loop(bench, expert_type, top_k):
    """The fast path against the plain reference: same router and expert weights -> same output and grads."""
    seed, layer = seed_and_ours(bench, expert_type, top_k)
    hidden, mask = padded_input()
    x_ours, x_seed = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
    out_ours, _ = layer(x_ours, mask)
    out_seed = seed(x_seed, mask)
    torch.testing.assert_close(out_ours, out_seed, rtol=1e-4, atol=1e-5)
    assert out_seed.abs().max() > 1e-3  # a real comparison, not two zero tensors
    assert out_seed[1, 10:].abs().max() == 0 and out_ours[1, 10:].abs().max() == 0  # padding gets nothing

    out_ours.pow(2).mean().backward()
    out_seed.pow(2).mean().backward()
    torch.testing.assert_close(x_ours.grad, x_seed.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.router.linear.weight.grad, seed.router.weight.grad, rtol=1e-4, atol=1e-6)
    down = [e.w2 if expert_type == "swiglu" else e.fc_out for e in seed.experts]
    down_grad = torch.stack([linear.weight.grad for linear in down])  # [E, d, h]; ours stores x @ W: [E, h, d]
    torch.testing.assert_close(layer.experts.w_out.grad, down_grad.transpose(1, 2), rtol=1e-4, atol=1e-6)


def test_weight_copy_is_not_symmetric_by_accident(bench):
    """Swapping SwiGLU's gate and up halves changes the output: the copy's column order is really tested."""
    seed, layer = seed_and_ours(bench, "swiglu", 1)
    hidden, mask = padded_input()
    expected = seed(hidden, mask)
    with torch.no_grad():
        gate, up = layer.experts.w_in.chunk(2, dim=2)
        layer.experts.w_in.copy_(torch.cat([up, gate], dim=2))
    assert not torch.allclose(layer(hidden, mask)[0], expected, rtol=1e-3, atol=1e-4)


def test_reference_layers_are_shared(bench):
    """One definition of each reference: bench_moe and profile_moe use benchmarks.reference_layers'."""
    from benchmarks import reference_layers

    built = bench.build(
        "seed_loop",
        D_MODEL,
        D_EXPERT,
        N_EXPERTS,
        1,
        torch.zeros(N_EXPERTS, D_MODEL),
        torch.device("cpu"),
        torch.float32,
    )
    assert type(built.module) is reference_layers.SeedLoopMoE
    dense = bench.build(
        "dense", D_MODEL, D_EXPERT, N_EXPERTS, 1, torch.zeros(N_EXPERTS, D_MODEL), torch.device("cpu"), torch.float32
    )
    assert type(dense.module) is reference_layers.DenseFloor
    assert not hasattr(bench, "DenseFFN")  # the model's DenseFFN is not shadowed by a benchmark class
