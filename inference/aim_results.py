"""Step 4's headline numbers and figures in the run's own Aim run, beside its training curves: Aim's run table can
then sort and compare runs by what their routers learned, not only by their loss.

Same naming as training (train/tracking.py): a metric measured on data keeps its name and says which data in its
context, {"subset": group}; per MoE layer a context "layer". Tracked at the run's last training step:
  subset=<group>:          mlm_loss, accuracy, perplexity (step 4's metrics.csv)
  subset=test + layer:     topic_nmi, topic_index, token_class_index (routing_stats.json; the index only where the
                           references gave one), ablation_max_delta (the largest test-loss rise of one disabled expert)
  figures, context figure: every figures/*.png as an aim.Image
Aim is an extra here: the files are step 4's result, so an Aim repository that cannot be opened gives a note, not
a refusal.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from config_utils import first_line
from process_exp_results.report.sentences import worst_expert


def headline_metrics(metric_rows: Sequence[Mapping], stats: Mapping | None, ablation: Mapping | None) -> list:
    """(name, value, context) for every number step 4 puts in the Aim run (the finite ones)."""
    tracked = []
    for row in metric_rows:
        for name in ("mlm_loss", "accuracy", "perplexity"):
            tracked.append((name, row[name], {"subset": row["group"]}))
    for layer in (stats or {}).get("layers", []):
        context = {"subset": "test", "layer": layer["layer"]}
        tracked.append(("topic_nmi", layer["nmi"], context))
        for factor in ("topic", "token_class"):
            reference = (layer.get("references") or {}).get(factor) or {}
            tracked.append((f"{factor}_index", reference.get("index"), context))
    for layer in (stats or {}).get("layers", []):
        worst = worst_expert((ablation or {}).get(layer["layer"]))
        if worst is not None:
            tracked.append(("ablation_max_delta", worst[1]["delta"], {"subset": "test", "layer": layer["layer"]}))
    return [(name, float(value), context) for name, value, context in tracked if _finite(value)]


def _finite(value) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def record_in_aim(
    run_manifest: Mapping,
    aim_repo: str,
    metric_rows: Sequence[Mapping],
    stats: Mapping | None,
    ablation: Mapping | None,
    figures: Sequence[Path],
    step: int | None = None,
) -> str:
    """Track step 4's numbers and figures into the run's Aim run; returns the line to print (what was recorded, or
    why nothing was). step: the training step they belong to (default: the run's last; a checkpoint's own)."""
    run_hash = run_manifest.get("aim_run_hash")
    if not run_hash:
        return "aim: the run has no Aim run (it was trained without tracking): nothing recorded there"
    repository = Path(aim_repo) / ".aim"
    if not repository.is_dir():
        return f"aim: {repository} is gone: step 4's results were not recorded in the run's Aim run"
    step = int(run_manifest.get("total_steps") or 0) if step is None else step
    metrics = headline_metrics(metric_rows, stats, ablation)
    try:
        from aim import Image, Run  # loads Aim's storage only when there is a run to write to

        run = Run(run_hash=run_hash, repo=str(aim_repo), system_tracking_interval=None, capture_terminal_logs=False)
        try:
            for name, value, context in metrics:
                run.track(value, name=name, step=step, context=context)
            for path in figures:
                run.track(
                    Image(str(path), caption=path.stem), name="step4_figures", step=step, context={"figure": path.stem}
                )
        finally:
            run.close()
    except Exception as error:  # a locked or damaged repository: the files are complete, Aim is an extra
        return (
            f"aim: step 4's results were not recorded in Aim run {run_hash} ({type(error).__name__}: "
            f"{first_line(error, 120)}); its files are complete"
        )
    return f"aim: recorded {len(metrics)} numbers and {len(figures)} figures in Aim run {run_hash} at step {step}"
