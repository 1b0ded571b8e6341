"""The exported model/ folder is usable by others: it loads where this repository is not importable
(trust_remote_code), carries a model card, is readable by other users and saves no load-time options."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import DEMO_CONFIGS, REPO, check_ok, prepare_tiny_data, run_step_in_process

SENTENCES = [
    "the cat sat on the mat .",
    "a dog ran in the park .",
    "the bird sang a song in the tree .",
    "the cat and the dog played in the park .",
]
LOAD_TIME_KEYS = ("is_local", "local_files_only")  # what AutoTokenizer.from_pretrained(folder) records


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory) -> Path:
    """A tiny WordPiece tokenizer saved the way step 2 saves it (a folder AutoTokenizer loads)."""
    from data_processors.tokenizer import train_wordpiece

    tokenizer = train_wordpiece(lambda: iter([SENTENCES]), vocab_size=80, n_texts=len(SENTENCES))
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(str(folder))
    return folder


def loaded_tokenizer(folder: Path):
    """As train.py loads it: from a local folder, which records is_local/local_files_only in init_kwargs."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert all(key in tokenizer.init_kwargs for key in LOAD_TIME_KEYS)  # else the tests below prove nothing
    return tokenizer


def tiny_model(vocab_size: int, pad_token_id: int, **overrides):
    from models import MoEEncoderConfig, MoEEncoderForMaskedLM

    torch.manual_seed(0)
    params = dict(
        vocab_size=vocab_size,
        embedding_dim=16,
        seq_len=32,
        num_head=2,
        n_encoder_blocks=2,
        n_experts=4,
        top_k_experts=2,
        moe_dim=16,
        pad_token_id=pad_token_id,
    )
    return MoEEncoderForMaskedLM(MoEEncoderConfig(**{**params, **overrides})).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer_folder):
    """(model in memory, its model/ folder written by save_model)."""
    from train.final_model import save_model

    tokenizer = loaded_tokenizer(tokenizer_folder)
    model = tiny_model(len(tokenizer), tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("run") / "model"
    save_model(model, tokenizer, folder, {"step": 1, "eval_history": []}, card={"tag": "tiny"})
    return model, folder


CLEAN_SCRIPT = r"""
import importlib.util, json, os, sys
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

path, repo = sys.argv[1], sys.argv[2]
# the point of the test: nothing of the repository can be imported here
assert importlib.util.find_spec("models") is None and importlib.util.find_spec("train") is None, sys.path
assert repo not in [os.path.abspath(entry or os.getcwd()) for entry in sys.path], sys.path

model = AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True).eval()
# Plain AutoTokenizer first reads config.json through AutoConfig, which asks whether to run the folder's code
# (stdin is empty here: "no"), then falls back to a generic config: the tokenizer itself needs no custom code.
tokenizer = AutoTokenizer.from_pretrained(path)
trusted_tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)  # as the model card shows: no prompt
sentences = json.loads(sys.argv[3])
assert tokenizer(sentences)["input_ids"] == trusted_tokenizer(sentences)["input_ids"]
encoded = tokenizer(sentences, return_tensors="pt", padding=True)
with torch.no_grad():
    logits = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits
fill_mask = pipeline("fill-mask", model=path, trust_remote_code=True)
predictions = fill_mask(f"the {tokenizer.mask_token} sat on the mat .")
with open("result.json", "w") as out:  # a file, not stdout: transformers' prompt is printed there
    json.dump({"model_module": type(model).__module__, "input_ids": encoded["input_ids"].tolist(),
               "logits": logits.tolist(), "predictions": predictions}, out)
"""


def run_clean(folder: Path, cwd: Path) -> dict:
    """CLEAN_SCRIPT in a fresh `python -I` (no PYTHONPATH, no cwd or script dir on sys.path) run from cwd."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        HF_MODULES_CACHE=str(cwd / "hf_modules"),
    )  # where transformers copies the remote code; not ~/.cache
    result = subprocess.run(
        [sys.executable, "-I", "-c", CLEAN_SCRIPT, str(folder), str(REPO), json.dumps(SENTENCES)],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return json.loads((cwd / "result.json").read_text(encoding="utf-8"))


def test_export_loads_where_the_repository_is_not_importable(exported, tmp_path):
    model, folder = exported
    elsewhere = tmp_path / "someone_else" / "moe-model"  # copied away from the run folder, as when shared
    shutil.copytree(folder, elsewhere)
    clean_dir = tmp_path / "clean"
    clean_dir.mkdir()

    result = run_clean(elsewhere, clean_dir)

    assert result["model_module"].startswith("transformers_modules"), result["model_module"]  # the copied code
    with torch.no_grad():
        ids = torch.tensor(result["input_ids"])
        expected = model(input_ids=ids, attention_mask=ids != model.config.pad_token_id).logits
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, atol=1e-5, rtol=1e-5)
    predictions = result["predictions"]
    print("fill-mask from a clean directory:", [(p["token_str"], round(p["score"], 4)) for p in predictions])
    assert len(predictions) == 5
    assert all("[MASK]" not in p["sequence"] and p["token_str"] and 0 < p["score"] <= 1 for p in predictions)


def test_export_carries_every_module_the_model_needs(exported):
    _, folder = exported
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert config["auto_map"] == {
        "AutoConfig": "configuration.MoEEncoderConfig",
        "AutoModelForMaskedLM": "encoder.MoEEncoderForMaskedLM",
    }
    # every module of the package but __init__ is part of the model (config, encoder, moe, router, experts, losses)
    needed = {path.name for path in (REPO / "models").glob("*.py")} - {"__init__.py"}
    assert needed <= {path.name for path in folder.glob("*.py")}
    for name in needed:  # the same code as the repository's, byte for byte
        assert (folder / name).read_bytes() == (REPO / "models" / name).read_bytes(), name


def test_inside_the_repository_the_export_loads_with_the_repository_code(exported, monkeypatch):
    from transformers import AutoModelForMaskedLM, pipeline

    from models import MoEEncoderForMaskedLM
    from train.final_model import load_model

    model, folder = exported
    monkeypatch.setattr("builtins.input", lambda *_: pytest.fail("transformers asked whether to run the folder's code"))
    loaded, _ = load_model(folder)  # no trust_remote_code, as step 4 does
    remote_allowed = AutoModelForMaskedLM.from_pretrained(str(folder), trust_remote_code=True)
    fill_mask = pipeline("fill-mask", model=str(folder))  # as tests/test_training.py uses it: no prompt, no flag
    for candidate in (loaded, remote_allowed, fill_mask.model):  # the registered classes win over the copies
        assert type(candidate) is MoEEncoderForMaskedLM
        torch.testing.assert_close(candidate.state_dict(), model.state_dict())
    assert len(fill_mask(f"the {fill_mask.tokenizer.mask_token} sat on the mat .")) == 5


def saved_checkpoint(tmp_path: Path, tokenizer_folder: Path) -> Path:
    from train.checkpoints import save_checkpoint

    tokenizer = loaded_tokenizer(tokenizer_folder)
    model = tiny_model(len(tokenizer), tokenizer.pad_token_id).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(5, len(tokenizer), (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()  # so the optimizer file holds tensors
    return save_checkpoint(
        tmp_path / "checkpoints" / "step-000001",
        model,
        tokenizer,
        optimizer,
        {"torch_cpu": torch.get_rng_state()[None]},
        {"step": 1},
    )


def test_saved_files_are_readable_by_others(exported, tokenizer_folder, tmp_path):
    probe = tmp_path / "probe.txt"
    probe.write_text("x")  # what a plain open() gives, under the umask of this process
    plain_mode = probe.stat().st_mode & 0o777
    _, model_folder = exported
    checkpoint = saved_checkpoint(tmp_path, tokenizer_folder)
    for folder, weights in (
        (model_folder, ["model.safetensors"]),
        (checkpoint, ["model.safetensors", "optimizer.safetensors", "rng.safetensors"]),
    ):
        modes = {path.name: oct(path.stat().st_mode & 0o777) for path in folder.iterdir() if path.is_file()}
        assert set(weights) <= set(modes)
        assert set(modes.values()) == {oct(plain_mode)}, modes  # safetensors alone writes 0600


def test_no_load_time_options_in_tokenizer_config(exported, tokenizer_folder, tmp_path):
    from data_processors.tokenizer import load_tokenizer

    _, model_folder = exported
    checkpoint = saved_checkpoint(tmp_path, tokenizer_folder)
    step2_tokenizer = load_tokenizer(str(tokenizer_folder))  # step 2 with tokenizer_name = a local folder
    step2_tokenizer.save_pretrained(str(tmp_path / "step2_tokenizer"))
    for folder in (model_folder, checkpoint, tmp_path / "step2_tokenizer"):
        saved = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        assert not set(LOAD_TIME_KEYS) & set(saved), (folder, sorted(saved))
        assert saved["mask_token"] == "[MASK]"  # still a complete tokenizer config


# ---- the model card -------------------------------------------------------------------------------------


def card_parts(text: str) -> tuple[dict, str]:
    """(YAML metadata, markdown body) of a Hugging Face model card."""
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def full_card(**overrides) -> dict:
    architecture = dict(
        vocab_size=945,
        embedding_dim=128,
        seq_len=64,
        num_head=4,
        n_encoder_blocks=2,
        n_experts=4,
        top_k_experts=1,
        moe_dim=256,
        moe_every=1,
        router_type="topk",
        router_gate="switch",
        capacity_factor=None,
        expert_type="mlp",
        n_shared_experts=0,
        load_balance_coef=0.01,
        router_z_loss_coef=0.0,
        dropout=0.1,
    )
    card = {
        "architecture": architecture,
        "tag": "demo",
        "mask_token": "[MASK]",
        "dataset": {
            "seed": 11,
            "load_params": {
                "source": "hub",
                "dataset_url": "sentence-transformers/reddit-title-body",
                "text_field": "body",
                "topic_field": "subreddit",
            },
            "data_params": {"eval_topics": ["programming", "gaming"], "mask_prob": 0.15},
        },
        "train": {
            "batch_size": 32,
            "gradient_accumulation_steps": 1,
            "learning_rate": 1e-3,
            "weight_decay": 0.01,
            "warmup_proportion": 0.1,
            "max_grad_norm": 1.0,
            "masking": "static",
            "random_seed": 7,
        },
        "data": {
            "counts": {
                "train": {"documents": 4000, "real_tokens": 136989, "masked_tokens": 19523},
                "topics/gaming": {"documents": 500, "real_tokens": 26665, "masked_tokens": 3813},
            },
            "topics": {"gaming": "topics/gaming"},
            "seq_len": 64,
            "tokenizer": {"name": "trained WordPiece", "vocab_size": 945},
        },
        "eval_history": [
            {"step": 100, "eval_mlm_loss": 4.65, "eval_accuracy": 0.09},
            {"step": 400, "eval_mlm_loss": 4.1776, "eval_accuracy": 0.1533},
        ],
        "valid_expert_counts": [[30, 10, 0, 60], [25, 25, 25, 25]],
        "n_parameters": 1234567,
        "total_steps": 400,
        "device": "cuda:0",
        "n_processes": 1,
        "mixed_precision": "bf16",
    }
    card.update(overrides)
    return card


def test_model_card_has_the_hub_metadata_and_every_section():
    from train.model_card import model_card

    metadata, body = card_parts(model_card(full_card()))
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "fill-mask"
    assert {"mixture-of-experts", "masked-lm"} <= set(metadata["tags"])
    assert metadata["datasets"] == ["sentence-transformers/reddit-title-body"]
    for heading in (
        "## Architecture and config",
        "## Training data",
        "## Training",
        "## Evaluation",
        "## Routing summary",
        "## How to load",
    ):
        assert f"\n{heading}\n" in body, heading
    assert "| parameters | 1,234,567 |" in body and "| MoE layers | block 0, block 1 |" in body
    assert "token choice, top-1 with the switch gate, dropless" in body
    assert "| self-attention, heads | bidirectional, 4 |" in body  # no attention key: an older config
    card = full_card()
    card["architecture"] = {**card["architecture"], "attention": "causal"}
    causal_body = card_parts(model_card(card))[1]
    assert "| self-attention, heads | causal, 4 |" in causal_body and "A causal Transformer encoder" in causal_body
    assert "| topic gaming | 500 | 26665 | 3813 |" in body and "trained WordPiece, vocabulary 945" in body
    assert "| seed | 7 |" in body and "| precision | bf16 |" in body and "| optimizer steps | 400 |" in body
    assert "step 400" in body and "| MLM loss (nats per masked token) | 4.1776 |" in body  # the last eval
    assert "| accuracy on masked tokens | 0.1533 |" in body and "| perplexity | 65.21 |" in body
    assert "| block 0 | 30.0% / 10.0% / 0.0% / 60.0% | 1.30 |" in body  # entropy of (.3, .1, 0, .6) in bits
    assert "| block 1 | 25.0% / 25.0% / 25.0% / 25.0% | 2.00 |" in body
    assert "# MoE encoder, run `demo`" in body
    assert "report.md" in body and "random routers" in body
    assert "trust_remote_code=True" in body and 'pipeline("fill-mask"' in body


def test_model_card_with_little_known_says_so():
    from train.model_card import model_card

    card = full_card(dataset=None, train=None, data=None, eval_history=[], valid_expert_counts=None, n_parameters=None)
    card["architecture"] = {**card["architecture"], "n_experts": 1, "top_k_experts": 1}  # the dense baseline
    metadata, body = card_parts(model_card(card))
    assert "datasets" not in metadata
    assert "| parameters | not recorded |" in body and "No validation evaluation was recorded" in body
    assert "dense baseline" in body and "| MoE layers | none |" in body


def test_training_writes_the_model_card(tmp_path):
    options = prepare_tiny_data(tmp_path)
    check_ok(run_step_in_process(3, *DEMO_CONFIGS, *options, "--tag", "card", cwd=tmp_path))
    model_folder = tmp_path / "runs" / "card" / "model"
    metadata, body = card_parts((model_folder / "README.md").read_text(encoding="utf-8"))
    assert metadata["pipeline_tag"] == "fill-mask"
    state = json.loads((model_folder / "trainer_state.json").read_text(encoding="utf-8"))
    last = state["eval_history"][-1]
    assert f"| MLM loss (nats per masked token) | {last['eval_mlm_loss']:.4f} |" in body
    assert "builtin corpus" in body and "| optimizer steps | 2 |" in body
    assert "| block 0 |" in body and "expert load shares" in body  # the routing summary from the last eval
