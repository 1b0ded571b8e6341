"""Every command the README and docs/ show runs: it names a script that exists, and every --option it passes is one
that script's --help lists. Commands are read from shell code blocks (line continuations joined, comments dropped)
and from inline code that starts with a runner (`python ...`); `--help` runs once per script."""

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

RUNNERS = {"python", "python3", ".venv/bin/python", "torchrun", "accelerate"}
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`([^`]+)`")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=[^\"'\s]*$")  # HF_HUB_OFFLINE=1 before a command
REPO_FILE = re.compile(r"^[\w.-]+(?:/[\w.-]+)+\.(?:py|sh)$")  # a path such as train/train.py in inline code


class Command(NamedTuple):
    where: str  # page:line
    script: str  # a path from the repository root (a module's file for python -m)
    invocation: tuple[str, ...]  # what follows the interpreter: (script,) or ("-m", module)
    options: tuple[str, ...]  # the long options passed to the script, without values


def shell_lines(block: str, first_line: int):
    """(line number, logical line) of a shell block: continuations joined, `# comments` dropped."""
    logical, start = "", first_line
    for number, line in enumerate(block.split("\n"), first_line):
        if not logical:
            start = number
        if line.rstrip().endswith("\\"):
            logical += line.rstrip()[:-1] + " "
            continue
        yield start, logical + line
        logical = ""


def parse(words: list[str], where: str) -> Command | None:
    """A command line's script and long options, or None when it runs no repository script."""
    words = list(words)
    for index, word in enumerate(words):  # a comment ends the command
        if word.startswith("#"):
            words = words[:index]
            break
    while words and ENV_ASSIGNMENT.match(words[0]):
        words = words[1:]
    if not words or words[0] not in RUNNERS:
        return None
    if words[0] in ("torchrun", "accelerate"):  # the launcher's own options come before the script
        position = next((i for i, word in enumerate(words) if word.endswith(".py")), None)
        if position is None:
            return None
        script, invocation, rest = words[position], (words[position],), words[position + 1 :]
    elif len(words) > 2 and words[1] == "-m":
        module = words[2]
        script, invocation, rest = module.replace(".", "/") + ".py", ("-m", module), words[3:]
    elif len(words) > 1:
        script, invocation, rest = words[1], (words[1],), words[2:]
    else:
        return None
    options = []
    for word in rest:
        if word == "--":  # what follows goes to another program
            break
        if word.startswith("--") and not any(mark in word for mark in "<$"):
            options.append(word.split("=", 1)[0])
    return Command(where, script, invocation, tuple(options))


def commands(text: str, page: str) -> list[Command]:
    """Every command of a page: shell code blocks, and inline code that starts with a runner."""
    found = []
    for match in FENCE.finditer(text):
        language, block = match.group(1).strip(), match.group(2)
        if language not in ("", "bash", "sh", "shell", "console"):
            continue  # python, yaml, ...: not a shell command
        first_line = text.count("\n", 0, match.start(2)) + 1
        for number, line in shell_lines(block, first_line):
            command = parse(line.split(), f"{page}:{number}")
            if command:
                found.append(command)
    prose = FENCE.sub(lambda match: "\n" * match.group(0).count("\n"), text)  # keeps line numbers
    for match in INLINE_CODE.finditer(prose):
        if "\n\n" in match.group(1):
            continue
        command = parse(match.group(1).split(), f"{page}:{prose.count(chr(10), 0, match.start()) + 1}")
        if command:
            found.append(command)
    return found


@cache
def help_text(invocation: tuple[str, ...]) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, *invocation, "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, f"{' '.join(invocation)} --help failed:\n{done.stderr[-2000:]}"
    return done.stdout


def accepts(help_: str, option: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", help_) is not None


def exists(command: Command) -> bool:
    return (REPO / command.script).is_file()


def problems(found: list[Command]) -> list[str]:
    """What is wrong with these commands: a script that is missing, an option its --help does not list."""
    wrong = [f"{command.where}: {command.script} does not exist" for command in found if not exists(command)]
    asked = sorted({command.invocation for command in found if command.options and exists(command)})
    with ThreadPoolExecutor(max_workers=2) as pool:  # each --help imports torch: 1-9 s
        helps = dict(zip(asked, pool.map(help_text, asked)))
    for command in found:
        if command.invocation in helps:
            wrong += [
                f"{command.where}: {command.script} does not accept {option}"
                for option in command.options
                if not accepts(helps[command.invocation], option)
            ]
    return wrong


def all_commands() -> list[Command]:
    return [
        command for page in PAGES for command in commands(page.read_text(encoding="utf-8"), str(page.relative_to(REPO)))
    ]


def test_the_docs_show_the_pipeline_and_the_experiments():
    scripts = {command.script for command in all_commands()}
    expected = {
        "data_processors/load_dataset.py",
        "data_processors/dataset.py",
        "train/train.py",
        "inference/inference.py",
        "process_exp_results/experiments/sweep.py",
        "process_exp_results/experiments/study.py",
        "process_exp_results/experiments/compare_runs.py",
        "process_exp_results/experiments/known_structure.py",
        "benchmarks/bench_train.py",
        "config_utils/reference.py",
    }
    assert expected <= scripts, f"no command found for {sorted(expected - scripts)}"


def test_every_command_runs_a_script_that_exists_with_options_it_accepts():
    wrong = problems(all_commands())
    assert not wrong, "\n".join(wrong)


def test_every_script_named_in_inline_code_exists():
    missing = []
    for page in PAGES:
        for match in INLINE_CODE.finditer(FENCE.sub("", page.read_text(encoding="utf-8"))):
            missing += [
                f"{page.name}: {word}"
                for word in match.group(1).split()
                if REPO_FILE.match(word) and not (REPO / word).is_file()
            ]
    assert not missing, "\n".join(missing)


def test_commands_are_read_as_the_shell_reads_them():
    text = (
        "Run `python train/train.py --tag <tag> --resume latest` or `python -m config_utils.reference`; not `pip`.\n"
        "```\n"
        "HF_HUB_OFFLINE=1 python data_processors/dataset.py --config-dataset demo/d.yaml \\\n"
        "    --config-model=m.yaml --set dataset.seed=1   # a comment --not-an-option\n"
        'SETS="--set a=1\n'
        '      --set b=2"\n'
        "torchrun --standalone --nproc_per_node=2 train/train.py $C --tag demo -- --after-separator\n"
        "make demo\n"
        "```\n"
        "```python\n"
        "python = 1  # python code, not a command --no\n"
        "```\n"
    )
    assert [tuple(command) for command in commands(text, "scratch.md")] == [
        ("scratch.md:3", "data_processors/dataset.py", ("data_processors/dataset.py",),
         ("--config-dataset", "--config-model", "--set")),
        ("scratch.md:7", "train/train.py", ("train/train.py",), ("--tag",)),
        ("scratch.md:1", "train/train.py", ("train/train.py",), ("--tag", "--resume")),
        ("scratch.md:1", "config_utils/reference.py", ("-m", "config_utils.reference"), ()),
    ]  # fmt: skip


def test_the_check_finds_a_moved_script_and_an_unknown_option():
    text = (
        "```\n"
        "python process_exp_results/sweep.py --grid model.seq_len=[64]\n"
        "python process_exp_results/experiments/sweep.py --grid model.seq_len=[64] --no-such-option \\\n"
        "    --dry-run\n"
        "```\n"
    )
    assert problems(commands(text, "scratch.md")) == [
        "scratch.md:2: process_exp_results/sweep.py does not exist",
        "scratch.md:3: process_exp_results/experiments/sweep.py does not accept --no-such-option",
    ]
