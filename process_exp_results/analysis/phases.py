"""Step 4's phases: a progress bar for each, and the seconds each took (written to step 4's manifest).

    phases = Phases()
    with phases("collection", total=n_batches) as bar:
        for batch in batches:
            ...
            bar.update()
    phases.seconds  # {"collection": 4.21}

A phase entered twice adds up its seconds (the references are drawn in two places, for example).
"""

from __future__ import annotations

import contextlib
import time

PHASE_ORDER = ("evaluation", "collection", "references", "statistics", "ablation", "consistency", "figures")


class Phases:
    """Named, timed sections of step 4, each with its own tqdm bar (disabled with progress=False)."""

    def __init__(self, progress: bool = True):
        self.progress = progress
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, total: int | None = None):
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"step 4: {name}", leave=False, disable=not self.progress)
        started = time.perf_counter()
        try:
            yield bar
        finally:
            bar.close()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def rounded(self) -> dict[str, float]:
        """The seconds per phase (0.01 s), in step 4's order, then any other phase."""
        names = [name for name in PHASE_ORDER if name in self.seconds]
        names += [name for name in self.seconds if name not in PHASE_ORDER]
        return {name: round(self.seconds[name], 2) for name in names}


def no_phases() -> Phases:
    """Phases that time but draw nothing: the default of the analysis functions when step 4 passes none."""
    return Phases(progress=False)
