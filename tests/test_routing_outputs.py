"""Step 4's routing analysis on a tiny run: statistics files, figures, token pages, report, and the raw records."""

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from helpers import (
    DEMO_CONFIGS,
    ROUTING_LAYER_KEYS,
    check_ok,
    run_step,
    run_step_in_process,
    step_config_args,
    tiny_sets,
)
from process_exp_results.report.formatting import with_interval

SPEC_LAYER_KEYS = ROUTING_LAYER_KEYS  # what step 4 promises per layer (tests/helpers.py)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Steps 1-3 as a user runs them, then step 4 in this process (saves a second start of torch)."""
    tmp_path = tmp_path_factory.mktemp("routing")
    options = tiny_sets(tmp_path, **{"model.n_encoder_blocks": 2})
    check_ok(run_step(1, *step_config_args(1), *options, cwd=tmp_path))
    check_ok(run_step(2, *step_config_args(2), *options, cwd=tmp_path))
    check_ok(run_step(3, *DEMO_CONFIGS, *options, "--tag", "tiny", cwd=tmp_path))
    inference = check_ok(
        run_step_in_process(
            4,
            *DEMO_CONFIGS,
            *options,
            "--save_path",
            tmp_path / "results",
            "--n-boot",
            "20",
            "--n-perm",
            "20",
            cwd=tmp_path,
        )
    )
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
    assert {row["layer"] for row in rows} == {"block 0", "block 1", ""}  # "": not per layer (held-out vocabulary)
    assert all(row["measure"].startswith("held_out_unseen_piece_share:") for row in rows if not row["layer"])
    report = (out_dir / "report.md").read_text(encoding="utf-8")
    for sentence in stats["summary"]:  # the sentences are in the report; the console gets the table at a glance
        assert sentence in report and sentence not in stdout
    assert f"wrote {out_dir}/: report.md" in stdout


def test_step4_prints_the_routing_table_at_a_glance_and_a_verdict_per_layer(tiny_run):
    _, out_dir, stdout = tiny_run
    stats = json.loads((out_dir / "routing_stats.json").read_text())
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("layer ") and "topic index" in line)
    for offset, layer in enumerate(stats["layers"], start=2):  # header, rule, then one row per layer
        row = lines[header + offset]
        assert row.startswith(layer["layer"])
        topic = layer["references"]["topic"]
        band = topic["random_load_matched"]
        assert with_interval(band["mean"], [band["low"], band["high"]]) in row  # the topic NMI's own band
        index = with_interval(topic["index"], topic["index_ci"], 2) if topic["index"] is not None else "n/a"
        assert index in row
    verdicts = [line for line in lines if re.match(r"block \d: topic ", line)]
    assert [line.split(":")[0] for line in verdicts] == [layer["layer"] for layer in stats["layers"]]
    assert all(len(line) <= 250 for line in verdicts)
    report = (out_dir / "report.md").read_text(encoding="utf-8")
    assert "## At a glance" in report and all(f"- {line}" in report for line in verdicts)


def test_figures_are_readable_pngs(tiny_run):
    _, out_dir, _ = tiny_run
    import matplotlib.image

    names = {
        "nmi_per_layer.png",
        "specialization_index.png",
        "topic_expert_heatmap_block_0.png",
        "topic_expert_heatmap_block_1.png",
    }
    assert names <= {path.name for path in (out_dir / "figures").glob("*.png")}
    for name in names:
        path = out_dir / "figures" / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        height, width, _ = matplotlib.image.imread(path).shape
        assert height > 200 and width > 300


def test_token_pages_are_self_contained_with_one_span_per_token(tiny_run):
    _, out_dir, _ = tiny_run
    from transformers import AutoTokenizer

    from inference.outputs import sample_documents
    from process_exp_results.report.tokens_html import write_token_html

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

    from process_exp_results.analysis.collect import collect_routing
    from train.final_model import load_model

    model, _ = load_model(tmp_path / "runs" / "tiny" / "model")
    masked = tmp_path / "masked"
    groups = {"test": datasets.load_from_disk(str(masked / "test"))}
    manifest = json.loads((masked / "manifest.json").read_text())
    for topic, folder in manifest["topics"].items():
        groups[topic] = datasets.load_from_disk(str(masked / folder))
    records, _ = collect_routing(
        model,
        groups,
        torch.device("cpu"),
        batch_size=16,
        max_docs_per_group=max_docs,
        held_out_groups=tuple(manifest["topics"]),
    )
    return records, model, groups


def test_collect_routing_matches_the_model_token_by_token(tiny_run):
    import torch

    records, model, groups = _collect(tiny_run[0], max_docs=25)
    assert records.held_out.tolist() == [topic != "test" for topic in _group_of_rows(records, groups, 25)]
    evaluated = {name: dataset.select(range(min(25, len(dataset)))) for name, dataset in groups.items()}
    real_tokens = sum(int(np.sum(dataset["attention_mask"])) for dataset in evaluated.values())
    assert len(records.token_id) == len(records.doc_id) == len(records.position) == real_tokens
    assert records.experts.shape == (real_tokens, 2, model.config.top_k_experts)
    assert records.layer_names == ["block 0", "block 1"]
    # topic = the document's own label
    topic_of_doc = {
        doc: topic for dataset in evaluated.values() for doc, topic in zip(dataset["doc_id"], dataset["topic"])
    }
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


def _group_of_rows(records, groups, max_docs):
    names = []
    for name, dataset in groups.items():
        names += [name] * int(np.sum(dataset.select(range(min(max_docs, len(dataset))))["attention_mask"]))
    return names


def test_references_in_step4_outputs(tiny_run):
    _, out_dir, _ = tiny_run
    stats = json.loads((out_dir / "routing_stats.json").read_text())
    assert stats["groups"]["seen"] and stats["groups"]["held_out"] and stats["groups"]["pooled"] is False
    assert set(stats["groups"]["seen"]).isdisjoint(stats["groups"]["held_out"])
    assert set(stats["held_out_shift"]) == set(stats["groups"]["held_out"])
    assert stats["settings"]["references"]["n_random_routers"] == 50
    for layer in stats["layers"]:
        for factor in ("topic", "token_class"):
            reference = layer["references"][factor]
            assert {"trained", "random", "random_load_matched", "probe", "index", "index_ci"} <= set(reference)
            assert set(reference["random"]) == {"mean", "low", "high", "rank"}
    measures = {row["measure"] for row in csv.DictReader(open(out_dir / "routing_stats.csv", encoding="utf-8"))}
    assert {
        "specialization_index:topic",
        "reference:topic:random_load_matched",
        "conditional_topic_mi_excess",
    } <= measures
    report = (out_dir / "report.md").read_text(encoding="utf-8")
    assert "learned nothing" in report and "Held-out topics" in report


def _sample(tiny_run, model, max_router_inputs, seed=0, batch_size=16):
    import datasets
    import torch

    from process_exp_results.analysis.collect import collect_routing

    masked = tiny_run[0] / "masked"
    manifest = json.loads((masked / "manifest.json").read_text())
    groups = {"test": datasets.load_from_disk(str(masked / "test"))}
    for topic, folder in manifest["topics"].items():
        groups[topic] = datasets.load_from_disk(str(masked / folder))
    return collect_routing(
        model,
        groups,
        torch.device("cpu"),
        batch_size=batch_size,
        held_out_groups=tuple(manifest["topics"]),
        max_router_inputs=max_router_inputs,
        seed=seed,
    )


def test_router_inputs_reproduce_the_routing_and_the_mlm_head_never_runs(tiny_run):
    """The kept router inputs through the trained router's weights give the recorded top choice, token by token;
    the sample is capped, seeded and drawn from the seen (test split) tokens only; the MLM head is not run."""
    import torch

    from process_exp_results.analysis.routers import SelectionRule
    from train.final_model import load_model

    model, _ = load_model(tiny_run[0] / "runs" / "tiny" / "model")

    def refuse(*_):
        raise AssertionError("collect_routing ran the MLM head")

    model.lm_head.register_forward_hook(refuse)
    records, sample = _sample(tiny_run, model, max_router_inputs=10**9)
    seen = np.flatnonzero(~records.held_out)
    assert np.array_equal(sample.rows, seen) and sample.n_candidates == len(seen)
    for layer, (inputs, weight) in enumerate(zip(sample.inputs, sample.weights)):
        assert inputs.shape == (len(seen), model.config.embedding_dim)
        logits = torch.from_numpy(inputs) @ torch.from_numpy(weight).T
        choice = SelectionRule("topk").top_choice(logits[None], sample.batch)[0].numpy()
        assert np.array_equal(choice, records.experts[seen, layer, 0])
    capped, capped_sample = _sample(tiny_run, model, max_router_inputs=50, seed=3)
    assert len(capped_sample.rows) == 50 and np.all(np.diff(capped_sample.rows) > 0)
    assert not capped.held_out[capped_sample.rows].any()
    again = _sample(tiny_run, model, max_router_inputs=50, seed=3)[1]
    assert np.array_equal(again.rows, capped_sample.rows) and np.array_equal(again.inputs[0], capped_sample.inputs[0])
    rows_in_full = np.searchsorted(sample.rows, capped_sample.rows)
    assert np.allclose(capped_sample.inputs[1], sample.inputs[1][rows_in_full], atol=1e-6)


def test_expert_choice_references_use_the_models_own_rule(tiny_run):
    """An expert-choice model: the references' selection rule, on every seen token's router input and the step-4
    forward passes, reproduces the model's own choice (each expert takes its capacity of a pass's tokens)."""
    import torch

    from models import MoEEncoderConfig, MoEEncoderForMaskedLM
    from process_exp_results.analysis.routers import SelectionRule
    from train.final_model import load_model

    trained, _ = load_model(tiny_run[0] / "runs" / "tiny" / "model")
    settings = {**trained.config.to_dict(), "router_type": "expert_choice", "capacity_factor": 1.0}
    torch.manual_seed(0)
    model = MoEEncoderForMaskedLM(MoEEncoderConfig(**settings))
    for cap in (10**9, 600):  # every seen token, and a sample of whole forward passes
        records, sample = _sample(tiny_run, model, max_router_inputs=cap, batch_size=8)
        assert sample.rule == SelectionRule("expert_choice", model.config.top_k_experts, 1.0)
        assert len(np.unique(sample.batch)) > 1  # several forward passes compete separately
        assert len(sample.rows) <= cap and (cap > len(sample.rows) or sample.n_candidates > cap)
        for layer, (inputs, weight) in enumerate(zip(sample.inputs, sample.weights)):
            logits = torch.from_numpy(inputs) @ torch.from_numpy(weight).T
            choice = sample.rule.top_choice(logits[None], sample.batch)[0].numpy()
            recorded = records.experts[sample.rows, layer, 0]
            assert np.array_equal(np.where(choice == model.config.n_experts, -1, choice), recorded)
    assert 0 < len(sample.rows) < sample.n_candidates  # the capped sample is partial, and still exact


def test_token_pages_draw_word_pieces_against_the_piece_before(tmp_path):
    from process_exp_results.report.tokens_html import write_token_html

    documents = [
        {
            "label": "doc",
            "tokens": ["[CLS]", "un", "##believ", "##able", "cats", "[SEP]"],
            "experts": [0, 1, 1, 0, 1, 0],
        }
    ]
    page = write_token_html(tmp_path / "page.html", documents, "block 0", 2).read_text(encoding="utf-8")
    doc = re.search(r'<div class="doc">(.*?)</div>', page, re.S).group(1)
    spans = re.findall(r'( ?)<span( class="cont")?[^>]*>([^<]*)</span>', doc)
    assert [(space, continuation != "", text) for space, continuation, text in spans] == [
        ("", False, "[CLS]"),
        (" ", False, "un"),
        ("", True, "believ"),
        ("", True, "able"),
        (" ", False, "cats"),
        (" ", False, "[SEP]"),
    ]


def test_step4_records_its_numbers_and_figures_in_the_runs_aim_run(tiny_run):
    tmp_path, out_dir, stdout = tiny_run
    from aim import Repo

    (run,) = [run for run in Repo(str(tmp_path)).iter_runs() if "tiny" in run.tags]
    manifest = json.loads((tmp_path / "runs" / "tiny" / "manifest.json").read_text())
    metrics = {
        (metric.name, tuple(sorted(metric.context.to_dict().items()))): metric
        for metric in run.metrics()
        if not metric.name.startswith("__system__")
    }
    stats = json.loads((out_dir / "routing_stats.json").read_text())
    for layer in stats["layers"]:
        nmi = metrics[("topic_nmi", (("layer", layer["layer"]), ("subset", "test")))]
        steps, (values, *_) = nmi.data.items_list()
        assert steps == [manifest["total_steps"]] and values == [pytest.approx(layer["nmi"])]
    rows = list(csv.DictReader(open(out_dir / "metrics.csv", encoding="utf-8")))
    for row in rows:
        _, (values, *_) = metrics[("perplexity", (("subset", row["group"]),))].data.items_list()
        assert values == [pytest.approx(float(row["perplexity"]))]
    figures = {
        context["figure"] for name, context, _ in run.iter_sequence_info_by_type("aim.image") if name == "step4_figures"
    }
    assert figures == {path.stem for path in (out_dir / "figures").glob("*.png")}
    assert f"in Aim run {run.hash}" in stdout


def test_aim_is_an_extra_step4_says_why_it_recorded_nothing(tmp_path):
    from inference.aim_results import record_in_aim

    rows = [{"group": "test", "mlm_loss": 2.0, "accuracy": 0.5, "perplexity": 7.39}]
    assert "trained without tracking" in record_in_aim({"aim_run_hash": None}, str(tmp_path), rows, None, None, [])
    line = record_in_aim({"aim_run_hash": "abc", "total_steps": 5}, str(tmp_path / "gone"), rows, None, None, [])
    assert line.startswith("aim: ") and "is gone" in line
    (tmp_path / ".aim").mkdir()  # not a repository Aim can open
    line = record_in_aim({"aim_run_hash": "abc", "total_steps": 5}, str(tmp_path), rows, None, None, [])
    assert "were not recorded" in line and "files are complete" in line
