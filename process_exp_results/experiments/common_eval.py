"""One evaluation set for models trained with different sequence lengths and mask rates.

Each model's own test loss is measured on its own masks (a model trained at mask 0.30 is scored on 30% masked
text), so those losses do not compare. The common set is one step-2 test split (the same documents, cut to one
length, masked once at one rate with one seed); every model is scored on exactly those tensors. A model is
refused when its vocabulary is not the set's (the same ids would mean other words).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from config_utils import PipelineError, write_json_atomic

FILE = "common_eval.json"


def document_texts(processed_dir: Path, splits: tuple[str, ...] = ("train", "valid")) -> set[str]:
    """The texts a step-1 output put into the given splits (what a model trained on it has seen). Texts, not
    doc_ids: step 1 numbers the documents it keeps, so two splits of one corpus give one id to different texts."""
    import pandas as pd

    return {text for split in splits for text in pd.read_parquet(Path(processed_dir) / f"{split}.parquet")["text"]}


class CommonSet:
    """A step-2 test split, less the documents whose text is in exclude_texts (the same rows for every model).
    processed_dir: the step-1 output that test split was made from (it maps the split's doc_ids to texts)."""

    def __init__(self, masked_dir: Path, processed_dir: Path, exclude_texts: set[str] = frozenset()):
        import datasets  # here, not at the top: study.py checks its arguments without loading torch and datasets
        import pandas as pd

        self.masked_dir = Path(masked_dir)
        manifest = json.loads((self.masked_dir / "manifest.json").read_text(encoding="utf-8"))
        test = datasets.load_from_disk(str(self.masked_dir / "test"))
        processed = pd.read_parquet(Path(processed_dir) / "test.parquet")
        text_of = dict(zip(processed["doc_id"].astype(int), processed["text"]))
        keep = [index for index, doc in enumerate(test["doc_id"]) if text_of[int(doc)] not in exclude_texts]
        if not keep:
            raise PipelineError(f"{self.masked_dir}/test: every document is in some model's training data")
        self.dataset = test.select(keep)
        self.vocab_hash = manifest["tokenizer"]["vocab_hash"]
        self.description = {
            "masked_dir": str(self.masked_dir),
            "seq_len": manifest["seq_len"],
            "mask_prob": manifest["mask_prob"],
            "seed": manifest["seed"],
            "vocab_hash": self.vocab_hash,
            "documents": len(keep),
            "excluded_documents": len(test) - len(keep),
        }

    def evaluate(self, run_dir: Path, batch_size: int = 64) -> dict:
        """MLM loss and accuracy of the run's final model on the set."""
        import torch

        from config_utils.contracts import MODEL_DIR
        from data_processors.dataset import vocab_hash
        from train.evaluation import evaluate_mlm, mlm_loader
        from train.final_model import load_model

        model, tokenizer = load_model(Path(run_dir) / MODEL_DIR)
        if vocab_hash(tokenizer) != self.vocab_hash:
            raise PipelineError(
                f"{run_dir}: its tokenizer is not the common set's ({self.masked_dir}), so the same ids would "
                f"mean other words; train it with dataset.data_params.tokenizer_name={self.masked_dir / 'tokenizer'}"
            )
        if model.config.seq_len < self.description["seq_len"]:
            raise PipelineError(f"{run_dir}: seq_len {model.config.seq_len} is shorter than the common set's")
        torch.manual_seed(0)
        result = evaluate_mlm(model, mlm_loader(self.dataset, batch_size), torch.device("cpu"))
        return {
            "mlm_loss": result.mlm_loss,
            "accuracy": result.accuracy,
            "masked_tokens": result.masked_tokens,
            "majority_accuracy": result.majority_accuracy,
            "common_set": self.description,
        }


def write_common_eval(results_dir: Path, values: dict) -> None:
    write_json_atomic(Path(results_dir) / FILE, values)


def read_common_eval(results_dir: Path) -> dict | None:
    path = Path(results_dir) / FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# Student t 97.5% quantiles for 1..30 degrees of freedom (scipy is not a dependency); above 30, 1.96 errs by < 5%
T_975 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]


def t_975(dof: float) -> float:
    """The t quantile at a (possibly fractional, Welch) number of degrees of freedom, rounded down: conservative."""
    whole = max(int(dof), 1)
    return T_975[whole - 1] if whole <= len(T_975) else 1.96


def seed_summary(values: list[float]) -> dict:
    """Mean over seeds, the seed spread (sd, min, max) and a t interval for the mean (None below two seeds)."""
    array = np.array([value for value in values if value is not None and np.isfinite(value)], dtype=float)
    if array.size == 0:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None, "ci": None}
    summary = {"n": int(array.size), "mean": float(array.mean()), "min": float(array.min()), "max": float(array.max())}
    summary["sd"] = float(array.std(ddof=1)) if array.size > 1 else None
    half = t_975(array.size - 1) * summary["sd"] / np.sqrt(array.size) if array.size > 1 else None
    summary["ci"] = [summary["mean"] - half, summary["mean"] + half] if half is not None else None
    return summary


def difference_interval(a: list[float], b: list[float]) -> dict:
    """mean(a) - mean(b) over seeds with a Welch t interval (None where either side has under two seeds)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    difference = float(a.mean() - b.mean()) if a.size and b.size else None
    if a.size < 2 or b.size < 2:
        return {"difference": difference, "ci": None}
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = np.sqrt(va + vb)
    if se == 0:
        return {"difference": difference, "ci": [difference, difference]}
    dof = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    half = float(t_975(dof) * se)
    return {"difference": difference, "ci": [difference - half, difference + half]}
