"""Load a YAML config, apply `--set ROLE.KEY=VALUE` overrides, validate against the schema."""

from __future__ import annotations

import copy
import difflib
import math
import re
from pathlib import Path
from typing import Any

import yaml

from config_utils.errors import PipelineError, first_line
from config_utils.schema import REQUIRED, SCHEMAS, Field

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class ConfigLoader(yaml.SafeLoader):
    """YAML as people write numbers: 1e-3 is a float (YAML 1.1, PyYAML's default, reads it as a string)."""


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _mapping_without_duplicates(loader: ConfigLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """PyYAML keeps the last of two equal keys; a config that says one thing twice is refused instead."""
    seen = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges keys, which is not a duplicate
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key '{key}' (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


ConfigLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def read_yaml(text: str):
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506  a SafeLoader subclass


class ConfigSection(dict):
    """A dict whose keys also read as attributes: `cfg.load_params.source`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def resolve_config_path(name: str) -> Path:
    """A name is looked up in configs/ first, otherwise taken as a path."""
    in_configs = CONFIG_DIR / name
    if in_configs.is_file():
        return in_configs
    path = Path(name)
    if path.is_file():
        return path
    for folder in (path, in_configs):
        if folder.is_dir():
            examples = sorted(item.name for item in folder.glob("*.yaml"))[:3]
            raise PipelineError(
                f"config '{name}' is a folder ({folder}), not a file: pass one of its YAML files"
                + (f" ({', '.join(examples)})" if examples else "")
            )
    raise PipelineError(
        f"config file '{name}' not found in {CONFIG_DIR} or as a path; "
        f"pass a file name from configs/ (e.g. demo/dataset_params.yaml) or a path"
    )


def parse_override(text: str) -> tuple[str, list[str], Any]:
    """'model.n_experts=8' -> ('model', ['n_experts'], 8); the value is parsed as YAML."""
    if "=" not in text:
        raise PipelineError(f"--set {text}: expected ROLE.KEY=VALUE, e.g. --set model.n_experts=8")
    dotted, raw_value = text.split("=", 1)
    role, _, key = dotted.partition(".")
    if role not in SCHEMAS or not key:
        raise PipelineError(
            f"--set {text}: ROLE must be one of {', '.join(SCHEMAS)} followed by .KEY, e.g. --set train.max_steps=20"
        )
    try:
        value = read_yaml(raw_value)
    except yaml.YAMLError:
        raise PipelineError(f"--set {text}: the value '{raw_value}' is not valid YAML") from None
    path = key.split(".")
    _schema_field(SCHEMAS[role], path, where=f"--set {text}")  # reject keys no schema has, at once
    return role, path, value


def _schema_field(schema: dict, path: list[str], where: str) -> Field | dict:
    node: Field | dict = schema
    for depth, part in enumerate(path):
        if not isinstance(node, dict) or part not in node:
            allowed = list(node) if isinstance(node, dict) else []
            close = difflib.get_close_matches(part, allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise PipelineError(
                f"{where}: unknown key '{'.'.join(path[: depth + 1])}'{hint}; "
                f"allowed here: {', '.join(allowed) or 'none'}"
            )
        node = node[part]
    return node


def _check_value(field: Field, value: Any, where: str, key: str) -> Any:
    def fail() -> PipelineError:
        return PipelineError(f"{where}: key '{key}' must be {field.describe()}, got {value!r}")

    if value is None:
        if field.nullable:
            return None
        raise fail()
    if field.kind == "bool":
        if not isinstance(value, bool):
            raise fail()
    elif field.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail()
    elif field.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail()
        value = float(value)
        if not math.isfinite(value):  # .nan and .inf parse as floats; no setting means them
            raise fail()
    elif field.kind == "str":
        if value is False and field.choices and "no" in field.choices:
            value = "no"  # YAML 1.1 reads a bare `no` as false: `mixed_precision: no` means the choice "no"
        if not isinstance(value, str):
            raise fail()
    elif field.kind == "list[str]":
        if isinstance(value, str):
            value = [value]  # a single item is a list of one
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise fail()
        if field.strip:
            value = [item.strip() for item in value]
    if field.choices and value not in field.choices:
        raise fail()
    if field.min is not None and (value < field.min or field.min_exclusive and value == field.min):
        raise fail()
    if field.max is not None and (value > field.max or field.max_exclusive and value == field.max):
        raise fail()
    return value


def validate(schema: dict, raw: Any, where: str, prefix: str = "") -> ConfigSection:
    """Check every key against the schema, fill defaults; one-line PipelineError on the first problem."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PipelineError(
            f"{where}: '{prefix.rstrip('.') or 'the file'}' must be a mapping of keys, got {type(raw).__name__}"
        )
    for key in raw:
        _schema_field(schema, [key], where=where if not prefix else f"{where} in '{prefix.rstrip('.')}'")
    result = ConfigSection()
    for key, spec in schema.items():
        dotted = prefix + key
        if isinstance(spec, dict):
            result[key] = validate(spec, raw.get(key), where, prefix=dotted + ".")
        elif key in raw:
            result[key] = _check_value(spec, raw[key], where, dotted)
        elif spec.default is REQUIRED:
            raise PipelineError(f"{where}: missing key '{dotted}' ({spec.help}); add it, as {spec.describe()}")
        else:
            result[key] = copy.deepcopy(spec.default)
    return result


def load_config(role: str, name: str, overrides: list[tuple[str, list[str], Any]]) -> ConfigSection:
    """Read the YAML file for `role`, apply that role's overrides, validate."""
    path = resolve_config_path(name)
    try:
        raw = read_yaml(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise PipelineError(f"{path}: not valid YAML ({first_line(error, 1000)}); fix the file") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: expected a mapping of keys at the top level")
    for override_role, key_path, value in overrides:
        if override_role != role:
            continue
        node = raw
        for part in key_path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise PipelineError(f"{path}: '{part}' must be a mapping to take --set {role}.{'.'.join(key_path)}")
        node[key_path[-1]] = value
    where = str(path) + (" (with --set overrides)" if any(o[0] == role for o in overrides) else "")
    return validate(SCHEMAS[role], raw, where)
