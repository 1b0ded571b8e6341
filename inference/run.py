"""The run step 4 evaluates: its model and tokenizer, checked against the step 2 output it was trained on."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch

from config_utils import PipelineError
from config_utils.contracts import MODEL_DIR, check_run_data, checkpoint_folder, read_step2_output, step3_command
from config_utils.io import read_manifest
from config_utils.topic_map import coarse_topics, read_topic_map
from train.checkpoints import complete_checkpoints, step_of
from train.final_model import find_run, load_model
from train.precision import bf16_is_fast


def training_token_ids(train_dir: Path) -> np.ndarray:
    """The token ids that occur in the training split (its unmasked text), sorted."""
    train = datasets.load_from_disk(str(train_dir)).with_format("numpy", columns=["unmasked_ids", "attention_mask"])
    seen = set()
    for batch in train.iter(batch_size=4096):
        seen.update(np.unique(batch["unmasked_ids"][batch["attention_mask"].astype(bool)]).tolist())
    return np.array(sorted(seen), dtype=np.int64)


def run_summary(run: Run, metric_rows: list[dict]) -> dict:
    """The facts at the top of report.md."""
    model_config = run.model.config
    return {
        "run": run.name,
        "model folder": str(run.model_dir),
        "model": f"{model_config.n_encoder_blocks} blocks, MoE in blocks {model_config.moe_layer_indices}, "
        f"{model_config.n_experts} experts, top-{model_config.top_k_experts}, "
        f"embedding {model_config.embedding_dim}, seq_len {model_config.seq_len}",
        "evaluated": ", ".join(f"{row['group']} ({row['documents']} documents)" for row in metric_rows),
        **({"topics": coarse_summary(run.topic_families)} if run.topic_families else {}),
    }


def coarse_summary(families: dict) -> str:
    names = sorted(set(families.values()))
    return f"{len(families)} topics analysed as {len(names)} families ({', '.join(names)}; --topic-map)"


def with_coarse_topics(group_datasets: dict, map_file: Path) -> tuple[dict, dict]:
    """Each group's `topic` column replaced by the topic's family (in memory: step 2's files stay as they are)."""
    topic_map = read_topic_map(map_file)
    topics = {topic for dataset in group_datasets.values() for topic in dataset.unique("topic")}
    families = coarse_topics(topics, topic_map, f"--topic-map {map_file}")
    mapped = {}
    for name, dataset in group_datasets.items():
        coarse = [families[topic] for topic in dataset["topic"]]
        mapped[name] = dataset.remove_columns("topic").add_column("topic", coarse)
    return mapped, families


@dataclass
class Run:
    """A trained run and the step 2 data it was trained on."""

    configs: dict
    run_dir: Path
    model: torch.nn.Module
    tokenizer: object
    step2_manifest: dict
    step2_hash: str
    manifest: dict  # the run's manifest (its Aim run, its steps)
    checkpoint_step: int | None = None  # evaluated: the run's checkpoint at this step, not its final model
    coarse: bool = False  # step 4 --topic-map: topics analysed as their families
    topic_families: dict | None = None  # ... each topic's family, once the groups are read

    @property
    def name(self) -> str:
        """The results folder's name: the run's tag, with @step-N for one of its checkpoints and @families for its
        coarse topics (never the folder of the run's own results)."""
        step = "" if self.checkpoint_step is None else f"@step-{self.checkpoint_step}"
        return f"{self.run_dir.name}{step}{'@families' if self.coarse else ''}"

    @property
    def model_dir(self) -> Path:
        if self.checkpoint_step is None:
            return self.run_dir / MODEL_DIR
        return checkpoint_folder(self.run_dir, self.checkpoint_step)

    @property
    def masked_dir(self) -> Path:
        return Path(self.configs["dataset"].data_params.masked_dir)

    def groups(self) -> dict[str, Path]:
        """The test split, then each evaluation topic in the config's order (for the tables and figures)."""
        groups = {"test": self.masked_dir / "test"}
        for topic in self.configs["dataset"].data_params.eval_topics:
            groups[topic] = self.masked_dir / self.step2_manifest["topics"][topic]
        return groups

    def layer_names(self) -> list[str]:
        """The MoE layers; none for the dense baseline (one expert per layer: no choice to analyse)."""
        if self.model.config.is_dense_baseline:
            print(
                f"note: {self.run_dir.name} is the dense baseline (n_experts: 1): no routing to analyse; writing "
                f"its metrics only",
                file=sys.stderr,
            )
            return []
        return [f"block {index}" for index in self.model.config.moe_layer_indices]


def load_run(args: argparse.Namespace, configs: dict) -> Run:
    """The run's model and tokenizer, checked against the step 2 output it was trained on."""
    run_dir = find_run(configs["train"].save_path, args.run, step3_command(args))
    run_manifest, _ = read_manifest(run_dir, step3_command(args, run_dir.name) + " --overwrite")
    step = getattr(args, "checkpoint", None)
    model, tokenizer = load_model(checkpoint_of(run_dir, step) if step is not None else run_dir / MODEL_DIR)
    # the run's own model settings decide what data it can read, whatever model config is passed now
    run_model_config = {**configs["model"], "seq_len": model.config.seq_len, "vocab_size": model.config.vocab_size}
    step2_manifest, step2_hash = read_step2_output(configs["dataset"], run_model_config, args)
    check_run_data(run_manifest, run_dir, step2_hash, args)
    coarse = getattr(args, "topic_map", None) is not None
    return Run(configs, run_dir, model, tokenizer, step2_manifest, step2_hash, run_manifest, step, coarse)


def checkpoint_of(run_dir: Path, step: int) -> Path:
    """The run's checkpoint at `step`, or one line naming the steps it has."""
    folder, kept = checkpoint_folder(run_dir, step), complete_checkpoints(run_dir)
    if folder not in kept:
        listed = ", ".join(str(step_of(path)) for path in kept) or "none (train.keep_checkpoints, train.save_steps)"
        raise PipelineError(
            f"--checkpoint {step}: run {run_dir.name} has no checkpoint at that step; it kept: {listed}"
        )
    return folder


def resolve_precision(option: str, device, width: int) -> bool:
    """--precision as a flag: True = bfloat16 autocast (auto: train/precision.py's rule for the device and width)."""
    return bf16_is_fast(device, width) if option == "auto" else option == "bf16"
