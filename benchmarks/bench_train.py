"""Benchmark whole training steps of the masked-LM model: ours (dense and MoE) vs transformers' BertForMaskedLM.

Implementations (same width, depth, heads, FFN size, vocabulary, sequence length, batch, optimizer, dropout):
  ours_dense   models.MoEEncoderForMaskedLM with n_experts=1 (a plain GELU FFN per block: BERT's FFN)
  hf_bert      transformers' BertForMaskedLM, attn_implementation="sdpa", hidden_act="gelu"
  ours_moe     models.MoEEncoderForMaskedLM with E experts (default 8), top-k 1 and 2, each expert of the
               dense FFN's size (moe_dim), expert_type mlp, load_balance_coef default (0.01)

MLM head ("head" column): our models run as train/train.py runs them, with masked_logits_only=True (the
vocabulary projection only at the masked positions, which is all the loss reads); BertForMaskedLM projects
every position, as transformers does. ours_dense also runs with the head at every position ("all"), to show
how much of the difference the head makes; the checks use the "masked" rows, which are what training runs.

Two steps ("step" column), both on one fixed random batch (token ids uniform over the vocabulary, ids >= 5,
attention_mask all ones or a share of each sequence's tail padded with --pad-frac, 15% of the real positions
masked: labels = the original id there, -100 elsewhere, the input id replaced by id 4):
  train.py  what train/train.py runs: train.loop.train_step with train.loop.make_accelerator's Accelerator
            (prepared model and optimizer), a linear schedule, a train.tracking.RoutingRecorder, clipping at
            max_grad_norm 1.0 and the batch handed over on the CPU; our models only (it needs our outputs)
  bare      optimizer.zero_grad(set_to_none=True), forward with labels, loss.backward(), optimizer.step()
Both use AdamW from train.loop.optimizer_for (lr 5e-4, weight decay 0.01) and float32 (train.py's "auto"
precision would pick bf16 on CUDA; here both steps run the same precision, so "x bare" is the loop's own cost).
Everything is timed in one process, implementations alternating (the order rotates each round), median over
the rounds.

Peak memory is measured in a fresh child process per implementation (this script with --_probe), which
first runs one step of a tiny model of the same kind (so one-time lazy allocations are not counted), then
builds the model and runs --probe-steps steps: on CPU the child's peak RSS (VmHWM from /proc/self/status
at the end; not ru_maxrss, which Linux carries over from the parent across fork + exec) minus its RSS
just before the model was built (after imports and the batch), so it covers parameters,
optimizer state, activations and gradients but not the interpreter and libraries; on CUDA
torch.cuda.max_memory_allocated() in the child. tracemalloc does not see torch's allocations.
Examples:
    python benchmarks/bench_train.py --quick
    python benchmarks/bench_train.py --json results/bench_train_cpu.json
    python benchmarks/bench_train.py --device cuda --batch-size 128 --json results/bench_train_gpu.json
"""

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a script: import the project, not this folder

import argparse
import gc
import itertools
import json
import os
import resource
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from benchmarks.common import (
    alternate,
    check_device,
    finish,
    library_meta,
    make_parser,
    one_line,
    ratio_check,
    sync,
    timed_ms,
)
from config_utils.host_memory import keep_freed_memory
from train.precision import autocast

IMPLS = ("ours_dense", "hf_bert", "ours_moe")
STEPS = ("train.py", "bare")
PRECISIONS = (
    "fp32",
    "bf16",
    "fp32+compile",
    "bf16+compile",
)  # +compile: train.compile, ours_moe's train.py step  # train.loop.train_step as train/train.py calls it; the bare four-call step
SCHEDULE_STEPS = 10**6  # the linear schedule's length: the learning rate stays at its peak while timed
MASK_PROB = 0.15
MASK_ID = 4
FIRST_REAL_ID = 5  # ids 0-4 play the special tokens ([PAD] = 0)

DENSE_MAX_VS_BERT = 1.0  # ours_dense step time / hf_bert step time
MOE_TOP1_MAX_VS_DENSE = 1.25  # ours_moe (E=8, k=1) step time / ours_dense step time
CHECK_E = 8


@dataclass
class Shapes:
    vocab_size: int = 8192
    embedding_dim: int = 256
    n_layers: int = 3
    num_head: int = 8
    moe_dim: int = 512
    seq_len: int = 64
    batch_size: int = 32
    dropout: float = 0.1
    attention_dropout: float | None = None  # None = dropout (BERT's attention_probs_dropout_prob likewise)
    expert_type: str = "mlp"  # our models' FFN/experts: mlp (BERT's) or swiglu
    pad_frac: float = 0.0
    lr: float = 5e-4
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0  # train.max_grad_norm of the configs; the train.py step clips at it


# --------------------------------------------------------------------------------------------------
# Models, batch, optimizer
# --------------------------------------------------------------------------------------------------


def build_model(impl: str, shapes: Shapes, n_experts: int = 1, top_k: int = 1) -> torch.nn.Module:
    if impl in ("ours_dense", "ours_moe"):
        from models import MoEEncoderConfig, MoEEncoderForMaskedLM

        if impl == "ours_dense":
            n_experts, top_k = 1, 1
        config = MoEEncoderConfig(
            vocab_size=shapes.vocab_size,
            embedding_dim=shapes.embedding_dim,
            seq_len=shapes.seq_len,
            num_head=shapes.num_head,
            n_encoder_blocks=shapes.n_layers,
            n_experts=n_experts,
            top_k_experts=top_k,
            moe_dim=shapes.moe_dim,
            dropout=shapes.dropout,
            attention_dropout=shapes.attention_dropout,
            expert_type=shapes.expert_type,
        )
        return MoEEncoderForMaskedLM(config)
    if impl == "hf_bert":
        from transformers import BertConfig, BertForMaskedLM

        config = BertConfig(
            vocab_size=shapes.vocab_size,
            hidden_size=shapes.embedding_dim,
            num_hidden_layers=shapes.n_layers,
            num_attention_heads=shapes.num_head,
            intermediate_size=shapes.moe_dim,
            max_position_embeddings=shapes.seq_len,
            hidden_act="gelu",
            hidden_dropout_prob=shapes.dropout,
            attention_probs_dropout_prob=shapes.dropout
            if shapes.attention_dropout is None
            else shapes.attention_dropout,
            pad_token_id=0,
        )
        config._attn_implementation = "sdpa"
        model = BertForMaskedLM(config)
        if getattr(model.config, "_attn_implementation", None) != "sdpa":
            raise RuntimeError(f"BERT kept attn_implementation={model.config._attn_implementation!r}")
        return model
    raise ValueError(f"unknown implementation {impl!r}")


def make_batch(shapes: Shapes, seed: int = 0, device="cpu") -> dict:
    """Random ids, tail padding of pad_frac of each sequence, 15% of real positions masked."""
    gen = torch.Generator().manual_seed(seed)
    B, T = shapes.batch_size, shapes.seq_len
    ids = torch.randint(FIRST_REAL_ID, shapes.vocab_size, (B, T), generator=gen)
    n_pad = int(round(shapes.pad_frac * T))
    attention_mask = torch.ones(B, T, dtype=torch.long)
    if n_pad:
        lengths = T - torch.randint(0, n_pad + 1, (B,), generator=gen)  # 0..n_pad padded per sequence
        attention_mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
        attention_mask[:, 0] = 1
        ids = ids.masked_fill(attention_mask == 0, 0)
    masked = (torch.rand(B, T, generator=gen) < MASK_PROB) & attention_mask.bool()
    masked[0, 1] = True  # at least one label
    labels = torch.where(masked, ids, torch.full_like(ids, -100))
    input_ids = torch.where(masked, torch.full_like(ids, MASK_ID), ids)
    return {
        k: v.to(device) for k, v in {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}.items()
    }


def make_optimizer(model: torch.nn.Module, shapes: Shapes, device: torch.device):
    from train.loop import optimizer_for

    return optimizer_for(model, shapes.lr, shapes.weight_decay)


def bare_step(model, optimizer, batch: dict, head: str = "all", precision: str = "fp32") -> torch.Tensor:
    """head "masked": our models' masked_logits_only=True (as train/train.py); "all": logits at every position.
    precision "bf16": the forward under bfloat16 autocast (float32 weights and optimizer), as train.py runs it."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(batch["input_ids"].device, precision.startswith("bf16")):
        loss = (model(**batch, masked_logits_only=True) if head == "masked" else model(**batch)).loss
    loss.backward()
    optimizer.step()
    return loss.detach()


def make_train_accelerator(device: torch.device, precision: str = "fp32"):
    """The Accelerator train/train.py builds (train.loop.make_accelerator) for one precision (fp32, bf16, and either
    with "+compile": train.compile's inductor backend), no tracker started.

    accelerate keeps one process-wide state, read when a model is prepared: a new precision resets it, so the
    cases of one precision are built (prepared) together, before the next precision's accelerator replaces it."""
    from accelerate.state import AcceleratorState

    from train.loop import make_accelerator

    AcceleratorState._reset_state(True)
    return make_accelerator(
        {
            "mixed_precision": "bf16" if precision.startswith("bf16") else "no",
            "device": "cpu" if device.type == "cpu" else "auto",
            "aim_repo": tempfile.gettempdir(),
            "compile": precision.endswith("+compile"),
        },
        model_width=0,  # unused: the precision is named, not "auto"
    )


def train_py_step(accelerator, model, optimizer, batch: dict, shapes: Shapes) -> Callable[[], float]:
    """One train/train.py step per call: train.loop.train_step with the pieces train.py builds around it."""
    from transformers import get_linear_schedule_with_warmup

    import train.loop  # looked up at each call, so a test can count the calls
    from train.tracking import RoutingRecorder

    scheduler = get_linear_schedule_with_warmup(optimizer, 0, SCHEDULE_STEPS)
    model, optimizer = accelerator.prepare(model, optimizer)  # train.py leaves the scheduler unprepared too
    unwrapped = accelerator.unwrap_model(model)
    recorder = RoutingRecorder(unwrapped, unwrapped.config.n_experts, accelerator.device)
    micro_batches = [{key: value.cpu() for key, value in batch.items()}]  # train.py's batches arrive on the CPU
    step_numbers = itertools.count(1)

    def step() -> float:
        result = train.loop.train_step(
            accelerator,
            model,
            optimizer,
            scheduler,
            micro_batches,
            recorder,
            shapes.max_grad_norm,
            stop_requested=False,
            step=next(step_numbers),
            supervision_coef=0.0,
        )
        recorder.take_step_counts()  # train.py takes them after every step, for its training-health checks
        return result.metrics["loss"]

    return step


def make_runner(spec: tuple, shapes: Shapes, batch: dict, device: torch.device, accelerator=None):
    """(model, step) of one case; step() runs one training step and returns its loss (float or tensor)."""
    impl, n_experts, top_k, head, step_kind, precision = spec
    model = build_model(impl, shapes, n_experts, top_k).to(device).train()
    optimizer = make_optimizer(model, shapes, device)
    if step_kind == "bare":
        if precision.endswith("+compile"):
            raise ValueError("compiled rows run the train.py step (train.compile), not the bare step")
        return model, partial(bare_step, model, optimizer, batch, head, precision)
    if head != "masked" or impl == "hf_bert":
        raise ValueError("the train.py step runs our models with the masked head only")
    accelerator = accelerator or make_train_accelerator(device, precision)
    return model, train_py_step(accelerator, model, optimizer, batch, shapes)


# --------------------------------------------------------------------------------------------------
# Memory probe (child process)
# --------------------------------------------------------------------------------------------------


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """This process's RSS high-water mark: VmHWM (reset at exec). Not ru_maxrss: Linux carries that over
    from the parent across fork + exec, so a child of a big parent would report the parent's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def probe(spec: dict) -> dict:
    """In a fresh process: build one case, run a few steps, return its peak memory."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    shapes = Shapes(**spec["shapes"])
    case = tuple(spec["case"])
    batch = make_batch(shapes, spec["seed"], device)
    import transformers.models.bert.modeling_bert  # noqa: F401

    import models  # noqa: F401 - imports before the baseline, not counted
    import train.loop  # noqa: F401

    accelerator = make_train_accelerator(device, case[5]) if case[4] == "train.py" else None
    # one step of a tiny model of the same kind first: one-time lazy allocations (kernels, thread pools,
    # allocator arenas; ~20 MiB on CPU) then fall before the baseline instead of into the measurement
    tiny = Shapes(
        vocab_size=64,
        embedding_dim=2 * shapes.num_head,
        n_layers=1,
        num_head=shapes.num_head,
        moe_dim=8,
        seq_len=shapes.seq_len,
        batch_size=2,
        dropout=shapes.dropout,
    )
    tiny_model, tiny_step = make_runner(case, tiny, make_batch(tiny, spec["seed"], device), device, accelerator)
    tiny_step()
    del tiny_model, tiny_step
    if accelerator is not None:
        accelerator.free_memory()  # drops its references to the prepared tiny model and optimizer
    gc.collect()

    torch.manual_seed(spec["seed"])
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _current_rss_bytes()
    _, step = make_runner(case, shapes, batch, device, accelerator)
    for _ in range(spec["steps"]):
        step()
    sync(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mem_mb": (peak - base) / 2**20, "method": "cuda max_memory_allocated - allocated before build"}
    peak = _peak_rss_bytes()
    return {
        "peak_mem_mb": max(peak - base, 0) / 2**20,
        "peak_rss_mb": peak / 2**20,
        "base_rss_mb": base / 2**20,
        "method": "child peak RSS (VmHWM) - RSS before build",
    }


def run_probe(
    case: tuple, shapes: Shapes, device: str, threads: int, seed: int, steps: int, timeout: float = 600
) -> dict:
    """probe() of one case (impl, n_experts, top_k, head, step) in a child process."""
    spec = {
        "case": list(case),
        "shapes": shapes.__dict__,
        "device": device,
        "threads": threads,
        "seed": seed,
        "steps": steps,
    }
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--_probe", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"memory probe exited {result.returncode}: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# Roofline: the step's matmul FLOPs and the matmul peak at the model's shapes
# --------------------------------------------------------------------------------------------------


def step_matmul_flops(shapes: Shapes, batch: dict, n_experts: int, top_k: int, head: str) -> float:
    """Multiply-add FLOPs (x2) of one training step's matmuls: forward, and backward as twice the forward (the
    input and the weight gradients). Attention projections and scores, the FFN or the k chosen experts of each
    real token, the router, and the MLM head at the masked positions ("masked") or at every position ("all")."""
    d, h, seq_len = shapes.embedding_dim, shapes.moe_dim, shapes.seq_len
    real = int(batch["attention_mask"].sum())
    head_rows = int((batch["labels"] != -100).sum()) if head == "masked" else batch["input_ids"].numel()
    ffn_mats = 3 if shapes.expert_type == "swiglu" else 2
    per_token = 8 * d * d + 4 * seq_len * d + 2 * ffn_mats * top_k * d * h + (2 * d * n_experts if n_experts > 1 else 0)
    forward = shapes.n_layers * real * per_token + head_rows * (2 * d * d + 2 * d * shapes.vocab_size)
    return 3.0 * forward


def matmul_shapes(shapes: Shapes, batch: dict, n_experts: int, top_k: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of the model's main matmuls: one expert's slice, the q/k/v projection, the head on masked rows."""
    tokens = int(batch["attention_mask"].sum())
    per_expert = max(tokens * top_k // n_experts, 1)
    masked = max(int((batch["labels"] != -100).sum()), 1)
    d = shapes.embedding_dim
    return [(per_expert, d, shapes.moe_dim), (tokens, d, 3 * d), (masked, d, shapes.vocab_size)]


def matmul_peak(mnk_list, device: torch.device, precisions, repeats: int = 10) -> dict[str, dict]:
    """Per dtype, the best median GFLOP/s over the model's matmul shapes, timed alternating in this process: the
    roofline the step's FLOP rate is read against."""
    dtypes = sorted({"bf16" if p.startswith("bf16") else "fp32" for p in precisions})
    operands = {
        (dtype, mnk): (
            torch.randn(mnk[0], mnk[1], device=device, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32),
            torch.randn(mnk[1], mnk[2], device=device, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32),
        )
        for dtype in dtypes
        for mnk in mnk_list
    }
    steps = {key: partial(torch.mm, *pair) for key, pair in operands.items()}
    for step in steps.values():
        step()
    times, _ = alternate(steps, repeats, device)
    peak = {}
    for (dtype, (m, k, n)), ms in times.items():
        rate = 2 * m * k * n / statistics.median(ms) / 1e6
        if rate > peak.get(dtype, {}).get("gflop_per_s", 0.0):
            peak[dtype] = {"gflop_per_s": round(rate, 1), "shape_mkn": [m, k, n]}
    return peak


# --------------------------------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------------------------------


def case_list(impls, experts, top_ks, precisions=("fp32",)) -> list[tuple[str, int, int, str, str, str]]:
    """(impl, n_experts, top_k, head, step, precision) per case, grouped by precision: ours as train.py runs it and
    bare; ours_dense also with the head at every position; BERT bare only (train.loop.train_step needs our model's
    outputs). A "+compile" precision: the train.py step of ours_moe only (compiling takes a minute a model)."""
    cases = []
    for precision in precisions:
        steps = ("train.py",) if precision.endswith("+compile") else STEPS
        for impl in impls:
            if impl == "ours_moe":
                cases += [(impl, e, k, "masked", step) for e in experts for k in top_ks if k <= e for step in steps]
            elif precision.endswith("+compile"):
                continue
            elif impl == "ours_dense":
                cases += [(impl, 1, 1, "masked", step) for step in STEPS] + [(impl, 1, 1, "all", "bare")]
            else:
                cases.append((impl, 1, 1, "all", "bare"))
        cases = [case if len(case) == 6 else (*case, precision) for case in cases]
    return cases


def time_cases(specs, shapes: Shapes, batch: dict, device: torch.device, repeats: int, warmup: int, seed: int):
    """Build and warm up every case, then time them alternating; (times, losses, params, skipped, first-step
    seconds) per case. The first step's time is the compile time of a compiled case."""
    accelerators = []  # one per precision, each made when its cases are built (case_list groups them)
    steps, models, losses, skipped, first_step = {}, {}, {}, {}, {}
    for spec in specs:
        torch.manual_seed(seed)  # the same initial weights for a model's train.py and bare rows
        try:
            if spec[4] == "train.py" and (not accelerators or accelerators[-1][0] != spec[5]):
                accelerators.append((spec[5], make_train_accelerator(device, spec[5])))
            accelerator = accelerators[-1][1] if spec[4] == "train.py" else None
            models[spec], steps[spec] = make_runner(spec, shapes, batch, device, accelerator)
            losses[spec] = []
            for _ in range(max(warmup, 1)):
                ms, loss = timed_ms(steps[spec], device)
                losses[spec].append(float(loss))
                first_step[spec] = first_step.get(spec, ms / 1e3)
        except Exception as error:  # noqa: BLE001 - reported as skipped
            steps.pop(spec, None)
            skipped[spec] = one_line(error)

    def failed(spec, error):
        skipped[spec] = f"step failed: {one_line(error)}"

    times, outputs = alternate(steps, repeats, device, on_error=failed)
    for spec in steps:
        losses[spec] += [float(loss) for loss in outputs[spec]]
    params = {spec: sum(p.numel() for p in {id(p): p for p in models[spec].parameters()}.values()) for spec in models}
    for _, accelerator in accelerators:
        accelerator.free_memory()  # it keeps the prepared models alive otherwise
    return times, losses, params, skipped, first_step


def case_record(
    spec: tuple, times: list[float], losses: list[float], n_params: int | None, tokens: int, flops: float = 0.0
) -> dict:
    impl, n_experts, top_k, head, step, precision = spec
    case = {
        "impl": impl,
        "n_experts": n_experts,
        "top_k": top_k,
        "mlm_head": head,
        "step": step,
        "precision": precision,
        "steps_per_s": None,
        "tokens_per_s": None,
        "peak_mem_mb": None,
    }
    if not times:
        return case
    ms = statistics.median(times)
    case.update(
        steps_per_s=1e3 / ms,
        tokens_per_s=tokens * 1e3 / ms,
        ms_median=ms,
        ms_all=[round(t, 3) for t in times],
        n_params=n_params,
        loss_first=round(losses[0], 4),
        loss_last=round(losses[-1], 4),
        matmul_gflop=round(flops / 1e9, 2),
        gflop_per_s=round(flops / ms / 1e6, 1),
    )
    return case


def add_memory(
    case: dict, spec: tuple, shapes: Shapes, device: str, threads: int, seed: int, probe_steps: int, log=print
) -> None:
    try:
        result = run_probe(spec, shapes, device, threads, seed, probe_steps)
        case["peak_mem_mb"] = round(result["peak_mem_mb"], 1)
        if "peak_rss_mb" in result:
            case["peak_rss_mb"] = round(result["peak_rss_mb"], 1)
    except Exception as error:  # noqa: BLE001
        case["memory_error"] = one_line(error)
    if log:
        log(f"  memory probe {' '.join(map(str, spec))}: {case['peak_mem_mb']} MiB")


def run_benchmark(
    shapes: Shapes,
    impls=IMPLS,
    experts=(8,),
    top_ks=(1, 2),
    repeats: int = 15,
    warmup: int = 3,
    device: str = "cpu",
    threads: int = 2,
    seed: int = 0,
    memory: bool = True,
    probe_steps: int = 3,
    log=print,
    precisions=("fp32",),
) -> dict:
    """Time every case, alternating; then probe memory per case in child processes. Returns the JSON payload."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    batch = make_batch(shapes, seed, dev)
    tokens = int(batch["attention_mask"].sum())
    specs = case_list(impls, experts, top_ks, precisions)
    start = time.perf_counter()
    peak = matmul_peak(matmul_shapes(shapes, batch, max(experts), 1), dev, precisions)
    times, losses, params, skipped, first_step = time_cases(specs, shapes, batch, dev, repeats, warmup, seed)
    if log:
        log(f"  timed {repeats} rounds of {len(specs) - len(skipped)} cases in {time.perf_counter() - start:.1f} s")
    cases = []
    for spec in specs:
        impl, n_experts, top_k, head = spec[:4]
        flops = step_matmul_flops(shapes, batch, n_experts, top_k, head)
        case = case_record(
            spec, [] if spec in skipped else times[spec], losses.get(spec), params.get(spec), tokens, flops
        )
        if spec in first_step:
            case["first_step_s"] = round(first_step[spec], 2)
        dtype_peak = peak.get("bf16" if spec[5].startswith("bf16") else "fp32")
        if case.get("gflop_per_s") and dtype_peak:
            case["share_of_matmul_peak"] = round(case["gflop_per_s"] / dtype_peak["gflop_per_s"], 3)
        if spec in skipped:
            case["skipped"] = skipped[spec]
        elif memory:
            add_memory(case, spec, shapes, device, threads, seed, probe_steps, log)
        cases.append(case)
    meta = benchmark_meta(shapes, dev, threads, repeats, warmup, seed, tokens, memory, probe_steps)
    return {"cases": cases, "checks": check_summary(cases), "matmul_peak": peak, "meta": meta}


def benchmark_meta(
    shapes: Shapes,
    device: torch.device,
    threads: int,
    repeats: int,
    warmup: int,
    seed: int,
    tokens: int,
    memory: bool,
    probe_steps: int,
) -> dict:
    if not memory:
        peak_mem = "not measured (--no-memory)"
    elif device.type == "cuda":
        peak_mem = "CUDA: max_memory_allocated in a child, minus allocated before the build"
    else:
        peak_mem = f"CPU: child process peak RSS (VmHWM) minus RSS before the model was built, {probe_steps} steps"
    return {
        "device": str(device),
        "threads": threads,
        "repeats": repeats,
        "warmup": warmup,
        "seed": seed,
        "shapes": shapes.__dict__,
        "tokens_per_step": tokens,
        "timed": {
            "train.py": "train.loop.train_step (accelerator, RoutingRecorder, linear schedule, clipping "
            f"at {shapes.max_grad_norm}), as train/train.py calls it",
            "bare": "zero_grad(set_to_none) + forward with labels + loss.backward + optimizer.step",
        },
        "optimizer": f"AdamW (train.loop.optimizer_for) lr {shapes.lr}, weight decay {shapes.weight_decay}",
        "tokens_per_s": "real (non-padding) tokens per step / median step time",
        "gflop_per_s": "the step's matmul FLOPs (step_matmul_flops: forward x 3) / median step time",
        "matmul_peak": "per dtype, the best median GFLOP/s of a plain matmul at the model's shapes (matmul_shapes), "
        "timed in this run; share_of_matmul_peak = gflop_per_s / that peak",
        "precision": "bf16 = bfloat16 autocast with float32 weights and AdamW state (train.mixed_precision bf16); "
        "+compile = train.compile (accelerate's inductor backend); first_step_s = its compile time",
        "peak_mem": peak_mem,
        **library_meta(device),
    }


def _ms(cases, impl, n_experts=1, top_k=1, head=None, step="bare", precision="fp32"):
    """Median ms of a case; head defaults to how the implementation trains (ours "masked", BERT "all")."""
    head = head or ("all" if impl == "hf_bert" else "masked")
    wanted = (impl, n_experts, top_k, head, step, precision)
    for c in cases:
        if (
            c["impl"],
            c["n_experts"],
            c["top_k"],
            c["mlm_head"],
            c.get("step", "bare"),
            c.get("precision", "fp32"),
        ) == wanted:
            return c.get("ms_median")
    return None


def check_summary(cases: list[dict]) -> list[dict]:
    """BERT runs only the bare step: ours is held to it there; the MoE to the dense model in the train.py step."""
    dense, dense_train = _ms(cases, "ours_dense"), _ms(cases, "ours_dense", step="train.py")
    moe_train = {k: _ms(cases, "ours_moe", CHECK_E, k, step="train.py") for k in (1, 2)}
    return [
        ratio_check(
            f"ours_dense step time <= {DENSE_MAX_VS_BERT} x hf_bert (bare steps)",
            dense,
            _ms(cases, "hf_bert"),
            DENSE_MAX_VS_BERT,
        ),
        ratio_check(
            f"ours_moe E={CHECK_E} top-1 step time <= {MOE_TOP1_MAX_VS_DENSE} x ours_dense (train.py steps)",
            moe_train[1],
            dense_train,
            MOE_TOP1_MAX_VS_DENSE,
        ),
        ratio_check(
            f"ours_moe E={CHECK_E} top-2 / ours_dense (train.py steps, no target)", moe_train[2], dense_train, None
        ),
        ratio_check(
            "ours_dense with the head at every position / hf_bert (no target)",
            _ms(cases, "ours_dense", head="all"),
            _ms(cases, "hf_bert"),
            None,
        ),
        ratio_check("ours_dense train.py step / bare step (no target)", dense_train, dense, None),
        ratio_check(
            f"ours_moe E={CHECK_E} top-1 train.py step / bare step (no target)",
            moe_train[1],
            _ms(cases, "ours_moe", CHECK_E, 1),
            None,
        ),
        *[
            ratio_check(
                f"ours_moe E={CHECK_E} top-1 train.py step, {precision} / fp32 (no target)",
                _ms(cases, "ours_moe", CHECK_E, 1, step="train.py", precision=precision),
                moe_train[1],
                None,
            )
            for precision in ("bf16", "fp32+compile", "bf16+compile")
            if _ms(cases, "ours_moe", CHECK_E, 1, step="train.py", precision=precision)
        ],
    ]


def _ratio_cell(ms, reference, width: int) -> str:
    return f"{ms / reference:>{width}.2f} " if ms and reference else f"{'-':>{width}} "


def format_table(cases: list[dict], peak: dict | None = None) -> str:
    """One row per case; x dense against ours_dense in the same step and precision, x bare against the same case's
    bare step, x fp32 against the same case in float32 (above 1 = faster); GFLOP/s and its share of the measured
    matmul peak of the row's dtype (the roofline)."""
    bert = _ms(cases, "hf_bert")
    header = (
        f"{'impl':<11} {'E':>3} {'k':>2} {'head':>6} {'step':>8} {'precision':>12} {'ms_median':>10} {'steps/s':>8} "
        f"{'tokens/s':>9} {'GFLOP/s':>8} {'%peak':>6} {'x dense':>8} {'x bert':>7} {'x bare':>7} {'x fp32':>7} "
        f"{'peak_MiB':>9} {'params':>10}  note"
    )
    lines = [header, "-" * len(header)]
    for c in cases:
        ms, step, precision = c.get("ms_median"), c.get("step", "bare"), c.get("precision", "fp32")
        key = (c["impl"], c["n_experts"], c["top_k"], c["mlm_head"])
        dense = _ms(cases, "ours_dense", step=step, precision=precision)
        bare = _ms(cases, *key, precision=precision)
        fp32 = _ms(cases, *key, step=step)
        note = f"skipped: {c['skipped']}" if "skipped" in c else c.get("memory_error", "")
        if "first_step_s" in c and precision.endswith("+compile"):
            note = f"compile {c['first_step_s']:.0f} s; {note}".rstrip("; ")
        share = c.get("share_of_matmul_peak")
        lines.append(
            f"{c['impl']:<11} {c['n_experts']:>3} {c['top_k']:>2} {c['mlm_head']:>6} {step:>8} {precision:>12} "
            + (
                f"{ms:>10.1f} {c['steps_per_s']:>8.2f} {c['tokens_per_s']:>9.0f} {c.get('gflop_per_s') or 0:>8.0f} "
                if ms
                else f"{'-':>10} {'-':>8} {'-':>9} {'-':>8} "
            )
            + (f"{100 * share:>5.0f}% " if share else f"{'-':>6} ")
            + _ratio_cell(ms, dense, 8)
            + _ratio_cell(ms, bert, 7)
            + _ratio_cell(ms, bare, 7)
            + _ratio_cell(fp32, ms, 7)
            + (f"{c['peak_mem_mb']:>9.0f} " if c["peak_mem_mb"] is not None else f"{'-':>9} ")
            + (f"{c['n_params']:>10}" if c.get("n_params") else f"{'-':>10}")
            + (f"  {note}" if note else "")
        )
    for dtype, entry in (peak or {}).items():
        m, k, n = entry["shape_mkn"]
        lines.append(f"matmul peak {dtype}: {entry['gflop_per_s']:.0f} GFLOP/s (at {m} x {k} x {n}, this run)")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = make_parser(
        "python benchmarks/bench_train.py",
        "Training steps/s, tokens/s and peak memory of the masked-LM model: ours (n_experts=1), transformers' "
        "BertForMaskedLM at the same shapes, and our MoE (E=8, k=1 and 2); ours both in train/train.py's step "
        "(train.loop.train_step) and in a bare step. One process, cases alternating, median of the repeats; "
        "memory probed in a child per case.",
        "Defaults: the full-scale model (configs/model_params.yaml): vocab 8192, width 256, 3 blocks, 8 heads, "
        "FFN/expert 512, seq_len 64, batch 32, dropout 0.1 for both models, 2 threads, 15 repeats, 3 warm-up. "
        "--quick: 5 repeats, 1 warm-up, 2 probe steps (< 2 min on 2 cores).",
    )
    d = Shapes()
    parser.add_argument("--quick", action="store_true", help="5 repeats, 1 warm-up, 2 probe steps")
    parser.add_argument(
        "--impls",
        nargs="+",
        default=list(IMPLS),
        choices=IMPLS,
        metavar="IMPL",
        help=f"implementations (default all): {' '.join(IMPLS)}",
    )
    parser.add_argument("--experts", type=int, nargs="+", default=[8], metavar="E", help="ours_moe experts (default 8)")
    parser.add_argument(
        "--top-k", type=int, nargs="+", default=[1, 2], metavar="K", help="ours_moe top-k (default 1 2)"
    )
    parser.add_argument("--vocab-size", type=int, default=d.vocab_size)
    parser.add_argument("--d-model", type=int, default=d.embedding_dim, help="width (embedding_dim / hidden_size)")
    parser.add_argument("--layers", type=int, default=d.n_layers, help="encoder blocks")
    parser.add_argument("--heads", type=int, default=d.num_head)
    parser.add_argument("--d-ffn", type=int, default=d.moe_dim, help="FFN hidden size = each expert's (moe_dim)")
    parser.add_argument("--seq-len", type=int, default=d.seq_len)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--dropout", type=float, default=d.dropout, help="dropout of both models (default 0.1)")
    parser.add_argument(
        "--attention-dropout", type=float, default=None, help="attention-probability dropout (default: --dropout)"
    )
    parser.add_argument(
        "--expert-type", choices=("mlp", "swiglu"), default=d.expert_type, help="our FFN/experts (default mlp)"
    )
    parser.add_argument(
        "--precision",
        nargs="+",
        default=["fp32"],
        choices=PRECISIONS,
        metavar="P",
        help="precisions, timed alternating (default fp32): " + " ".join(PRECISIONS),
    )
    parser.add_argument(
        "--pad-frac",
        type=float,
        default=0.0,
        help="pad up to this share of each sequence's tail (default 0: no padding)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 15; --quick 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per impl (default 3; --quick 1)")
    parser.add_argument(
        "--probe-steps", type=int, default=None, help="steps in each memory probe (default 3; --quick 2)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON (atomically)")
    parser.add_argument("--_probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._probe:
        return args
    if args.repeats is None:
        args.repeats = 5 if args.quick else 15
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.probe_steps is None:
        args.probe_steps = 2 if args.quick else 3
    if args.repeats < 1 or args.warmup < 0 or args.probe_steps < 1:
        parser.error("--repeats and --probe-steps must be >= 1, --warmup >= 0")
    if args.d_model % args.heads:
        parser.error(f"--d-model ({args.d_model}) must be divisible by --heads ({args.heads})")
    if not 0.0 <= args.pad_frac < 1.0:
        parser.error("--pad-frac must be in [0, 1)")
    check_device(parser, args.device)
    return args


def main(argv=None) -> int:
    keep_freed_memory()  # as train/train.py does: the timed step is the step it runs
    args = parse_args(argv)
    if args._probe:
        print(json.dumps(probe(json.loads(args._probe))))
        return 0
    shapes = Shapes(
        vocab_size=args.vocab_size,
        embedding_dim=args.d_model,
        n_layers=args.layers,
        num_head=args.heads,
        moe_dim=args.d_ffn,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        dropout=args.dropout,
        attention_dropout=args.attention_dropout,
        expert_type=args.expert_type,
        pad_frac=args.pad_frac,
    )
    print(
        f"training step: batch {shapes.batch_size}x{shapes.seq_len}, vocab {shapes.vocab_size}, width "
        f"{shapes.embedding_dim}, {shapes.n_layers} blocks, {shapes.num_head} heads, FFN {shapes.moe_dim}, dropout "
        f"{shapes.dropout} (attention {shapes.attention_dropout if shapes.attention_dropout is not None else shapes.dropout}), "
        f"{shapes.expert_type}, {' '.join(args.precision)}, {args.device}, {args.threads} threads, {args.repeats} repeats, "
        f"{args.warmup} warm-up"
    )
    start = time.perf_counter()
    payload = run_benchmark(
        shapes,
        args.impls,
        args.experts,
        args.top_k,
        args.repeats,
        args.warmup,
        args.device,
        args.threads,
        args.seed,
        not args.no_memory,
        args.probe_steps,
        precisions=args.precision,
    )
    table = format_table(payload["cases"], payload["matmul_peak"])
    return finish(payload, table, "ratios of median step times", start, args.json)


if __name__ == "__main__":
    sys.exit(main())
