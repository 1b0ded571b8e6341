"""Config loading (config_utils): schema defaults, validation messages, `--set` parsing, config lookup."""

from pathlib import Path

import pytest
import yaml

from config_utils import PipelineError, load_config, resolve_config_path
from config_utils.cli import load_step_configs, step_parser
from config_utils.config import CONFIG_DIR, parse_override, validate
from config_utils.schema import DATASET_SCHEMA, MODEL_SCHEMA, REQUIRED, SCHEMAS
from helpers import STEP_SCRIPTS, check_ok, run_step

DEMO = {"dataset": "demo/dataset_params.yaml", "model": "demo/model_params.yaml", "train": "demo/train_params.yaml"}


def demo_raw(role: str) -> dict:
    return yaml.safe_load((CONFIG_DIR / DEMO[role]).read_text(encoding="utf-8"))


def write_config(tmp_path: Path, raw: dict, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def load_error(tmp_path: Path, role: str, raw: dict, overrides=()) -> str:
    path = write_config(tmp_path, raw)
    with pytest.raises(PipelineError) as caught:
        load_config(role, str(path), list(overrides))
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message  # every validation error names the file
    return message


# ---- defaults and required keys ------------------------------------------------------------------


def test_defaults_are_filled(tmp_path):
    raw = demo_raw("model")
    for key in ("moe_every", "normalize_top_k", "load_balance_coef", "router_z_loss_coef"):
        del raw[key]
    config = load_config("model", str(write_config(tmp_path, raw)), [])
    assert config.moe_every == 1 and config.normalize_top_k is True
    assert config.load_balance_coef == 0.01 and config.router_z_loss_coef == 0.0

    raw = demo_raw("dataset")
    del raw["load_params"]["builtin"]
    del raw["data_params"]["num_proc"]
    del raw["data_params"]["train_topics"]
    config = load_config("dataset", str(write_config(tmp_path, raw)), [])
    assert config.load_params.builtin == {"n_topics": 4, "topic_overlap": 0.0, "n_docs": 20000}
    assert config.data_params.num_proc == 2 and config.data_params.train_topics == []
    assert config.load_params.builtin.n_docs == 20000  # nested sections read as attributes too


def test_mutable_defaults_are_not_shared():
    raw = demo_raw("dataset")
    del raw["load_params"]["data_files"]
    first = validate(DATASET_SCHEMA, raw, "first")
    first.load_params.data_files.append("changed.csv")
    assert validate(DATASET_SCHEMA, raw, "second").load_params.data_files == []


@pytest.mark.parametrize(
    "role,key_path",
    [
        ("model", ["seq_len"]),
        ("dataset", ["load_params", "source"]),
        ("dataset", ["data_params", "mask_prob"]),
        ("train", ["save_path"]),
    ],
)
def test_missing_required_key_names_file_and_key(tmp_path, role, key_path):
    raw = demo_raw(role)
    node = raw
    for part in key_path[:-1]:
        node = node[part]
    del node[key_path[-1]]
    message = load_error(tmp_path, role, raw)
    assert f"missing key '{'.'.join(key_path)}'" in message


# ---- unknown keys, types, ranges, choices, null ----------------------------------------------------


def test_unknown_key_suggests_the_close_one(tmp_path):
    raw = demo_raw("model")
    raw["n_expert"] = 4
    message = load_error(tmp_path, "model", raw)
    assert "unknown key 'n_expert'" in message and "did you mean 'n_experts'?" in message


def test_unknown_nested_key_names_its_section(tmp_path):
    raw = demo_raw("dataset")
    raw["data_params"]["mask_probability"] = 0.2
    message = load_error(tmp_path, "dataset", raw)
    assert "data_params" in message and "mask_probability" in message and "did you mean 'mask_prob'?" in message


def test_unknown_key_without_close_match_lists_allowed(tmp_path):
    raw = demo_raw("train")
    raw["zzzz"] = 1
    message = load_error(tmp_path, "train", raw)
    assert "unknown key 'zzzz'" in message and "did you mean" not in message and "batch_size" in message


@pytest.mark.parametrize("value", ["64", True, 64.5, [64], None])
def test_int_key_rejects_other_types(tmp_path, value):
    raw = demo_raw("model")
    raw["seq_len"] = value
    message = load_error(tmp_path, "model", raw)
    assert "'seq_len'" in message and "an integer" in message


def test_float_key_accepts_int_and_returns_float(tmp_path):
    raw = demo_raw("model")
    raw["dropout"] = 0
    config = load_config("model", str(write_config(tmp_path, raw)), [])
    assert config.dropout == 0.0 and isinstance(config.dropout, float)


@pytest.mark.parametrize("value", [True, "0.1"])
def test_float_key_rejects_bool_and_string(tmp_path, value):
    raw = demo_raw("model")
    raw["dropout"] = value
    assert "'dropout'" in load_error(tmp_path, "model", raw)


def test_bool_key_rejects_int(tmp_path):
    raw = demo_raw("model")
    raw["normalize_top_k"] = 1
    assert "'normalize_top_k'" in load_error(tmp_path, "model", raw)


def test_list_key_accepts_one_string_and_rejects_numbers(tmp_path):
    raw = demo_raw("dataset")
    raw["data_params"]["eval_topics"] = "gaming"
    config = load_config("dataset", str(write_config(tmp_path, raw)), [])
    assert config.data_params.eval_topics == ["gaming"]
    raw["data_params"]["eval_topics"] = ["gaming", 3]
    assert "'data_params.eval_topics'" in load_error(tmp_path, "dataset", raw)


@pytest.mark.parametrize(
    "role,key_path,value,allowed",
    [
        ("dataset", ["data_params", "mask_prob"], 1.5, "(0.0, 1.0]"),
        ("dataset", ["data_params", "mask_prob"], -0.1, "(0.0, 1.0]"),
        ("dataset", ["data_params", "mask_prob"], 0.0, "(0.0, 1.0]"),
        ("model", ["n_experts"], 0, ">= 1"),
        ("model", ["seq_len"], 3, ">= 4"),
        ("dataset", ["load_params", "builtin", "n_topics"], 9, "[1, 8]"),
        ("dataset", ["load_params", "builtin", "topic_overlap"], 1.01, "[0.0, 1.0]"),
        ("train", ["warmup_proportion"], 2.0, "[0.0, 1.0]"),
    ],
)
def test_out_of_range_names_key_and_range(tmp_path, role, key_path, value, allowed):
    raw = demo_raw(role)
    node = raw
    for part in key_path[:-1]:
        node = node.setdefault(part, {})
    node[key_path[-1]] = value
    message = load_error(tmp_path, role, raw)
    assert f"'{'.'.join(key_path)}'" in message and allowed in message and repr(value) in message


def test_range_bounds_are_inclusive(tmp_path):
    raw = demo_raw("dataset")
    raw["data_params"]["mask_prob"] = 1.0
    raw["load_params"]["builtin"]["n_topics"] = 8
    config = load_config("dataset", str(write_config(tmp_path, raw)), [])
    assert config.data_params.mask_prob == 1.0 and config.load_params.builtin.n_topics == 8


def test_choices(tmp_path):
    raw = demo_raw("dataset")
    raw["load_params"]["source"] = "ftp"
    message = load_error(tmp_path, "dataset", raw)
    assert "'load_params.source'" in message and "hub, files, builtin" in message and "'ftp'" in message
    raw = demo_raw("train")
    raw["device"] = "tpu"
    assert "auto, cpu, cuda" in load_error(tmp_path, "train", raw)


def test_a_bare_no_means_the_choice_no(tmp_path):
    """YAML 1.1 reads `mixed_precision: no` as false; where "no" is a choice it is taken as that choice."""
    path = tmp_path / "train.yaml"
    path.write_text(
        (CONFIG_DIR / DEMO["train"])
        .read_text(encoding="utf-8")
        .replace("mixed_precision: auto", "mixed_precision: no"),
        encoding="utf-8",
    )
    assert load_config("train", str(path), []).mixed_precision == "no"
    assert load_config("train", DEMO["train"], [parse_override("train.mixed_precision=no")]).mixed_precision == "no"
    raw = demo_raw("train")
    raw["mixed_precision"] = True  # only false maps to a choice; true stays an error
    assert "'mixed_precision'" in load_error(tmp_path, "train", raw)
    raw = demo_raw("dataset")
    raw["load_params"]["source"] = False  # "no" is not among these choices
    assert "'load_params.source'" in load_error(tmp_path, "dataset", raw)


def test_nullable(tmp_path):
    raw = demo_raw("model")
    raw["vocab_size"] = None
    assert load_config("model", str(write_config(tmp_path, raw)), []).vocab_size is None
    raw["embedding_dim"] = None  # not nullable
    assert "'embedding_dim'" in load_error(tmp_path, "model", raw)
    raw = demo_raw("dataset")
    raw["data_params"]["tokenizer_name"] = None
    assert load_config("dataset", str(write_config(tmp_path, raw)), []).data_params.tokenizer_name is None


def test_section_that_is_not_a_mapping(tmp_path):
    raw = demo_raw("dataset")
    raw["load_params"] = "builtin"
    assert "load_params" in load_error(tmp_path, "dataset", raw)


def test_not_yaml_and_not_a_mapping(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("seq_len: [1, 2\n", encoding="utf-8")
    with pytest.raises(PipelineError, match="not valid YAML"):
        load_config("model", str(path), [])
    path.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(PipelineError, match="mapping"):
        load_config("model", str(path), [])


# ---- --set overrides -----------------------------------------------------------------------------


def test_parse_override_values_are_yaml():
    assert parse_override("model.n_experts=8") == ("model", ["n_experts"], 8)
    assert parse_override("model.dropout=0.5") == ("model", ["dropout"], 0.5)
    assert parse_override("model.normalize_top_k=false") == ("model", ["normalize_top_k"], False)
    assert parse_override("model.vocab_size=null") == ("model", ["vocab_size"], None)
    assert parse_override("train.device=cpu") == ("train", ["device"], "cpu")
    assert parse_override("train.save_path=a=b") == ("train", ["save_path"], "a=b")  # split at the first '='
    assert parse_override("dataset.data_params.eval_topics=[a, b]") == (
        "dataset",
        ["data_params", "eval_topics"],
        ["a", "b"],
    )
    assert parse_override("dataset.load_params.builtin.n_docs=5") == (
        "dataset",
        ["load_params", "builtin", "n_docs"],
        5,
    )


@pytest.mark.parametrize(
    "text,expected",
    [
        ("model.n_experts", "expected ROLE.KEY=VALUE"),
        ("optim.lr=1", "ROLE must be one of dataset, model, train"),
        ("model=3", "ROLE must be one of"),
        ("model.n_expert=4", "did you mean 'n_experts'?"),
        ("dataset.load_params.builtin.n_doc=5", "unknown key 'load_params.builtin.n_doc'"),
        ("dataset.load_params.source.x=1", "unknown key 'load_params.source.x'"),
        ("model.seq_len=[1", "not valid YAML"),
    ],
)
def test_parse_override_errors(text, expected):
    with pytest.raises(PipelineError) as caught:
        parse_override(text)
    assert expected in str(caught.value) and f"--set {text}" in str(caught.value)


def test_overrides_apply_to_their_role_and_are_validated():
    overrides = [
        parse_override(text)
        for text in (
            "dataset.load_params.builtin.n_docs=5",
            "dataset.data_params.eval_topics=[cooking]",
            "model.n_experts=8",
        )
    ]
    dataset = load_config("dataset", DEMO["dataset"], overrides)
    assert dataset.load_params.builtin.n_docs == 5
    assert dataset.load_params.builtin.n_topics == 4  # the rest of the nested section is kept
    assert dataset.data_params.eval_topics == ["cooking"]
    assert load_config("model", DEMO["model"], overrides).n_experts == 8
    with pytest.raises(PipelineError) as caught:
        load_config("model", DEMO["model"], [parse_override("model.n_experts=0")])
    assert "(with --set overrides)" in str(caught.value) and "'n_experts'" in str(caught.value)
    with pytest.raises(PipelineError, match="'n_experts'.*'8'"):
        load_config("model", DEMO["model"], [parse_override("model.n_experts='8'")])


def test_override_fills_a_section_the_file_lacks(tmp_path):
    raw = demo_raw("dataset")
    del raw["load_params"]["builtin"]
    path = write_config(tmp_path, raw)
    config = load_config("dataset", str(path), [parse_override("dataset.load_params.builtin.n_docs=7")])
    assert config.load_params.builtin.n_docs == 7 and config.load_params.builtin.n_topics == 4


def test_a_key_unknown_to_all_schemas_is_rejected_even_for_roles_the_step_does_not_read():
    parser = step_parser("step 1", {"dataset": ("--config-name", "dataset_params.yaml")})
    ok = parser.parse_args(
        ["--config-name", DEMO["dataset"], "--set", "train.max_steps=3", "--set", "model.n_experts=2"]
    )
    assert load_step_configs(ok, ["dataset"])["dataset"].seed == 11  # other roles' known keys pass through
    bad = parser.parse_args(["--config-name", DEMO["dataset"], "--set", "train.max_step=3"])
    with pytest.raises(PipelineError, match="did you mean 'max_steps'"):
        load_step_configs(bad, ["dataset"])


def test_every_schema_key_is_reachable_by_set():
    for role, schema in SCHEMAS.items():
        for key in schema:
            if not isinstance(schema[key], dict):
                assert parse_override(f"{role}.{key}=null")[1] == [key]


# ---- config lookup --------------------------------------------------------------------------------


def test_resolve_config_path_prefers_configs_dir(tmp_path, monkeypatch):
    assert resolve_config_path("demo/model_params.yaml") == CONFIG_DIR / "demo" / "model_params.yaml"
    # a file of the same relative name in the working directory loses to configs/
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "model_params.yaml").write_text("seq_len: 1\n", encoding="utf-8")
    (tmp_path / "mine.yaml").write_text("seq_len: 1\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path("demo/model_params.yaml") == CONFIG_DIR / "demo" / "model_params.yaml"
    assert resolve_config_path("mine.yaml") == Path("mine.yaml")  # otherwise taken as a path
    assert resolve_config_path(str(tmp_path / "mine.yaml")) == tmp_path / "mine.yaml"
    with pytest.raises(PipelineError, match="'nope.yaml' not found"):
        resolve_config_path("nope.yaml")
    with pytest.raises(PipelineError, match="is a folder"):
        resolve_config_path("demo")  # a folder is not a config file


ROLE_OF_FILE = {"dataset_params.yaml": "dataset", "model_params.yaml": "model", "train_params.yaml": "train"}
# every step config; configs/corpora/ holds the study's corpus files (tests/test_study.py checks those)
SHIPPED = sorted(
    str(path.relative_to(CONFIG_DIR)) for path in CONFIG_DIR.rglob("*.yaml") if path.parent.name != "corpora"
)


def test_configs_are_shipped():
    assert {
        "dataset_params.yaml",
        "model_params.yaml",
        "train_params.yaml",
        "demo/dataset_params.yaml",
        "demo/model_params.yaml",
        "demo/train_params.yaml",
    } <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_validates(name):
    role = ROLE_OF_FILE[Path(name).name]
    config = load_config(role, name, [])
    # each shipped file spells out every key (the defaults are for older files, not for ours)
    raw = yaml.safe_load((CONFIG_DIR / name).read_text(encoding="utf-8"))

    def missing(schema, node, prefix=""):
        for key, spec in schema.items():
            if key not in node:
                yield prefix + key
            elif isinstance(spec, dict):
                yield from missing(spec, node[key], f"{prefix}{key}.")

    assert list(missing(SCHEMAS[role], raw)) == []
    if role == "model":
        assert config.embedding_dim % config.num_head == 0
        assert config.top_k_experts <= config.n_experts
    if role == "dataset":
        assert not set(config.data_params.eval_topics) & set(config.data_params.train_topics)


def test_demo_configs_are_offline():
    dataset = load_config("dataset", DEMO["dataset"], [])
    assert dataset.load_params.source == "builtin" and dataset.data_params.tokenizer_name is None


def test_model_schema_matches_model_config():
    """Every model key of the schema is a field of MoEEncoderConfig, so step 3 can pass the config through."""
    from models import MoEEncoderConfig

    config = MoEEncoderConfig(**{**load_config("model", DEMO["model"], []), "vocab_size": 100})
    for key in MODEL_SCHEMA:
        if key != "vocab_size":
            assert getattr(config, key) == load_config("model", DEMO["model"], [])[key]


def test_model_schema_and_model_config_share_one_definition():
    """Key for key, the YAML schema has the config class's type, default, range and choices: they cannot drift."""
    import dataclasses

    from models import MoEEncoderConfig
    from models.config_fields import MODEL_FIELDS

    class_fields = {field.name: field for field in dataclasses.fields(MoEEncoderConfig)}
    assert list(MODEL_SCHEMA) == list(MODEL_FIELDS)
    for key, spec in MODEL_SCHEMA.items():
        model_field = MODEL_FIELDS[key]
        assert class_fields[key].default == model_field.default, key
        assert class_fields[key].type == model_field.annotation, key
        assert spec.default == model_field.default or spec.default is REQUIRED and model_field.required, key
        assert (spec.kind, spec.nullable, spec.min, spec.max, spec.min_exclusive, spec.max_exclusive, spec.choices) == (
            model_field.kind,
            model_field.nullable,
            model_field.min,
            model_field.max,
            model_field.min_exclusive,
            model_field.max_exclusive,
            model_field.choices,
        ), key


# router_jitter < 1 keeps the noise factor positive; any capacity_factor > 0 gives an expert one slot (rounded up)
@pytest.mark.parametrize(
    "key,value,allowed",
    [
        ("router_jitter", 0.995, True),
        ("router_jitter", 1.0, False),
        ("router_jitter", -0.1, False),
        ("capacity_factor", 0.005, True),
        ("capacity_factor", 0.0, False),
        ("capacity_factor", None, True),
        ("dropout", 1.0, True),
        ("dropout", 1.5, False),
        ("seq_len", 3, False),
        ("n_shared_experts", -1, False),
        ("router_type", "expert_choice", True),
        ("router_type", "switch", False),
        ("attention", "causal", True),
        ("attention", "sideways", False),
    ],
)
def test_model_schema_and_model_config_accept_the_same_values(tmp_path, key, value, allowed):
    """Both places say yes, or both say no (they disagreed on router_jitter 0.995 and capacity_factor 0.005)."""
    from models import MoEEncoderConfig

    raw = {**demo_raw("model"), key: value}
    try:
        settings = load_config("model", str(write_config(tmp_path, raw)), [])
        loader_allowed = True
    except PipelineError:
        settings, loader_allowed = raw, False
    try:
        MoEEncoderConfig(**{**settings, "vocab_size": 100})
        config_allowed = True
    except ValueError:
        config_allowed = False
    assert loader_allowed == config_allowed == allowed


def test_attention_defaults_to_bidirectional_and_refuses_other_kinds(tmp_path):
    from models import MoEEncoderConfig

    raw = demo_raw("model")
    del raw["attention"]
    assert load_config("model", str(write_config(tmp_path, raw)), [])["attention"] == "bidirectional"
    assert MoEEncoderConfig(vocab_size=100).attention == "bidirectional"
    raw["attention"] = "sideways"
    message = load_error(tmp_path, "model", raw)
    assert "'attention'" in message and "bidirectional, causal" in message and "'sideways'" in message


def test_model_config_names_the_range_it_refuses():
    from models import MoEEncoderConfig

    with pytest.raises(ValueError, match=r"router_jitter must be in \[0.0, 1.0\)"):
        MoEEncoderConfig(vocab_size=100, router_jitter=1.0)


# ---- the scripts' --help ----------------------------------------------------------------------------


@pytest.mark.parametrize("step", [1, 2, 3, 4])
def test_step_help(step, tmp_path):
    result = check_ok(run_step(step, "--help", cwd=tmp_path))
    assert "--set" in result.stdout and "ROLE.KEY=VALUE" in result.stdout
    assert "--config-" in result.stdout
    assert list(tmp_path.iterdir()) == []  # --help writes nothing


def test_step_scripts_exist():
    for step in (1, 2, 3, 4):
        assert STEP_SCRIPTS[step].is_file()
