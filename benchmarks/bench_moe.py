"""Benchmark one MoE feed-forward layer, forward + backward, against a dense floor and other MoE layers.

Implementations (all SwiGLU experts of the same shape, same dtype, same router weights per case):
  ours           models.MoELayer (sort-based dispatch, stacked expert weights)
  dense          one plain SwiGLU FFN with the active parameters of ONE expert on all tokens: the floor
  hf_eager       transformers' MixtralSparseMoeBlock, experts_implementation="eager"
  hf_grouped_mm  the same block, experts_implementation="grouped_mm"
  hf_batched_mm  the same block, experts_implementation="batched_mm"
  seed_loop      the earlier study's layer: a Python loop over experts with torch.where masks
The reference layers live in benchmarks/reference_layers.py (shared with profile_moe.py and the tests).

Everything runs in one process; for each case all implementations are built, warmed up, then timed in
rounds where each runs once in turn (the order rotates every round); the median of the rounds is
reported. An implementation that raises is skipped, with its reason in the table and the JSON.
Examples:
    python benchmarks/bench_moe.py --quick
    python benchmarks/bench_moe.py --json results/bench_moe_cpu.json
    python benchmarks/bench_moe.py --device cuda --dtype bfloat16 --d-model 768 --d-expert 3072 \\
        --tokens 16384 --experts 8 64 --top-k 1 2 --json results/bench_moe_gpu.json
"""

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a script: import the project, not this folder

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.common import (
    alternate,
    check_device,
    finish,
    library_meta,
    make_parser,
    one_line,
    ratio_check,
    timed_ms,
)
from benchmarks.reference_layers import INIT_STD, DenseFloor, HFMixtralMoE, SeedLoopMoE

IMPLS = ("ours", "dense", "hf_eager", "hf_grouped_mm", "hf_batched_mm", "seed_loop")
HF_IMPLS = {"hf_eager": "eager", "hf_grouped_mm": "grouped_mm", "hf_batched_mm": "batched_mm"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Targets checked by the summary (ratios of median ms).
OURS_TOP1_MAX_VS_DENSE = 1.15
OURS_TOP2_MAX_VS_DENSE = 2.2
OURS_MIN_SPEEDUP_VS_HF = 1.5
CHECK_E = 8  # the two floor checks are stated for E = 8


# --------------------------------------------------------------------------------------------------
# Building the implementations
# --------------------------------------------------------------------------------------------------


def build_ours(d_model: int, d_expert: int, n_experts: int, top_k: int, expert_type: str = "swiglu"):
    """MoELayer with the requested expert type; returns (layer, expert type its experts really have, note)."""
    from models import MoEEncoderConfig, MoELayer

    config = MoEEncoderConfig(
        vocab_size=100,
        embedding_dim=d_model,
        moe_dim=d_expert,
        n_experts=n_experts,
        top_k_experts=top_k,
        num_head=1,
        load_balance_coef=0.0,
        router_z_loss_coef=0.0,
        dropout=0.0,
        expert_type=expert_type,
    )
    layer = MoELayer(config)
    actual = layer.experts.expert_type  # read back: the table shows what ran, not what was asked
    note = "" if actual == expert_type else f"asked expert_type={expert_type!r}, the layer built {actual!r} experts"
    return layer, actual, note


@dataclass
class Built:
    name: str
    module: nn.Module | None
    expert_type: str
    skipped: str | None = None
    note: str = ""


def _module_and_router(name: str, d_model: int, d_expert: int, n_experts: int, top_k: int):
    """(module, its router's nn.Linear or None, expert type, note) of one implementation, on the CPU."""
    if name == "ours":
        module, expert_type, note = build_ours(d_model, d_expert, n_experts, top_k, "swiglu")
        return module, module.router.linear, expert_type, note
    if name == "dense":
        return DenseFloor(d_model, d_expert), None, "swiglu", ""
    if name in HF_IMPLS:
        module = HFMixtralMoE(d_model, d_expert, n_experts, top_k, HF_IMPLS[name])
        return module, module.block.gate, "swiglu", ""
    if name == "seed_loop":
        module = SeedLoopMoE(d_model, d_expert, n_experts, top_k)
        for p in module.parameters():
            nn.init.normal_(p, std=INIT_STD)
        return module, module.router, "swiglu", ""
    raise ValueError(f"unknown implementation {name!r}")


def build(
    name: str,
    d_model: int,
    d_expert: int,
    n_experts: int,
    top_k: int,
    router_weight: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
) -> Built:
    """Build one implementation on device/dtype with the shared router weights; failures become `skipped`."""
    try:
        module, router, expert_type, note = _module_and_router(name, d_model, d_expert, n_experts, top_k)
        if router is not None:  # same routing (hence same expert loads) for every MoE implementation
            with torch.no_grad():
                router.weight.copy_(router_weight)
        return Built(name, module.to(device=device, dtype=dtype).train(), expert_type, note=note)
    except Exception as error:  # noqa: BLE001 - any failure means "cannot run here"
        return Built(name, None, "swiglu", skipped=f"build failed: {one_line(error)}")


def available_bytes(device: torch.device) -> int | None:
    """Free memory now: MemAvailable on CPU (Linux), free device memory on CUDA; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def batched_mm_bytes(tokens: int, top_k: int, d_model: int, d_expert: int, dtype: torch.dtype) -> int:
    """hf_batched_mm gathers a copy of the expert weights for every (token, expert) pair: S x 3 d h values,
    kept for backward, plus their gradients of the same size in backward."""
    return 2 * tokens * top_k * 3 * d_model * d_expert * torch.finfo(dtype).bits // 8


def memory_skip_reason(
    name: str, tokens: int, top_k: int, d_model: int, d_expert: int, dtype: torch.dtype, budget_bytes: int | None
) -> str | None:
    if name != "hf_batched_mm" or budget_bytes is None:
        return None
    need = batched_mm_bytes(tokens, top_k, d_model, d_expert, dtype)
    if need <= budget_bytes:
        return None
    return (
        f"needs ~{need / 2**30:.0f} GiB (a weight copy per token-expert pair, fwd + bwd), "
        f"over the {budget_bytes / 2**30:.1f} GiB budget (--mem-budget-gib)"
    )


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def clear_grads(module: nn.Module, hidden: torch.Tensor) -> None:
    module.zero_grad(set_to_none=True)
    hidden.grad = None


def forward_backward(module: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> None:
    out = module(hidden, mask)
    if isinstance(out, tuple):  # MoELayer returns (output, stats)
        out = out[0]
    out.float().pow(2).mean().backward()


def step_ms(module: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> float:
    """One timed forward + backward (grads cleared first, outside the timing); milliseconds."""
    clear_grads(module, hidden)
    return timed_ms(lambda: forward_backward(module, hidden, mask), hidden.device)[0]


def case_inputs(
    n_experts: int, tokens: int, seq_len: int, d_model: int, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shared router weights [E, d], the input [tokens / seq_len, seq_len, d] (needs grad) and an all-real mask."""
    gen = torch.Generator().manual_seed(seed)
    router_weight = torch.randn(n_experts, d_model, generator=gen) * INIT_STD
    hidden = torch.randn(tokens // seq_len, seq_len, d_model, generator=gen).to(device=device, dtype=dtype)
    hidden.requires_grad_(True)  # a layer inside a model also back-propagates to its input
    mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=device)
    return router_weight, hidden, mask


def memory_budget(device: torch.device, mem_budget_gib: float | None) -> int | None:
    """Bytes an implementation may need; default half the memory available now (None: unknown)."""
    if mem_budget_gib is not None:
        return int(mem_budget_gib * 2**30)
    free = available_bytes(device)
    return None if free is None else free // 2


def build_and_warm(
    impls,
    n_experts: int,
    top_k: int,
    tokens: int,
    d_model: int,
    d_expert: int,
    hidden,
    mask,
    router_weight,
    warmup: int,
    dtype: torch.dtype,
    budget: int | None,
) -> list[Built]:
    """Every implementation built (or skipped with the reason) and run `warmup` times untimed."""
    built = []
    for name in impls:
        reason = memory_skip_reason(name, tokens, top_k, d_model, d_expert, dtype, budget)
        if reason:
            built.append(Built(name, None, "swiglu", skipped=reason))
            continue
        b = build(name, d_model, d_expert, n_experts, top_k, router_weight, hidden.device, dtype)
        try:
            for _ in range(warmup if not b.skipped else 0):
                step_ms(b.module, hidden, mask)
        except Exception as error:  # noqa: BLE001
            b.skipped, b.module = f"fwd+bwd failed: {one_line(error)}", None
        built.append(b)
    return built


def run_case(
    n_experts: int,
    top_k: int,
    tokens: int,
    seq_len: int,
    d_model: int,
    d_expert: int,
    impls=IMPLS,
    repeats: int = 7,
    warmup: int = 2,
    device="cpu",
    dtype=torch.float32,
    seed: int = 0,
    mem_budget_gib: float | None = None,
) -> list[dict]:
    """Time every implementation on one shape, alternating; one JSON case dict per implementation.

    mem_budget_gib: skip an implementation whose known memory need is above it (default: half the
    memory available now), instead of letting it take the machine down.
    """
    device = torch.device(device)
    if tokens % seq_len:
        raise ValueError(f"tokens ({tokens}) must be a multiple of seq_len ({seq_len})")
    router_weight, hidden, mask = case_inputs(n_experts, tokens, seq_len, d_model, device, dtype, seed)
    torch.manual_seed(seed)
    built = build_and_warm(
        impls,
        n_experts,
        top_k,
        tokens,
        d_model,
        d_expert,
        hidden,
        mask,
        router_weight,
        warmup,
        dtype,
        memory_budget(device, mem_budget_gib),
    )
    by_name = {b.name: b for b in built}

    def failed(name, error):
        by_name[name].skipped, by_name[name].module = f"fwd+bwd failed: {one_line(error)}", None

    steps = {b.name: (lambda m=b.module: forward_backward(m, hidden, mask)) for b in built if not b.skipped}
    times, _ = alternate(
        steps, repeats, device, before=lambda name: clear_grads(by_name[name].module, hidden), on_error=failed
    )
    cases = [case_record(b, times.get(b.name, []), n_experts, top_k, tokens, d_model, d_expert) for b in built]
    steps.clear()
    for b in built:  # free memory before the next case
        b.module = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return cases


def case_record(
    b: Built, times: list[float], n_experts: int, top_k: int, tokens: int, d_model: int, d_expert: int
) -> dict:
    case = {
        "impl": b.name,
        "n_experts": n_experts,
        "top_k": top_k,
        "tokens": tokens,
        "d_model": d_model,
        "d_expert": d_expert,
        "expert_type": b.expert_type,
        "ms_median": None if b.skipped or not times else statistics.median(times),
    }
    if b.skipped:
        case["skipped"] = b.skipped
    else:
        case["ms_all"] = [round(t, 4) for t in times]
    if b.note:
        case["note"] = b.note
    return case


def _ms(cases: list[dict], impl: str, n_experts: int, top_k: int) -> float | None:
    for c in cases:
        if c["impl"] == impl and c["n_experts"] == n_experts and c["top_k"] == top_k:
            return c["ms_median"]
    return None


def format_table(cases: list[dict]) -> str:
    header = f"{'E':>4} {'k':>2}  {'impl':<14} {'ms_median':>10} {'x dense':>8} {'x ours':>7}  note"
    lines = [header, "-" * len(header)]
    previous = None
    for c in cases:
        key = (c["n_experts"], c["top_k"])
        if previous is not None and key != previous:
            lines.append("")
        previous = key
        ms = c["ms_median"]
        dense, ours = _ms(cases, "dense", *key), _ms(cases, "ours", *key)
        note = f"skipped: {c['skipped']}" if "skipped" in c else c.get("note", "")
        if c["impl"] == "ours" and c["expert_type"] != "swiglu":
            note = f"expert_type={c['expert_type']} (not swiglu) " + note
        lines.append(
            f"{key[0]:>4} {key[1]:>2}  {c['impl']:<14} "
            + (f"{ms:>10.2f} " if ms is not None else f"{'-':>10} ")
            + (f"{ms / dense:>8.2f} " if ms is not None and dense else f"{'-':>8} ")
            + (f"{ms / ours:>7.2f}" if ms is not None and ours else f"{'-':>7}")
            + (f"  {note}" if note else "")
        )
    return "\n".join(lines)


def speedup_check(cases: list[dict], name: str, others, limit: float) -> dict:
    """min(other ms) / ours ms at every (E, k); the worst case must reach `limit`."""
    worst, details, missing = None, [], []
    for key in sorted({(c["n_experts"], c["top_k"]) for c in cases}):
        ours = _ms(cases, "ours", *key)
        other = [m for m in (_ms(cases, impl, *key) for impl in others) if m is not None]
        if ours is None or not other:
            missing.append(f"E={key[0]},k={key[1]}")
            continue
        speedup = min(other) / ours
        details.append(f"E={key[0]},k={key[1]}: {speedup:.2f}")
        worst = speedup if worst is None else min(worst, speedup)
    if worst is None:
        return {"check": name, "value": None, "status": "n/a", "detail": "not measured"}
    status = "PASS" if worst >= limit and not missing else ("FAIL" if worst < limit else "n/a")
    detail = "; ".join(details) + (f"; not measured: {', '.join(missing)}" if missing else "")
    return {"check": name, "value": round(worst, 3), "status": status, "detail": detail}


def check_summary(cases: list[dict]) -> list[dict]:
    """The four targets, computed from the measured medians; status PASS, FAIL or n/a."""
    checks = [
        ratio_check(
            f"ours top-{k}, E={CHECK_E} <= {limit} x dense",
            _ms(cases, "ours", CHECK_E, k),
            _ms(cases, "dense", CHECK_E, k),
            limit,
        )
        for k, limit in ((1, OURS_TOP1_MAX_VS_DENSE), (2, OURS_TOP2_MAX_VS_DENSE))
    ]
    checks.append(
        speedup_check(
            cases,
            f"ours >= {OURS_MIN_SPEEDUP_VS_HF} x faster than fastest hf_* (every E, k)",
            tuple(HF_IMPLS),
            OURS_MIN_SPEEDUP_VS_HF,
        )
    )
    checks.append(speedup_check(cases, "ours faster than seed_loop (every E, k)", ("seed_loop",), 1.0 + 1e-9))
    not_swiglu = sorted({c["expert_type"] for c in cases if c["impl"] == "ours" and c["expert_type"] != "swiglu"})
    if not_swiglu:
        for check in checks:
            check["detail"] += f" [ours ran {'/'.join(not_swiglu)} experts, not swiglu: not the target config]"
    return checks


def run_benchmark(
    experts,
    top_ks,
    tokens,
    seq_len,
    d_model,
    d_expert,
    impls=IMPLS,
    repeats=7,
    warmup=2,
    device="cpu",
    dtype="float32",
    threads=2,
    seed=0,
    mem_budget_gib=None,
    log=print,
) -> dict:
    """Every (E, k) case; returns the JSON payload {"cases": [...], "checks": [...], "meta": {...}}."""
    torch.set_num_threads(threads)
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    cases = []
    for n_experts in experts:
        for top_k in top_ks:
            if top_k > n_experts:
                continue
            start = time.perf_counter()
            cases += run_case(
                n_experts,
                top_k,
                tokens,
                seq_len,
                d_model,
                d_expert,
                impls,
                repeats,
                warmup,
                device,
                torch_dtype,
                seed,
                mem_budget_gib,
            )
            if log:
                log(f"  E={n_experts} k={top_k}: {time.perf_counter() - start:.1f} s")
    meta = {
        "device": str(device),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "threads": threads,
        "repeats": repeats,
        "warmup": warmup,
        "seq_len": seq_len,
        "loss": "output.float().pow(2).mean()",
        "timed": "forward + backward, grads cleared before",
        **library_meta(torch.device(device)),
    }
    return {"cases": cases, "checks": check_summary(cases), "meta": meta}


def parse_args(argv=None) -> argparse.Namespace:
    parser = make_parser(
        "python benchmarks/bench_moe.py",
        "Forward+backward time of one MoE layer: ours vs a dense floor, transformers' Mixtral block (eager / "
        "grouped_mm / batched_mm) and the study's loop layer. One process, implementations alternating, median "
        "of the repeats.",
        "Defaults: d_model 256, d_expert 1024, 32x128 tokens, E in {4, 8, 16}, k in {1, 2}, 2 threads, 7 repeats. "
        "--quick: E=8, k in {1, 2}, 3 repeats (< 1 min on 2 cores). GPU run: --device cuda --dtype bfloat16 "
        "--d-model 768 --d-expert 3072 --tokens 16384 --experts 8 64 --top-k 1 2",
    )
    parser.add_argument("--quick", action="store_true", help="a subset: E=8, k in {1, 2}, 3 repeats, 1 warm-up")
    parser.add_argument(
        "--experts",
        type=int,
        nargs="+",
        default=None,
        metavar="E",
        help="numbers of experts (default 4 8 16; --quick: 8)",
    )
    parser.add_argument(
        "--top-k", type=int, nargs="+", default=[1, 2], metavar="K", help="experts per token (default 1 2)"
    )
    parser.add_argument(
        "--tokens", type=int, default=32 * 128, help="tokens per step; batch = tokens / seq-len (default 4096 = 32x128)"
    )
    parser.add_argument(
        "--seq-len", type=int, default=128, help="sequence length; tokens must be a multiple (default 128)"
    )
    parser.add_argument("--d-model", type=int, default=256, help="model width (default 256)")
    parser.add_argument(
        "--d-expert", type=int, default=1024, help="hidden width of each expert and of dense (default 1024)"
    )
    parser.add_argument(
        "--impls",
        nargs="+",
        default=list(IMPLS),
        choices=IMPLS,
        metavar="IMPL",
        help=f"implementations to run (default all): {' '.join(IMPLS)}",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per case (default 7; --quick: 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per impl (default 2; --quick: 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda (cuda:N); CUDA is synchronised around timing (default cpu)"
    )
    parser.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES), help="parameter and input dtype (default float32)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for inputs, router and expert weights (default 0)")
    parser.add_argument(
        "--mem-budget-gib",
        type=float,
        default=None,
        metavar="GIB",
        help="skip an implementation whose memory need is known to exceed this "
        "(hf_batched_mm copies weights per token); default: half the free memory",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON (atomically)")
    args = parser.parse_args(argv)
    if args.experts is None:
        args.experts = [8] if args.quick else [4, 8, 16]
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.tokens % args.seq_len:
        parser.error(f"--tokens ({args.tokens}) must be a multiple of --seq-len ({args.seq_len})")
    if min(args.experts) < 1 or min(args.top_k) < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--experts, --top-k and --repeats must be >= 1, --warmup >= 0")
    check_device(parser, args.device)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    print(
        f"MoE layer fwd+bwd: tokens {args.tokens} ({args.tokens // args.seq_len}x{args.seq_len}), "
        f"d_model {args.d_model}, d_expert {args.d_expert}, {args.device} {args.dtype}, "
        f"{args.threads} threads, {args.repeats} repeats, {args.warmup} warm-up"
    )
    start = time.perf_counter()
    payload = run_benchmark(
        args.experts,
        args.top_k,
        args.tokens,
        args.seq_len,
        args.d_model,
        args.d_expert,
        args.impls,
        args.repeats,
        args.warmup,
        args.device,
        args.dtype,
        args.threads,
        args.seed,
        args.mem_budget_gib,
    )
    return finish(
        payload, format_table(payload["cases"]), "speedup = other ms / ours ms; worst case shown", start, args.json
    )


if __name__ == "__main__":
    sys.exit(main())
