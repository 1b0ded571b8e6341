"""Print the config reference (every key, type, default, meaning) as Markdown, for docs/config-reference.md.

python -m config_utils.reference
"""

from config_utils.schema import REQUIRED, SCHEMAS, Field

FILES = {"dataset": "dataset_params.yaml", "model": "model_params.yaml", "train": "train_params.yaml"}


def _rows(schema: dict, prefix: str = ""):
    for key, spec in schema.items():
        if isinstance(spec, dict):
            yield from _rows(spec, f"{prefix}{key}.")
        else:
            yield prefix + key, spec


def _default(field: Field) -> str:
    if field.default is REQUIRED:
        return "required"
    return "null" if field.default is None else f"`{field.default}`"


def reference_markdown() -> str:
    lines = []
    for role, schema in SCHEMAS.items():
        lines += [
            f"**`{FILES[role]}`** (`--set {role}.KEY=VALUE`)",
            "",
            "| key | allowed | default | meaning |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| `{key}` | {field.describe()} | {_default(field)} | {field.help} |" for key, field in _rows(schema)
        ]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown())
