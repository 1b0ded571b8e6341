"""With no options every step reads configs/{dataset,model,train}_params.yaml, so after the default
pipeline `python inference/inference.py` works with no options at all.

The shipped defaults stream from the hub, which tests cannot reach; here the default file names point at
a folder whose files are the demo configs made tiny, and the four steps run with no options.
"""

import csv

import yaml

import config_utils.config
from helpers import REPO, check_ok, run_step_in_process

SHRINK = {
    "dataset_params.yaml": {
        "load_params": {"builtin": {"n_docs": 600}, "train_len": 300, "valid_len": 40, "test_len": 40, "topic_len": 40},
        "data_params": {"tokenizer_vocab_size": 300},
    },
    "model_params.yaml": {"seq_len": 32, "embedding_dim": 16, "num_head": 2, "n_encoder_blocks": 1, "moe_dim": 16},
    "train_params.yaml": {"max_steps": 4, "batch_size": 8, "eval_steps": 2, "save_steps": 4, "device": "cpu"},
}


def merge(base: dict, changes: dict) -> dict:
    for key, value in changes.items():
        base[key] = merge(base[key], value) if isinstance(value, dict) else value
    return base


def test_no_options_pipeline(tmp_path, monkeypatch):
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    for name, changes in SHRINK.items():
        demo = yaml.safe_load((REPO / "configs" / "demo" / name).read_text())
        (config_dir / name).write_text(yaml.safe_dump(merge(demo, changes)))
    monkeypatch.setattr(config_utils.config, "CONFIG_DIR", config_dir)
    work = tmp_path / "work"  # relative output paths of the configs land here
    work.mkdir()
    for step in (1, 2, 3, 4):
        check_ok(run_step_in_process(step, cwd=work))
    metrics = list(csv.DictReader(open(next(work.glob("process_exp_results/results/*/metrics.csv")))))
    assert [row["group"] for row in metrics] == ["test", "programming", "gaming"]
