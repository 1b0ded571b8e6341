"""What the resampling (--n-perm, --n-boot) will cost, estimated before any work, and the refusal when it is too much."""

from __future__ import annotations

import argparse
import os
import sys

from config_utils import PipelineError
from config_utils.io import human_size
from inference.run import Run

# What --n-perm and --n-boot cost, measured on the 2-core CPU this was built on; only the order of magnitude matters.
# Each permutation and each bootstrap draw passes over every analysed token of every MoE layer: 50 ns a token on
# 20 Newsgroups (2,300 documents, 280,412 tokens x 2 layers: 2,800 more permutations took 80 s more, 2,800 more
# bootstrap draws 77 s), at least a fixed 83 us a permutation and 330 us a draw (a tiny corpus, 5 vs 3000 of each).
# The estimate is then right on 20 Newsgroups and up to 3x over on the demo and the tiny corpus, never under.
SECONDS_PER_TOKEN = 50e-9


SECONDS_PER_PERMUTATION, SECONDS_PER_BOOTSTRAP = 83e-6, 330e-6


LONG_ANALYSIS_SECONDS = 10 * 60


def analysed_sizes(run: Run, max_docs_per_group: int) -> tuple[int, int]:
    """About how many documents and real tokens the analysis reads: each group's first documents, at its mean
    length (from step 2's counts, so before any work)."""
    documents, tokens = 0, 0.0
    for folder in run.groups().values():
        counts = run.step2_manifest["counts"][str(folder.relative_to(run.masked_dir))]
        kept = min(counts["documents"], max_docs_per_group)
        documents += kept
        tokens += kept * counts["real_tokens"] / max(counts["documents"], 1)
    return documents, int(tokens)


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 1 else "under a second"
    return f"{seconds / 60:.0f} minutes" if seconds < 5400 else f"{seconds / 3600:.1f} hours"


def resampling_cost(n_perm: int, n_boot: int, n_layers: int, documents: int, tokens: int) -> tuple[float, int]:
    """(seconds, bytes): the time of the resampling, and the bootstrap weights it holds at once (a float64 weight
    per document and draw, in the consistency and ablation intervals)."""
    per_token = SECONDS_PER_TOKEN * tokens
    seconds = n_layers * (
        n_perm * max(SECONDS_PER_PERMUTATION, per_token) + n_boot * max(SECONDS_PER_BOOTSTRAP, per_token)
    )
    return seconds, 8 * n_boot * documents


def check_analysis_scale(run: Run, args: argparse.Namespace, n_layers: int) -> None:
    """Before any work: resampling that would take long or not fit in memory is asked about (on a terminal) or
    refused, with the estimate and what the defaults would cost, never started silently."""
    if not n_layers or args.accept_long or args.no_routing_stats and args.ablation is False:  # nothing resampled
        return
    documents, tokens = analysed_sizes(run, args.max_docs_per_group)
    seconds, weights = resampling_cost(args.n_perm, args.n_boot, n_layers, documents, tokens)
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    if seconds <= LONG_ANALYSIS_SECONDS and weights <= available / 2:
        return
    at_defaults, _ = resampling_cost(200, 200, n_layers, documents, tokens)
    estimate = (
        f"--n-perm {args.n_perm} and --n-boot {args.n_boot} on about {documents:,} documents ({tokens:,} tokens) x "
        f"{n_layers} MoE layer{'s' if n_layers > 1 else ''} would take roughly {duration(seconds)} of resampling here and hold "
        f"{human_size(weights)} of bootstrap weights ({human_size(available)} free); the defaults, 200 each: "
        f"{duration(at_defaults)}"
    )
    if sys.stdin.isatty() and sys.stderr.isatty():
        print(f"{estimate}. Run it? [y/N] ", end="", file=sys.stderr, flush=True)
        if sys.stdin.readline().strip().lower() in ("y", "yes"):
            return
    raise PipelineError(f"{estimate}: pass smaller values (1000 each resolves p down to 0.001), or add --accept-long")
