"""Reading one result folder: step 4's metrics.csv, routing_stats.json and ablation.json, and study.py's
common_eval.json. One reader for compare_runs.py, known_structure.py and the study's summary."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from process_exp_results.experiments.common_eval import read_common_eval


def read_metrics(folder: Path) -> dict[str, dict]:
    """metrics.csv as group -> row ({} where step 4 wrote none)."""
    path = Path(folder) / "metrics.csv"
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["group"]: row for row in csv.DictReader(handle)}


def read_json(path: Path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_result_folder(folder: Path) -> dict:
    """{"metrics", "stats", "ablation", "common"}: each {} or None where that file is absent."""
    folder = Path(folder)
    return {
        "metrics": read_metrics(folder),
        "stats": read_json(folder / "routing_stats.json"),
        "ablation": read_json(folder / "ablation.json"),
        "common": read_common_eval(folder),
    }
