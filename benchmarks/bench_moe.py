"""Benchmark one MoE feed-forward layer, forward + backward, against a dense floor and other MoE layers.

Implementations (all SwiGLU experts of the same shape, same dtype, same router weights per case):
  ours           models.MoELayer (sort-based dispatch, stacked expert weights)
  dense          one plain SwiGLU FFN with the active parameters of ONE expert on all tokens: the floor
  hf_eager       transformers' MixtralSparseMoeBlock, experts_implementation="eager"
  hf_grouped_mm  the same block, experts_implementation="grouped_mm"
  hf_batched_mm  the same block, experts_implementation="batched_mm"
  seed_loop      the earlier study's layer: a Python loop over experts with torch.where masks

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
import torch.nn.functional as F
from torch import nn

from benchmarks.common import finish

IMPLS = ("ours", "dense", "hf_eager", "hf_grouped_mm", "hf_batched_mm", "seed_loop")
HF_IMPLS = {"hf_eager": "eager", "hf_grouped_mm": "grouped_mm", "hf_batched_mm": "batched_mm"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INIT_STD = 0.02

# Targets checked by the summary (ratios of median ms).
OURS_TOP1_MAX_VS_DENSE = 1.15
OURS_TOP2_MAX_VS_DENSE = 2.2
OURS_MIN_SPEEDUP_VS_HF = 1.5
CHECK_E = 8  # the two floor checks are stated for E = 8


# --------------------------------------------------------------------------------------------------
# Reference implementations
# --------------------------------------------------------------------------------------------------


class SwiGLUFFN(nn.Module):
    """silu(x W1) * (x W3) W2, no bias: one expert (and the dense floor)."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_hidden, bias=False)  # gate
        self.w3 = nn.Linear(d_model, d_hidden, bias=False)  # up
        self.w2 = nn.Linear(d_hidden, d_model, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluFFN(nn.Module):
    """gelu(x W_in + b_in) W_out + b_out: the project's "mlp" expert type (used to check `ours` in that mode)."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.fc_in = nn.Linear(d_model, d_hidden)
        self.fc_out = nn.Linear(d_hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


class DenseFFN(nn.Module):
    """The floor: one SwiGLU FFN of one expert's size on every token. Same call signature as MoELayer."""

    def __init__(self, d_model: int, d_expert: int):
        super().__init__()
        self.ffn = SwiGLUFFN(d_model, d_expert)

    def forward(self, hidden: torch.Tensor, real_token_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.ffn(hidden)


class SeedLoopMoE(nn.Module):
    """The study's layer: router -> softmax -> top-k, then for each expert a torch.where mask, gather, run, add.

    No sorting: every expert does its own boolean-mask search over all N*k assignments.
    """

    def __init__(self, d_model: int, d_expert: int, n_experts: int, top_k: int, expert_type: str = "swiglu",
                 normalize_top_k: bool = True):
        super().__init__()
        self.n_experts, self.top_k, self.normalize_top_k = n_experts, top_k, normalize_top_k
        self.router = nn.Linear(d_model, n_experts, bias=False)
        expert_cls = {"swiglu": SwiGLUFFN, "mlp": GeluFFN, "gelu": GeluFFN}[expert_type]
        self.experts = nn.ModuleList(expert_cls(d_model, d_expert) for _ in range(n_experts))

    def forward(self, hidden: torch.Tensor, real_token_mask: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        probs = torch.softmax(self.router(x).float(), dim=-1)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)  # [N, k]
        if self.top_k >= 2 and self.normalize_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        indices = torch.where(real_token_mask.reshape(-1, 1), indices, -1)  # padding goes to no expert
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where(indices == e)
            if token_idx.numel() == 0:
                continue
            y = expert(x[token_idx]) * weights[token_idx, slot].unsqueeze(-1).to(x.dtype)
            out = out.index_add(0, token_idx, y)
        return out.view(shape)


class HFMixtralMoE(nn.Module):
    """transformers' MixtralSparseMoeBlock (router inside the block) behind MoELayer's call signature."""

    def __init__(self, d_model: int, d_expert: int, n_experts: int, top_k: int, experts_implementation: str):
        super().__init__()
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        config = MixtralConfig(
            hidden_size=d_model,
            intermediate_size=d_expert,
            num_local_experts=n_experts,
            num_experts_per_tok=top_k,
            hidden_act="silu",
            router_jitter_noise=0.0,
            experts_implementation=experts_implementation,
        )
        if config._experts_implementation != experts_implementation:
            raise RuntimeError(f"config kept experts_implementation={config._experts_implementation!r}")
        self.block = MixtralSparseMoeBlock(config)
        for p in self.block.parameters():  # the block allocates with torch.empty
            nn.init.normal_(p, std=INIT_STD)

    def forward(self, hidden: torch.Tensor, real_token_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.block(hidden)
        return out[0] if isinstance(out, tuple) else out


# --------------------------------------------------------------------------------------------------
# `ours`
# --------------------------------------------------------------------------------------------------


def build_ours(d_model: int, d_expert: int, n_experts: int, top_k: int, expert_type: str = "swiglu"):
    """MoELayer with the requested expert type; returns (layer, expert type actually built, note)."""
    from models import MoEEncoderConfig, MoELayer

    kwargs = dict(vocab_size=100, embedding_dim=d_model, moe_dim=d_expert, n_experts=n_experts,
                  top_k_experts=top_k, num_head=1, load_balance_coef=0.0, router_z_loss_coef=0.0, dropout=0.0)
    note = ""
    try:
        config = MoEEncoderConfig(**kwargs, expert_type=expert_type)
    except (TypeError, ValueError) as error:
        config = MoEEncoderConfig(**kwargs)
        note = f"config rejected expert_type={expert_type!r}: {one_line(error)}"
    layer = MoELayer(config)
    actual = actual_expert_type(layer, d_model, d_expert)
    if actual != expert_type and not note:
        note = f"asked expert_type={expert_type!r}, the layer built {actual!r} experts"
    return layer, actual, note


def actual_expert_type(layer: nn.Module, d_model: int, d_expert: int) -> str:
    """What the layer's experts really are (a config may accept an unknown field and ignore it).

    An explicit `expert_type` attribute on the experts module wins; otherwise count the expert weight
    matrices: SwiGLU holds 3 d x h matrices per expert (gate, up, down), the GELU MLP 2.
    """
    experts = layer.experts
    declared = getattr(experts, "expert_type", None)
    if isinstance(declared, str):
        return declared
    matrix_elems = sum(p.numel() for p in experts.parameters() if p.dim() >= 2)
    per_expert = matrix_elems / (layer.n_experts * d_model * d_expert)
    if abs(per_expert - 3) < 0.5:
        return "swiglu"
    if abs(per_expert - 2) < 0.5:
        return "mlp"  # the project's name for the GELU MLP with biases
    return f"unknown({per_expert:.1f} d*h matrices per expert)"


class UnknownLayout(Exception):
    """`ours` stores its expert weights in a way copy_seed_into_ours does not recognise."""


def _role(name: str) -> str | None:
    n = name.lower()
    for role, keys in (("gate_up", ("gate_up", "w13", "w_in_gate_up")), ("gate", ("gate", "w1")),
                       ("up", ("up", "w3")), ("down", ("down", "w2", "w_out")), ("in", ("w_in", "fc1"))):
        if any(k in n for k in keys):
            return role
    return None


def copy_seed_into_ours(seed: SeedLoopMoE, layer: nn.Module, gate_up_order: str = "gate_first") -> None:
    """Load the seed layer's router and expert weights into `ours`, so both compute the same function.

    Expert tensors of `ours` are matched by role from their names (gate/w1, up/w3, down/w2/w_out, w_in,
    or one concatenated gate_up) and by shape ([E, d, h] is x @ W, [E, h, d] is a Linear-style weight;
    d != h is needed to tell them apart). Biases of `ours` are set from GELU seeds or zeroed for SwiGLU.
    Raises UnknownLayout when the names do not fit.
    """
    E = seed.n_experts
    d = seed.router.in_features
    with torch.no_grad():
        layer.router.linear.weight.copy_(seed.router.weight)
        first = seed.experts[0]
        if isinstance(first, SwiGLUFFN):
            mats = {"gate": torch.stack([x.w1.weight for x in seed.experts]),  # [E, h, d]
                    "up": torch.stack([x.w3.weight for x in seed.experts]),
                    "down": torch.stack([x.w2.weight for x in seed.experts])}  # [E, d, h]
            gu = (mats["gate"], mats["up"]) if gate_up_order == "gate_first" else (mats["up"], mats["gate"])
            mats["gate_up"] = torch.cat(gu, dim=1)  # [E, 2h, d]
            biases = {}
        else:
            mats = {"in": torch.stack([x.fc_in.weight for x in seed.experts]),
                    "down": torch.stack([x.fc_out.weight for x in seed.experts])}
            biases = {"in": torch.stack([x.fc_in.bias for x in seed.experts]),
                      "down": torch.stack([x.fc_out.bias for x in seed.experts])}
        h = first.w1.out_features if isinstance(first, SwiGLUFFN) else first.fc_in.out_features
        if d == h:
            raise UnknownLayout("need d_model != d_expert to tell weight orientations apart")
        params = dict(layer.experts.named_parameters())
        seen = set()
        for name, p in params.items():
            if p.dim() == 2:  # bias [E, out]
                if isinstance(first, SwiGLUFFN):
                    p.zero_()  # the SwiGLU reference has no biases
                    continue
                role = _role(name.replace("b_in", "w_in").replace("b_out", "w_out"))
                if role not in biases or biases[role].shape != p.shape:
                    raise UnknownLayout(f"bias {name!r} {tuple(p.shape)}: role {role!r} not recognised")
                p.copy_(biases[role])
                continue
            role = _role(name)
            if role == "in" and isinstance(first, SwiGLUFFN):
                role = "gate_up"  # one input projection holding gate and up
            if role not in mats or p.dim() != 3 or p.shape[0] != E:
                raise UnknownLayout(f"expert parameter {name!r} {tuple(p.shape)}: role {role!r} not recognised; "
                                    f"parameters: {[(n, tuple(q.shape)) for n, q in params.items()]}")
            src = mats[role]  # Linear-style [E, out, in]
            if p.shape == src.shape:
                p.copy_(src)
            elif p.shape == src.transpose(1, 2).shape:
                p.copy_(src.transpose(1, 2))
            else:
                raise UnknownLayout(f"{name!r} {tuple(p.shape)} fits neither {tuple(src.shape)} nor its transpose")
            seen.add("gate" if role == "gate_up" else role)
            seen.add("up" if role == "gate_up" else role)
        needed = {"gate", "up", "down"} if isinstance(first, SwiGLUFFN) else {"in", "down"}
        if not needed <= seen:
            raise UnknownLayout(f"no expert parameter for {sorted(needed - seen)}; parameters: {sorted(params)}")


# --------------------------------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------------------------------


@dataclass
class Built:
    name: str
    module: nn.Module | None
    expert_type: str
    skipped: str | None = None
    note: str = ""


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160] if text else ''}".rstrip(": ")


def build(name: str, d_model: int, d_expert: int, n_experts: int, top_k: int, router_weight: torch.Tensor,
          device: torch.device, dtype: torch.dtype) -> Built:
    """Build one implementation on device/dtype with the shared router weights; failures become `skipped`."""
    expert_type, note = "swiglu", ""
    try:
        if name == "ours":
            module, expert_type, note = build_ours(d_model, d_expert, n_experts, top_k, "swiglu")
            router = module.router.linear
        elif name == "dense":
            module, router = DenseFFN(d_model, d_expert), None
        elif name in HF_IMPLS:
            module = HFMixtralMoE(d_model, d_expert, n_experts, top_k, HF_IMPLS[name])
            router = module.block.gate
        elif name == "seed_loop":
            module = SeedLoopMoE(d_model, d_expert, n_experts, top_k)
            for p in module.parameters():
                nn.init.normal_(p, std=INIT_STD)
            router = module.router
        else:
            raise ValueError(f"unknown implementation {name!r}")
        if router is not None:  # same routing (hence same expert loads) for every MoE implementation
            with torch.no_grad():
                router.weight.copy_(router_weight)
        module = module.to(device=device, dtype=dtype).train()
        return Built(name, module, expert_type, note=note)
    except Exception as error:  # noqa: BLE001 - any failure means "cannot run here"
        return Built(name, None, expert_type, skipped=f"build failed: {one_line(error)}")


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


def memory_skip_reason(name: str, tokens: int, top_k: int, d_model: int, d_expert: int, dtype: torch.dtype,
                       budget_bytes: int | None) -> str | None:
    if name != "hf_batched_mm" or budget_bytes is None:
        return None
    need = batched_mm_bytes(tokens, top_k, d_model, d_expert, dtype)
    if need <= budget_bytes:
        return None
    return (f"needs ~{need / 2**30:.0f} GiB (a weight copy per token-expert pair, fwd + bwd), "
            f"over the {budget_bytes / 2**30:.1f} GiB budget (--mem-budget-gib)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_ms(module: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> float:
    """One timed forward + backward (grads cleared first, outside the timing); milliseconds."""
    module.zero_grad(set_to_none=True)
    hidden.grad = None
    _sync(hidden.device)
    start = time.perf_counter()
    out = module(hidden, mask)
    if isinstance(out, tuple):  # MoELayer returns (output, stats)
        out = out[0]
    out.float().pow(2).mean().backward()
    _sync(hidden.device)
    return (time.perf_counter() - start) * 1e3


def case_inputs(n_experts: int, tokens: int, seq_len: int, d_model: int, device: torch.device, dtype: torch.dtype,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shared router weights [E, d], the input [tokens / seq_len, seq_len, d] (needs grad) and an all-real mask."""
    gen = torch.Generator().manual_seed(seed)
    router_weight = torch.randn(n_experts, d_model, generator=gen) * INIT_STD
    hidden = torch.randn(tokens // seq_len, seq_len, d_model, generator=gen).to(device=device, dtype=dtype)
    hidden.requires_grad_(True)  # a layer inside a model also back-propagates to its input
    mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=device)
    return router_weight, hidden, mask


def run_case(n_experts: int, top_k: int, tokens: int, seq_len: int, d_model: int, d_expert: int,
             impls=IMPLS, repeats: int = 7, warmup: int = 2, device="cpu", dtype=torch.float32,
             seed: int = 0, mem_budget_gib: float | None = None) -> list[dict]:
    """Time every implementation on one shape; one JSON case dict per implementation.

    mem_budget_gib: skip an implementation whose known memory need is above it (default: half the
    memory available now), instead of letting it take the machine down.
    """
    device = torch.device(device)
    if mem_budget_gib is None:
        free = available_bytes(device)
        budget = None if free is None else free // 2
    else:
        budget = int(mem_budget_gib * 2**30)
    if tokens % seq_len:
        raise ValueError(f"tokens ({tokens}) must be a multiple of seq_len ({seq_len})")
    router_weight, hidden, mask = case_inputs(n_experts, tokens, seq_len, d_model, device, dtype, seed)

    torch.manual_seed(seed)
    built = []
    for name in impls:
        reason = memory_skip_reason(name, tokens, top_k, d_model, d_expert, dtype, budget)
        if reason:
            built.append(Built(name, None, "swiglu", skipped=reason))
        else:
            built.append(build(name, d_model, d_expert, n_experts, top_k, router_weight, device, dtype))
    for b in built:
        if b.skipped:
            continue
        try:
            for _ in range(warmup):
                step_ms(b.module, hidden, mask)
        except Exception as error:  # noqa: BLE001
            b.skipped, b.module = f"fwd+bwd failed: {one_line(error)}", None

    times: dict[str, list[float]] = {b.name: [] for b in built}
    running = [b for b in built if not b.skipped]
    for r in range(repeats):
        shift = r % len(running) if running else 0
        for b in running[shift:] + running[:shift]:  # rotate: each implementation takes each slot in turn
            if b.skipped:
                continue
            try:
                times[b.name].append(step_ms(b.module, hidden, mask))
            except Exception as error:  # noqa: BLE001
                b.skipped, b.module = f"fwd+bwd failed: {one_line(error)}", None

    cases = []
    for b in built:
        case = {"impl": b.name, "n_experts": n_experts, "top_k": top_k, "tokens": tokens, "d_model": d_model,
                "d_expert": d_expert, "expert_type": b.expert_type,
                "ms_median": None if b.skipped or not times[b.name] else statistics.median(times[b.name])}
        if b.skipped:
            case["skipped"] = b.skipped
        else:
            case["ms_all"] = [round(t, 4) for t in times[b.name]]
        if b.note:
            case["note"] = b.note
        cases.append(case)
    for b in built:  # free memory before the next case
        b.module = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return cases


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


def check_summary(cases: list[dict]) -> list[dict]:
    """The four targets, computed from the measured medians; status PASS, FAIL or n/a."""
    keys = sorted({(c["n_experts"], c["top_k"]) for c in cases})
    checks = []

    def floor_check(k: int, limit: float):
        name = f"ours top-{k}, E={CHECK_E} <= {limit} x dense"
        ours, dense = _ms(cases, "ours", CHECK_E, k), _ms(cases, "dense", CHECK_E, k)
        if ours is None or dense is None:
            return {"check": name, "value": None, "status": "n/a", "detail": "not measured"}
        ratio = ours / dense
        return {"check": name, "value": round(ratio, 3), "status": "PASS" if ratio <= limit else "FAIL",
                "detail": f"ours/dense = {ratio:.2f}"}

    checks.append(floor_check(1, OURS_TOP1_MAX_VS_DENSE))
    checks.append(floor_check(2, OURS_TOP2_MAX_VS_DENSE))

    def every_case_check(name: str, others, limit: float):
        worst, details, missing = None, [], []
        for key in keys:
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

    checks.append(every_case_check(f"ours >= {OURS_MIN_SPEEDUP_VS_HF} x faster than fastest hf_* (every E, k)",
                                   tuple(HF_IMPLS), OURS_MIN_SPEEDUP_VS_HF))
    checks.append(every_case_check("ours faster than seed_loop (every E, k)", ("seed_loop",), 1.0 + 1e-9))
    not_swiglu = sorted({c["expert_type"] for c in cases if c["impl"] == "ours" and c["expert_type"] != "swiglu"})
    if not_swiglu:
        for check in checks:
            check["detail"] += f" [ours ran {'/'.join(not_swiglu)} experts, not swiglu: not the target config]"
    return checks




def run_benchmark(experts, top_ks, tokens, seq_len, d_model, d_expert, impls=IMPLS, repeats=7, warmup=2,
                  device="cpu", dtype="float32", threads=2, seed=0, mem_budget_gib=None, log=print) -> dict:
    """Every (E, k) case; returns the JSON payload {"cases": [...], "checks": [...], "meta": {...}}."""
    torch.set_num_threads(threads)
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    cases = []
    for n_experts in experts:
        for top_k in top_ks:
            if top_k > n_experts:
                continue
            start = time.perf_counter()
            cases += run_case(n_experts, top_k, tokens, seq_len, d_model, d_expert, impls, repeats, warmup,
                              device, torch_dtype, seed, mem_budget_gib)
            if log:
                log(f"  E={n_experts} k={top_k}: {time.perf_counter() - start:.1f} s")
    meta = {"device": str(device), "dtype": str(torch_dtype).removeprefix("torch."), "threads": threads,
            "repeats": repeats, "warmup": warmup, "seq_len": seq_len, "torch": torch.__version__,
            "loss": "output.float().pow(2).mean()", "timed": "forward + backward, grads cleared before"}
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    if str(device).startswith("cuda"):
        meta["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return {"cases": cases, "checks": check_summary(cases), "meta": meta}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/bench_moe.py",
        description="Forward+backward time of one MoE layer: ours vs a dense floor, transformers' Mixtral "
                    "block (eager / grouped_mm / batched_mm) and the study's loop layer. One process, "
                    "implementations alternating, median of the repeats.",
        epilog="Defaults: d_model 256, d_expert 1024, 32x128 tokens, E in {4, 8, 16}, k in {1, 2}, 2 threads, "
               "7 repeats. --quick: E=8, k in {1, 2}, 3 repeats (< 1 min on 2 cores). GPU run: --device cuda "
               "--dtype bfloat16 --d-model 768 --d-expert 3072 --tokens 16384 --experts 8 64 --top-k 1 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a subset: E=8, k in {1, 2}, 3 repeats, 1 warm-up")
    parser.add_argument("--experts", type=int, nargs="+", default=None, metavar="E",
                        help="numbers of experts (default 4 8 16; --quick: 8)")
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 2], metavar="K", help="experts per token (default 1 2)")
    parser.add_argument("--tokens", type=int, default=32 * 128, help="tokens per step; batch = tokens / seq-len (default 4096 = 32x128)")
    parser.add_argument("--seq-len", type=int, default=128, help="sequence length; tokens must be a multiple (default 128)")
    parser.add_argument("--d-model", type=int, default=256, help="model width (default 256)")
    parser.add_argument("--d-expert", type=int, default=1024, help="hidden width of each expert and of dense (default 1024)")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS, metavar="IMPL",
                        help=f"implementations to run (default all): {' '.join(IMPLS)}")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per case (default 7; --quick: 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per impl (default 2; --quick: 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N); CUDA is synchronised around timing (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="parameter and input dtype (default float32)")
    parser.add_argument("--seed", type=int, default=0, help="seed for inputs, router and expert weights (default 0)")
    parser.add_argument("--mem-budget-gib", type=float, default=None, metavar="GIB",
                        help="skip an implementation whose memory need is known to exceed this "
                             "(hf_batched_mm copies weights per token); default: half the free memory")
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
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda asked, but torch.cuda.is_available() is False")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"MoE layer fwd+bwd: tokens {args.tokens} ({args.tokens // args.seq_len}x{args.seq_len}), "
          f"d_model {args.d_model}, d_expert {args.d_expert}, {args.device} {args.dtype}, "
          f"{args.threads} threads, {args.repeats} repeats, {args.warmup} warm-up")
    start = time.perf_counter()
    payload = run_benchmark(args.experts, args.top_k, args.tokens, args.seq_len, args.d_model, args.d_expert,
                            args.impls, args.repeats, args.warmup, args.device, args.dtype, args.threads, args.seed,
                            args.mem_budget_gib)
    return finish(payload, format_table(payload["cases"]), "speedup = other ms / ours ms; worst case shown", start, args.json)


if __name__ == "__main__":
    sys.exit(main())
