"""Where the time of one MoE layer's forward + backward goes: torch.profiler's top operators per implementation.

Builds the implementations exactly as bench_moe.py does (same router weights, same input), warms them up,
profiles a few steps and prints each one's operators sorted by self device time (CPU time without a GPU).
  python benchmarks/profile_moe.py --device cuda --dtype bfloat16 --experts 8 --top-k 1 --impls ours hf_grouped_mm
"""

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a script: import the project, not this folder

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_moe import DTYPES, IMPLS, build, case_inputs, step_ms
from benchmarks.common import check_device


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", nargs="+", default=["ours", "hf_grouped_mm"], choices=IMPLS)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--d-expert", type=int, default=3072)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (default 3)")
    parser.add_argument("--rows", type=int, default=20, help="operators shown per implementation (default 20)")
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    router_weight, hidden, mask = case_inputs(args.experts, args.tokens, args.seq_len, args.d_model, device, dtype)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name in args.impls:
        built = build(name, args.d_model, args.d_expert, args.experts, args.top_k, router_weight, device, dtype)
        if built.skipped:
            print(f"{name}: skipped: {built.skipped}")
            continue
        times = [step_ms(built.module, hidden, mask) for _ in range(5)]
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                step_ms(built.module, hidden, mask)
        print(
            f"\n=== {name}: E={args.experts} k={args.top_k}, {args.tokens} tokens, {args.dtype}; "
            f"warm-up step times (ms): {', '.join(f'{t:.2f}' for t in times)}; {args.steps} steps profiled"
        )
        print(prof.key_averages().table(sort_by=sort_key, row_limit=args.rows, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
