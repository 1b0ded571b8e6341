"""The study (process_exp_results/experiments/study.py): every arm on one common evaluation set, resumable; its statistics."""

import json
import math
import time
from pathlib import Path

import pytest
from test_experiments import run_script

from helpers import REPO, check_ok, error_line
from process_exp_results.experiments.common_eval import difference_interval, seed_summary, t_975
from process_exp_results.experiments.study_summary import arm_summary

STUDY = REPO / "process_exp_results" / "experiments" / "study.py"
SEEN_ARMS = [
    "seq64_mask0.15",
    "seq64_mask0.05",
    "seq128_mask0.10",
    "seq128_mask0.30",
    "seq64_mask0.15_balanced",
    "seed_replica",
]


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    """`study.py --quick` on the builtin corpus (both designs, one seed), run once for this module's tests."""
    out = tmp_path_factory.mktemp("study") / "quick"
    started = time.perf_counter()
    result = check_ok(run_script(STUDY, "--quick", "--jobs", "2", "--out", out, timeout=900))
    return out, result, time.perf_counter() - started


def sweep_runs(out, name):
    return json.loads((out / name / "sweep.json").read_text())["runs"]


def test_quick_study_runs_every_arm_and_writes_the_tables_and_figures(quick_study):
    out, result, seconds = quick_study
    assert seconds < 600  # the bar for --quick (the fixture allows 900 s, so this can fail)
    table = (out / "study.md").read_text()
    seen, held_out = table.split("### builtin, held_out topics")
    assert "### builtin, seen topics" in seen
    for arm in SEEN_ARMS:
        assert f"| {arm} | 1 |" in seen
    assert [f"| {arm} | 1 |" in held_out for arm in SEEN_ARMS] == [True, False, False, False, False, True]
    assert [run["status"] for name in ("builtin-seen", "builtin-held_out") for run in sweep_runs(out, name)] == [
        "ok"
    ] * 8
    for name in ("study_loss.png", "study_index.png"):
        assert (out / name).stat().st_size > 10_000
    for name in ("builtin-seen", "builtin-held_out"):
        assert (out / name / "comparison" / "arms.md").read_text().count("| seed_replica |") == 1
        assert (out / name / "comparison" / "comparison.png").stat().st_size > 10_000
    summary = json.loads((out / "study.json").read_text())
    assert set(summary["designs"]) == {"builtin-seen", "builtin-held_out"}
    assert "study.md" in result.stdout


def test_every_model_is_scored_on_the_same_documents_none_of_them_trained_on(quick_study):
    import datasets
    import pandas as pd

    out, _, _ = quick_study

    def texts(folder, splits):
        return {text for split in splits for text in pd.read_parquet(REPO / folder / f"{split}.parquet")["text"]}

    for name in ("builtin-seen", "builtin-held_out"):
        runs = sweep_runs(out, name)
        evaluations = {
            run["arm"]: json.loads((REPO / run["results_dir"] / "common_eval.json").read_text()) for run in runs
        }
        reference = next(run for run in runs if run["arm"] == "seq64_mask0.15")
        common = evaluations["seq64_mask0.15"]["common"]["common_set"]
        assert (common["seq_len"], common["mask_prob"]) == (64, 0.15) and common["documents"] > 0
        for arm, evaluation in evaluations.items():
            if arm != "seq64_mask0.15_balanced":  # one set for every arm that shares the reference's split
                assert evaluation["common"]["common_set"] == common
                assert 0 < evaluation["common"]["accuracy"] < 1 and evaluation["common"]["mlm_loss"] > 0
        # the common set's texts, by the reference's step 1 (doc_ids are per split: texts identify documents)
        test_text = dict(
            zip(*(pd.read_parquet(REPO / reference["processed_dir"] / "test.parquet")[c] for c in ("doc_id", "text")))
        )
        common_texts = {
            test_text[doc] for doc in datasets.load_from_disk(str(REPO / common["masked_dir"] / "test"))["doc_id"]
        }
        shared = [run for run in runs if run["arm"] != "seq64_mask0.15_balanced"]
        assert not common_texts & set().union(*(texts(run["processed_dir"], ("train", "valid")) for run in shared))
        assert len(common_texts) == common["documents"]
    seen = {run["arm"]: run for run in sweep_runs(out, "builtin-seen")}
    balanced_run = seen["seq64_mask0.15_balanced"]
    subsets = [
        json.loads((REPO / seen[arm]["results_dir"] / "common_eval.json").read_text())["balanced_subset"]
        for arm in ("seq64_mask0.15", "seq64_mask0.15_balanced")
    ]
    assert subsets[0]["common_set"] == subsets[1]["common_set"]
    subset = subsets[0]["common_set"]
    # the balanced arm's own split holds some of the reference's test documents: those are left out
    overlap = common_texts_of(seen["seq64_mask0.15"]) & texts(balanced_run["processed_dir"], ("train", "valid"))
    assert overlap and subset["excluded_documents"] == len(overlap)
    assert subset["documents"] == len(common_texts_of(seen["seq64_mask0.15"])) - len(overlap)
    assert "balanced_subset" not in json.loads(
        (REPO / seen["seq64_mask0.05"]["results_dir"] / "common_eval.json").read_text()
    )


def common_texts_of(reference_run):
    import pandas as pd

    return set(pd.read_parquet(REPO / reference_run["processed_dir"] / "test.parquet")["text"])


def test_the_arms_are_what_they_say(quick_study):
    out, _, _ = quick_study
    runs = {run["arm"]: run for run in sweep_runs(out, "builtin-seen")}
    manifests = {arm: json.loads((REPO / run["masked_dir"] / "manifest.json").read_text()) for arm, run in runs.items()}
    # one vocabulary for every arm: the balanced arm reads the reference arm's tokenizer
    assert len({manifest["tokenizer"]["vocab_hash"] for manifest in manifests.values()}) == 1
    assert runs["seq64_mask0.15_balanced"]["processed_dir"] != runs["seq64_mask0.15"]["processed_dir"]
    assert {arm: (manifest["seq_len"], manifest["mask_prob"]) for arm, manifest in manifests.items()} == {
        "seq64_mask0.15": (64, 0.15),
        "seq64_mask0.05": (64, 0.05),
        "seq128_mask0.10": (128, 0.10),
        "seq128_mask0.30": (128, 0.30),
        "seq64_mask0.15_balanced": (64, 0.15),
        "seed_replica": (64, 0.15),
    }
    replica = json.loads((REPO / runs["seed_replica"]["run_dir"] / "model" / "config.json").read_text())
    reference = json.loads((REPO / runs["seq64_mask0.15"]["run_dir"] / "model" / "config.json").read_text())
    assert (replica["attention"], replica["load_balance_coef"]) == ("causal", 0.0)
    assert (reference["attention"], reference["load_balance_coef"]) == ("bidirectional", 0.01)
    assert "train.freeze_router=true" in " ".join(runs["seed_replica"]["overrides"])
    held_out = {run["arm"]: run for run in sweep_runs(out, "builtin-held_out")}
    metrics = (REPO / held_out["seq64_mask0.15"]["results_dir"] / "metrics.csv").read_text()
    assert "\nprogramming," in metrics and "\ngaming," in metrics


def test_a_second_invocation_reuses_every_finished_run(quick_study):
    out, _, _ = quick_study
    before = {run["tag"]: run["seconds"] for run in sweep_runs(out, "builtin-seen")}
    result = check_ok(run_script(STUDY, "--quick", "--out", out, timeout=300))
    assert result.stdout.count(": done earlier (") == 8 and "step 3" not in result.stdout
    assert {run["tag"]: run["seconds"] for run in sweep_runs(out, "builtin-seen")} == before  # times kept


def test_a_run_whose_step_4_was_cut_short_counts_its_earlier_training_in_the_study_time(quick_study):
    out, _, _ = quick_study
    run = next(run for run in sweep_runs(out, "builtin-seen") if run["arm"] == "seq64_mask0.05")
    (REPO / run["results_dir"] / "metrics.csv").unlink()  # as if the last invocation stopped during its step 4
    result = check_ok(run_script(STUDY, "--quick", "--out", out, timeout=300))
    assert result.stdout.count("step 4 ...") == 1 and "step 3 ..." not in result.stdout
    runs = sweep_runs(out, "builtin-seen")
    assert [run["tag"] for run in runs if run["trained_earlier"]] == [run["tag"]]
    training = json.loads((REPO / run["run_dir"] / "manifest.json").read_text())["seconds"]
    design = json.loads((out / "study.json").read_text())["designs"]["builtin-seen"]
    assert design["seconds"] == pytest.approx(sum(run["seconds"] for run in runs) + training, abs=0.1)


def test_the_common_set_refuses_a_model_with_another_vocabulary(quick_study):
    from config_utils import PipelineError
    from process_exp_results.experiments.common_eval import CommonSet

    out, _, _ = quick_study
    run = sweep_runs(out, "builtin-held_out")[0]
    common = CommonSet(REPO / run["masked_dir"], REPO / run["processed_dir"])
    common.vocab_hash = "another vocabulary"
    with pytest.raises(PipelineError, match="tokenizer_name="):
        common.evaluate(REPO / run["run_dir"])


def test_the_study_refuses_keys_it_sets_and_unknown_names(tmp_path):
    line = error_line(run_script(STUDY, "--quick", "--set", "model.seq_len=32", "--out", tmp_path, timeout=60))
    assert "model.seq_len=32" in line and "sets this key itself" in line
    for key in ("train.random_seed=3", "train.aim_repo=elsewhere", "dataset.data_params.eval_topics=[cooking]"):
        assert "sets this key itself" in error_line(run_script(STUDY, "--quick", "--set", key, "--out", tmp_path))
    line = error_line(run_script(STUDY, "--corpus", "wikipedia", "--out", tmp_path, timeout=60))
    assert "wikipedia" in line and "20newsgroups, agnews, builtin, reddit" in line
    assert not (tmp_path / "study.md").exists()


def test_a_corpus_file_naming_a_topic_its_corpus_lacks_is_refused_before_any_run(tmp_path):
    """A user's own corpus: one line naming the file, the key and the topic, and nothing run or written (today the
    balanced arm failed at step 1 with "the corpus is empty after filtering")."""
    rows = [{"body": f"post {i} about things", "label": ("cats", "dogs", "birds")[i % 3]} for i in range(60)]
    (tmp_path / "posts.csv").write_text(
        "body,label\n" + "".join(f"{row['body']},{row['label']}\n" for row in rows), encoding="utf-8"
    )
    corpus = tmp_path / "mine.yaml"
    text = (
        "source: files\ndata_files: [posts.csv]\ntext_field: body\ntopic_field: label\n"
        "train_len: 30\nvalid_len: 5\ntest_len: 10\ntopic_len: 5\ntokenizer_vocab_size: 200\n"
        "held_out: [birds]\nbalanced: [cats, dogs, fish]\n"
    )
    corpus.write_text(text, encoding="utf-8")
    result = run_script(STUDY, "--corpus", corpus, "--out", tmp_path / "study", timeout=60)
    line = error_line(result)
    assert f"{corpus}: balanced names 'fish', which is not a topic of the corpus (3 topics: birds, cats, dogs)" in line
    assert not (tmp_path / "study").exists()
    corpus.write_text(text.replace("topic_field: label", "topic_field: label\nsauce: yes"), encoding="utf-8")
    assert "unknown key 'sauce'" in error_line(run_script(STUDY, "--corpus", corpus, "--out", tmp_path / "study"))


def test_every_corpus_file_in_configs_names_only_topics_its_corpus_has():
    from process_exp_results.experiments.corpora import CORPUS_FOLDER, check_named_topics, load_corpus

    names = sorted(path.stem for path in CORPUS_FOLDER.glob("*.yaml"))
    assert names == ["20newsgroups", "agnews", "builtin", "reddit"]
    for name in names:
        corpus = load_corpus(name)
        if all(Path(pattern).parent.is_dir() for pattern in corpus.data_files):  # the shared data may be absent
            check_named_topics(corpus)


# --------------------------------------------------------------------------- statistics, by hand


def test_seed_summary_is_the_t_interval_by_hand():
    summary = seed_summary([1.0, 2.0, 3.0])
    assert (summary["mean"], summary["sd"], summary["min"], summary["max"]) == (2.0, 1.0, 1.0, 3.0)
    half = 4.303 * 1.0 / math.sqrt(3)
    assert summary["ci"] == pytest.approx([2.0 - half, 2.0 + half])
    assert seed_summary([5.0])["ci"] is None and seed_summary([None])["mean"] is None
    assert t_975(2.7) == 4.303 and t_975(500) == 1.96  # Welch's fractional dof rounds down


def test_difference_interval_is_welch_by_hand():
    a, b = [1.0, 2.0, 3.0], [2.0, 4.0, 6.0, 8.0]
    va, vb = 1.0 / 3, (20.0 / 3) / 4  # sample variances over sizes
    dof = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)  # 4.07: rounds down to 4
    result = difference_interval(a, b)
    assert result["difference"] == -3.0
    assert result["ci"] == pytest.approx([-3.0 - 2.776 * math.sqrt(va + vb), -3.0 + 2.776 * math.sqrt(va + vb)])
    assert 4 < dof < 5 and difference_interval([1.0], b)["ci"] is None


def test_arm_summary_pools_ablation_cells_and_needs_every_layer_settled():
    def layer(settled, topic_hits):
        return {
            "topic_nmi": 0.02,
            "topic_nmi_random": 0.01,
            "topic_index": 0.1,
            "topic_index_ci": [0.05, 0.15],
            "token_class_index": 0.3,
            "token_class_index_ci": [-0.1, 0.5],
            "settled_at": settled,
            "agreement_before_last": 0.9,
            "consecutive_vs_random": 0.01,
            "ablation": {"topic": [topic_hits, 4], "class": [4, 4]},
        }

    def row(layers, loss, status="ok"):
        return {"status": status, "common_loss": loss, "common_accuracy": 0.2, "own_test_loss": loss, "layers": layers}

    failed = row([layer(50, 4), layer(50, 4)], 9.0, status="failed")  # an older run's files: not counted
    rows = [row([layer(100, 1), layer(300, 0)], 5.0), row([layer(200, 2), layer(None, 0)], 5.2), failed]
    summary = arm_summary(rows)
    assert summary["seeds"] == 2
    assert summary["saturation"]["settled_seeds"] == [1, 2] and summary["saturation"]["median_step"] == 300
    assert summary["ablation"]["topic"]["cells"] == [3, 16] and summary["ablation"]["class"]["cells"] == [16, 16]
    # per seed 1/8 and 2/8: their mean, with a t interval over the two seeds
    assert summary["ablation"]["topic"]["share"]["mean"] == pytest.approx(0.1875)
    assert summary["ablation"]["topic"]["share"]["ci"] == pytest.approx(seed_summary([0.125, 0.25])["ci"])
    assert summary["topic_pairs_clearing_0"] == [4, 4, 4] and summary["token_class_pairs_clearing_0"] == [0, 4, 4]
    assert summary["common_loss"]["mean"] == pytest.approx(5.1)


def test_a_resumed_runs_earlier_starts_count_in_the_study_time(tmp_path):
    from process_exp_results.experiments.study_summary import earlier_starts_seconds, minutes_text

    def run_with(manifest, trained_earlier=False):
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        if manifest is not None:
            (folder / "manifest.json").write_text(json.dumps(manifest))
        return {"run_dir": str(folder), "trained_earlier": trained_earlier}

    # the sweep times a run's last invocation only: a resumed run adds the training of its starts before it
    assert (
        earlier_starts_seconds(run_with({"resumed_from": "ckpt", "seconds": 15.0, "seconds_all_starts": 115.5}))
        == 100.5
    )
    assert earlier_starts_seconds(run_with({"resumed_from": None, "seconds": 15.0, "seconds_all_starts": 15.0})) == 0
    assert earlier_starts_seconds(run_with(None)) == 0  # not trained yet (a failed run)
    assert earlier_starts_seconds(run_with({"resumed_from": "ckpt", "seconds": 15.0})) is None  # before the record
    # trained by an earlier invocation (this one only ran step 4): all of its training
    assert earlier_starts_seconds(run_with({"resumed_from": None, "seconds": 15.0}, trained_earlier=True)) == 15.0
    resumed = {"resumed_from": "ckpt", "seconds": 15.0, "seconds_all_starts": 115.5}
    assert earlier_starts_seconds(run_with(resumed, trained_earlier=True)) == 115.5
    assert minutes_text({"seconds": 90, "runs_with_unrecorded_starts": 0}) == "1.5 min"
    assert minutes_text({"seconds": 90, "runs_with_unrecorded_starts": 2}) == "at least 1.5 min"
