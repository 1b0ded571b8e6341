"""Step 4's routing analysis on a tiny run: statistics files, figures, token pages, report, and the raw records."""
import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from helpers import DEMO_CONFIGS, check_ok, run_step, run_step_in_process, step_config_args, tiny_sets

SPEC_LAYER_KEYS = {"layer", "layer_index", "nmi", "nmi_ci", "p_value", "js", "js_ci", "topic_expert_counts",
                   "token_class", "token_id", "conditional_topic", "vocabulary", "coactivation"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Steps 1-3 as a user runs them, then step 4 in this process (saves a second start of torch)."""
    tmp_path = tmp_path_factory.mktemp("routing")
    options = tiny_sets(tmp_path, **{"model.n_encoder_blocks": 2})
    check_ok(run_step(1, *step_config_args(1), *options, cwd=tmp_path))
    check_ok(run_step(2, *step_config_args(2), *options, cwd=tmp_path))
    check_ok(run_step(3, *DEMO_CONFIGS, *options, "--tag", "tiny", cwd=tmp_path))
    inference = check_ok(run_step_in_process(4, *DEMO_CONFIGS, *options, "--save_path", tmp_path / "results",
                                             "--n-boot", "20", "--n-perm", "20", cwd=tmp_path))
    return tmp_path, tmp_path / "results" / "tiny", inference.stdout


def test_routing_stats_json_and_csv(tiny_run):
    _, out_dir, stdout = tiny_run
    stats = json.loads((out_dir / "routing_stats.json").read_text())
    assert {"n_tokens", "n_documents", "topics", "n_experts", "k", "settings", "layers", "summary"} <= set(stats)
    assert [layer["layer"] for layer in stats["layers"]] == ["block 0", "block 1"]
    for layer in stats["layers"]:
        assert SPEC_LAYER_KEYS <= set(layer)
        assert len(layer["topic_expert_counts"]) == len(stats["topics"])
    assert stats["settings"]["n_boot"] == 20 and stats["settings"]["n_perm"] == 20
    rows = list(csv.DictReader(open(out_dir / "routing_stats.csv", encoding="utf-8")))
    assert rows and set(rows[0]) == {"layer", "measure", "value", "ci_low", "ci_high", "p_value"}
    assert {row["layer"] for row in rows} == {"block 0", "block 1"}
    for sentence in stats["summary"]:  # step 4 prints what the statistics say
        assert sentence in stdout
    assert "report:" in stdout


def test_figures_are_readable_pngs(tiny_run):
    _, out_dir, _ = tiny_run
    import matplotlib.image

    names = {"nmi_per_layer.png", "topic_expert_heatmap_block_0.png", "topic_expert_heatmap_block_1.png"}
    assert names <= {path.name for path in (out_dir / "figures").glob("*.png")}
    for name in names:
        path = out_dir / "figures" / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        height, width, _ = matplotlib.image.imread(path).shape
        assert height > 200 and width > 300


def test_token_pages_are_self_contained_with_one_span_per_token(tiny_run):
    _, out_dir, _ = tiny_run
    from transformers import AutoTokenizer

    from inference.routing import sample_documents
    from process_exp_results.report import write_token_html

    for layer in ("block_0", "block_1"):
        page = (out_dir / f"tokens_{layer}.html").read_text(encoding="utf-8")
        assert "<script" not in page.lower()
        assert not re.search(r"https?://", page)
        assert page.count('title="expert') > 0
    # the page has exactly one span per sampled token
    records = _records(tiny_run)
    tokenizer = AutoTokenizer.from_pretrained(tiny_run[0] / "runs" / "tiny" / "model")
    documents = sample_documents(records, tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))), layer=0)
    assert documents
    path = write_token_html(tiny_run[0] / "page.html", documents, "block 0", records.n_experts)
    page = path.read_text(encoding="utf-8")
    n_tokens = sum(len(document["tokens"]) for document in documents)
    assert len(re.findall(r'<span[^>]*title="(?:expert \d+|no expert):', page)) == n_tokens


def test_report_links_only_existing_files(tiny_run):
    _, out_dir, _ = tiny_run
    report = (out_dir / "report.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)]+)\)", report)
    assert any(link.endswith("nmi_per_layer.png") for link in links)
    assert any(link.endswith(".html") for link in links)
    for link in links:
        assert not re.match(r"[a-z]+://", link) and not Path(link).is_absolute(), link
        assert (out_dir / link).is_file(), link
    assert "| block 0 |" in report and "| test |" in report


def _records(tiny_run):
    """collect_routing over the test split and the topics, as step 4 does (cached on the fixture's folder)."""
    tmp_path = tiny_run[0]
    cache = getattr(_records, "cache", {})
    if tmp_path not in cache:
        cache[tmp_path] = _collect(tmp_path, max_docs=None)
        _records.cache = cache
    return cache[tmp_path][0]


def _collect(tmp_path: Path, max_docs):
    import datasets
    import torch

    from inference.routing import collect_routing
    from train.checkpoints import load_model

    model, _ = load_model(tmp_path / "runs" / "tiny" / "model")
    masked = tmp_path / "masked"
    groups = {"test": datasets.load_from_disk(str(masked / "test"))}
    manifest = json.loads((masked / "manifest.json").read_text())
    for topic, folder in manifest["topics"].items():
        groups[topic] = datasets.load_from_disk(str(masked / folder))
    return collect_routing(model, groups, torch.device("cpu"), batch_size=16, max_docs_per_group=max_docs), model, groups


def test_collect_routing_matches_the_model_token_by_token(tiny_run):
    import torch

    records, model, groups = _collect(tiny_run[0], max_docs=25)
    evaluated = {name: dataset.select(range(min(25, len(dataset)))) for name, dataset in groups.items()}
    real_tokens = sum(int(np.sum(dataset["attention_mask"])) for dataset in evaluated.values())
    assert len(records.token_id) == len(records.doc_id) == len(records.position) == real_tokens
    assert records.experts.shape == (real_tokens, 2, model.config.top_k_experts)
    assert records.layer_names == ["block 0", "block 1"]
    # topic = the document's own label
    topic_of_doc = {doc: topic for dataset in evaluated.values() for doc, topic in zip(dataset["doc_id"], dataset["topic"])}
    assert all(records.topic_names[t] == topic_of_doc[int(d)] for d, t in zip(records.doc_id, records.topic))

    # plain reference: the first test documents, one forward pass, walked token by token
    test = evaluated["test"].select(range(8))
    ids = torch.tensor(test["unmasked_ids"], dtype=torch.long)
    mask = torch.tensor(test["attention_mask"]).bool()
    model.eval()
    with torch.no_grad():
        expected_experts = model(input_ids=ids, attention_mask=mask).expert_indices
    row = 0
    for doc in range(len(test)):
        for position in range(ids.shape[1]):
            if not mask[doc, position]:
                continue
            assert records.doc_id[row] == test["doc_id"][doc] and records.position[row] == position
            assert records.token_id[row] == ids[doc, position]
            for layer, chosen in enumerate(expected_experts):
                assert records.experts[row, layer].tolist() == chosen[doc, position].tolist()
            row += 1
