"""Which precision the model computes in, and the autocast context for it: one rule for training and step 4
(here, not in models/: it is how a run is executed, not part of the exported model).

bfloat16 autocast keeps float32 weights (and optimizer state) and runs the matmuls in bfloat16. It pays where the
hardware multiplies bfloat16 natively:
  - CUDA: a GPU that supports bfloat16 (torch.cuda.is_bf16_supported()).
  - CPU: a processor with bfloat16 dot-product instructions, AVX512-BF16 or AMX-BF16 (the flags avx512_bf16 /
    amx_bf16 in /proc/cpuinfo), which oneDNN uses for bfloat16 matmuls, and a model at least CPU_BF16_MIN_WIDTH
    wide. Measured on this project's 2-core AVX512-BF16 machine (benchmarks/bench_train.py, train.py's step): at
    width 256 and 512 bf16 is 1.4-1.5x faster than float32; at width 128 it ties (0.99-1.00x) and the demo's
    training was 0.86x: the casts cost what the matmuls save. On a CPU without the instructions bfloat16 is
    emulated and slower than float32, so "auto" stays in float32 there.
The rule reads the instruction set and the model's width, not a timing at start-up: the same machine and model
always make the same choice.
"""

from __future__ import annotations

import contextlib

import torch


def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


CPU_BF16_MIN_WIDTH = 256  # embedding_dim from which bf16 training is faster than float32 on the CPU (measured)


def bf16_is_fast(device: torch.device | str, width: int) -> bool:
    """The documented rule behind mixed_precision "auto": bfloat16 where the device multiplies it natively, on the
    CPU for models at least CPU_BF16_MIN_WIDTH wide (width = embedding_dim)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_fast_bf16() and width >= CPU_BF16_MIN_WIDTH
    return False


def autocast(device: torch.device | str, bf16: bool):
    """bfloat16 autocast on `device` when bf16, else a context that changes nothing (float32)."""
    device = torch.device(device)
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
