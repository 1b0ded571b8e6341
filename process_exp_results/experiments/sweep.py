r"""Run a grid of pipeline runs from --set overrides, without writing a config file per run.

Every combination of the --grid values runs steps 1-4 as subprocesses, with the --set options common to all.
Steps 1 and 2 run once per distinct input: each combination gets its data folders under the sweep folder
(data/processed/<tag>, data/masked/<tag>, tagged by the grid keys those steps depend on), and combinations
that agree on those settings share them. A failing run is reported and the sweep goes on. Writes into the
sweep folder: sweep.json (the manifest: every run, its overrides, status and folders, rewritten after each
run), runs/<tag>/ (step 3), results/<tag>/ (step 4: metrics.csv, routing_stats.json, ...), logs/. Example:
    python process_exp_results/experiments/sweep.py --config-dataset demo/dataset_params.yaml \
        --config-model demo/model_params.yaml --config-train demo/train_params.yaml \
        --grid model.seq_len=[64,128] --grid dataset.data_params.mask_prob=[0.05,0.15] \
        --set train.max_steps=200 --results process_exp_results/sweeps/seq_mask
    python process_exp_results/experiments/compare_runs.py process_exp_results/sweeps/seq_mask
A run whose results/<tag>/metrics.csv exists is skipped unless it failed last time (rerun a sweep to finish it) or
its manifests record other settings, data or training than planned now (then it is redone);
a run trained with the same settings is not trained again, and an interrupted training continues from its newest
checkpoint if that was made with the same settings (otherwise the run starts afresh); --overwrite redoes all.
"""

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[2])  # run as a script: import the project, not this folder

import argparse
import itertools
import json
import os
import re
import shlex
import subprocess
import time

import yaml

from config_utils import PipelineError, load_config, run_step, step_parser, write_json_atomic
from config_utils.config import parse_override
from config_utils.contracts import (
    AFTER_TRAINING,
    MODEL_DIR,
    NOT_CONTENT_KEYS,
    RESUMABLE_CHANGES,
    STATE_FILE,
    STEP2_ONLY_KEYS,
    STEP_SCRIPTS,
    WEIGHTS_FILE,
    checkpoint_folder,
    dataset_settings,
    same_families,
    step_script,
)
from config_utils.io import FILE_HASHES, current_manifest_hash
from config_utils.schema import recorded_setting
from config_utils.topic_map import coarse_topics, read_topic_map

SCRIPTS = {step: step_script(step) for step in STEP_SCRIPTS}
MANIFEST = "sweep.json"
# the sweep places these itself, per combination
PLACED_KEYS = {"dataset.data_params.processed_dir", "dataset.data_params.masked_dir", "train.save_path"}


def parse_grid(text: str) -> tuple[str, list]:
    """'model.seq_len=[64,128]' -> ('model.seq_len', [64, 128]); each value is checked like a --set."""
    if "=" not in text:
        raise PipelineError(f"--grid {text}: expected ROLE.KEY=[V1,V2,...], e.g. --grid model.seq_len=[64,128]")
    key, raw = text.split("=", 1)
    values = yaml.safe_load(raw) if raw.strip() else None
    if not isinstance(values, list) or not values:
        raise PipelineError(f"--grid {text}: the values must be a non-empty YAML list, e.g. {key}=[1,2]")
    if key in PLACED_KEYS:
        raise PipelineError(f"--grid {text}: the sweep sets {key} itself, per run")
    for value in values:
        parse_override(f"{key}={format_value(value)}")  # unknown keys fail here, before anything runs
    return key, values


def format_value(value) -> str:
    """A value as YAML text for --set (round-trips: 0.1 -> '0.1', [a,b] -> '[a, b]', None -> 'null')."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...").strip()


def short_names(keys: list[str]) -> dict[str, str]:
    """The last part of each key (seq_len, mask_prob), or the whole key where two would read the same."""
    last = {key: key.rsplit(".", 1)[-1] for key in keys}
    return {key: name if list(last.values()).count(name) == 1 else key for key, name in last.items()}


def make_tag(assignment: dict, names: dict[str, str]) -> str:
    """seq_len-64__mask_prob-0.05: KEY-VALUE pairs joined by '__', only letters, digits, '.', '-' and '_'
    (step 3's rule for a tag: it names a folder and an Aim run)."""
    text = "__".join(f"{names[key]}-{format_value(value)}" for key, value in assignment.items())
    return re.sub(r"[^A-Za-z0-9._-]", "_", text) or "default"


def combinations(grid: dict[str, list]) -> list[dict]:
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def data_tag(assignment: dict, names: dict[str, str], step: int) -> str:
    """Names the data folder of step 1 or 2 by the grid keys that step's output depends on."""

    def matters(key: str) -> bool:
        role, _, inner = key.partition(".")
        if role == "dataset":
            return inner not in NOT_CONTENT_KEYS and (step == 2 or inner not in STEP2_ONLY_KEYS)
        return step == 2 and key == "model.seq_len"

    relevant = {key: value for key, value in assignment.items() if matters(key)}
    return make_tag(relevant, names) if relevant else "shared"


def plan_runs(
    args: argparse.Namespace, assignments: list[dict], sweep_dir: Path, tags: list[str] | None = None
) -> list[dict]:
    """One entry per assignment ({ROLE.KEY: value}): its overrides, tag and folders; every config validated now.
    args: config_dataset, config_model, config_train and overrides (the --set texts common to all runs)."""
    names = short_names(list(dict.fromkeys(key for assignment in assignments for key in assignment)))
    runs = []
    for number, assignment in enumerate(assignments):
        tag = tags[number] if tags else make_tag(assignment, names)
        processed = sweep_dir / "data" / "processed" / data_tag(assignment, names, 1)
        masked = sweep_dir / "data" / "masked" / data_tag(assignment, names, 2)
        overrides = (
            list(args.overrides)
            + [f"{key}={format_value(value)}" for key, value in assignment.items()]
            + [
                f"dataset.data_params.processed_dir={processed}",
                f"dataset.data_params.masked_dir={masked}",
                f"train.save_path={sweep_dir / 'runs'}",
            ]
        )
        parsed = [parse_override(text) for text in overrides]
        configs = {
            role: load_config(role, getattr(args, f"config_{role}"), parsed) for role in ("dataset", "model", "train")
        }  # a bad combination stops the sweep before it starts
        runs.append(
            {
                "tag": tag,
                "grid": assignment,
                "overrides": overrides,
                "processed_dir": str(processed),
                "masked_dir": str(masked),
                "run_dir": str(sweep_dir / "runs" / tag),
                "results_dir": str(sweep_dir / "results" / tag),
                "run_settings": json.loads(json.dumps({role: configs[role] for role in ("model", "train")})),
                "data_settings": {
                    1: dataset_settings(configs["dataset"], 1),
                    2: {**dataset_settings(configs["dataset"], 2), "model.seq_len": configs["model"]["seq_len"]},
                },
                "status": "planned",
            }
        )
    tags = [run["tag"] for run in runs]
    if len(set(tags)) != len(tags):
        raise PipelineError("two grid combinations got the same tag; give the grid values distinct spellings")
    for step, key in ((1, "processed_dir"), (2, "masked_dir")):  # same folder must mean same settings
        seen: dict[str, dict] = {}
        for run in runs:
            if seen.setdefault(run[key], run["data_settings"][step]) != run["data_settings"][step]:
                raise PipelineError(f"internal: {run[key]} would hold two different datasets")
    return runs


def same_training(saved: dict, planned: dict, ignored_train: set = RESUMABLE_CHANGES) -> bool:
    """A run's recorded model and train configs compute what the planned ones would (keys that do not change the
    result aside, as train/checkpoints.py allows on resume; the vocabulary size is step 2's, checked by step 4)."""
    for role, ignored in (("model", {"vocab_size"}), ("train", ignored_train)):
        if role not in saved:  # step 4's manifest records the train settings, not the model's
            continue
        for key, value in planned[role].items():
            if key not in ignored and recorded_setting(role, key, saved[role], value) != value:
                return False
    return True


def read_record(path: Path) -> dict:
    """A step 3 or 4 manifest, or a checkpoint's trainer_state.json."""
    return json.loads(path.read_text(encoding="utf-8"))


def planned_families(record: dict, run: dict) -> dict | None:
    """The families the planned train.router_topic_map gives the topics the record's routers were told (None: no
    map, or a map that no longer covers them)."""
    told = (record.get("router_supervision") or {}).get("family_of_topic") or {}
    topic_map = run["run_settings"]["train"].get("router_topic_map")
    if not topic_map or not told:
        return None
    try:
        return coarse_topics(told, read_topic_map(Path(topic_map), "train.router_topic_map"), topic_map)
    except PipelineError:
        return None


def same_data(record: dict, run: dict) -> bool:
    """The record was made from the data the run's folders hold, or will hold: a folder made with other settings is
    remade, and with it what was made from it. A folder not there cannot tell (steps 3 and 4 check the chain)."""
    for step, key in ((1, "processed_dir"), (2, "masked_dir")):
        made = (Path(run[key]) / "manifest.json").is_file()
        if made and not data_is_current(step, run[key], run["data_settings"][step]):
            return False
    now = current_manifest_hash(run["masked_dir"])
    return now is None or record.get("input_manifest_hash") in (None, now)


def recorded_weights(run: dict, checkpoint_step: int | None) -> str | None:
    """The SHA-256 the run's final model (its manifest) or its checkpoint at checkpoint_step (trainer_state.json)
    records of its weights now: a step 4 that evaluated other weights is stale."""
    if checkpoint_step is None:
        path, name = Path(run["run_dir"]) / "manifest.json", f"{MODEL_DIR}/{WEIGHTS_FILE}"
    else:
        path, name = checkpoint_folder(Path(run["run_dir"]), checkpoint_step) / STATE_FILE, WEIGHTS_FILE
    try:
        return read_record(path).get(FILE_HASHES, {}).get(name)
    except (OSError, ValueError):
        return None


def made_as_planned(record: dict, run: dict, ignored_train: set = RESUMABLE_CHANGES) -> bool:
    """A step 3 or 4 record computes what the planned run would: the same model and train settings, data, and
    families told to its routers; a step 4 also evaluated the weights the run holds now."""
    config = record.get("config") or {}
    if not same_training(config, run["run_settings"], ignored_train) or not same_data(record, run):
        return False
    if "weights_sha256" in record:  # step 4 (written before it recorded this: by its settings alone)
        now = recorded_weights(run, record.get("checkpoint_step"))  # None: gone, and cannot tell
        return now is None or record["weights_sha256"] == now
    topic_map = run["run_settings"]["train"].get("router_topic_map")
    return same_families(record, topic_map, planned_families(record, run))


def trained_alike(run: dict) -> bool:
    """Step 3 finished this run (its manifest, written last, is there) as planned."""
    manifest = Path(run["run_dir"]) / "manifest.json"
    if not (Path(run["run_dir"]) / MODEL_DIR).is_dir() or not manifest.is_file():
        return False
    return made_as_planned(read_record(manifest), run)


def recorded_otherwise(manifest: Path, run: dict) -> bool:
    """A finished step 3 or 4 whose manifest records another making than the planned one (the arm, its data or its
    training changed since): its outputs are stale, and redone."""
    if not manifest.is_file():
        return False
    return not made_as_planned(read_record(manifest), run)


def resumable(run: dict) -> bool:
    """The run's newest complete checkpoint (trainer_state.json is written into it last) was made as planned, but for
    what acts after training (a finished run whose refit changed continues from its final checkpoint)."""
    states = sorted(Path(run["run_dir"]).glob("checkpoints/step-*/trainer_state.json"))
    if not states:
        return False
    return made_as_planned(read_record(states[-1]), run, RESUMABLE_CHANGES | AFTER_TRAINING)


def step_command(step: int, args: argparse.Namespace, run: dict, sweep_dir: Path) -> list[str]:
    configs = {
        1: ["--config-name", args.config_dataset],
        2: ["--config-dataset", args.config_dataset, "--config-model", args.config_model],
    }.get(
        step,
        [
            "--config-dataset",
            args.config_dataset,
            "--config-model",
            args.config_model,
            "--config-train",
            args.config_train,
        ],
    )
    command = [sys.executable, str(SCRIPTS[step]), *configs]
    for text in run["overrides"]:
        command += ["--set", text]
    if step == 3:
        # an interrupted run continues from its newest checkpoint if made with these settings; else it is redone
        resume = not args.overwrite and resumable(run)
        command += ["--tag", run["tag"], *(["--resume", "latest"] if resume else ["--overwrite"])]
    if step == 4:
        command += ["--run", run["tag"], "--save_path", str(sweep_dir / "results"), *getattr(args, "step4_options", [])]
    return command


def run_logged(command: list[str], log_path: Path) -> tuple[bool, str]:
    """Run one step; its output goes to log_path. (ok, the last error line)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code == 0:
        return True, ""
    lines = [
        line.strip()
        for line in re.split(r"[\r\n]", log_path.read_text(encoding="utf-8", errors="replace"))
        if line.strip()
    ]
    errors = [line for line in lines if line.startswith("error:")]
    return False, f"exit {code}: " + (errors[-1] if errors else (lines[-1] if lines else "no output"))


def data_is_current(step: int, folder: str, settings: dict) -> bool:
    """A data folder left by an earlier invocation can be reused when it was made with these settings."""
    try:
        manifest = json.loads((Path(folder) / "manifest.json").read_text(encoding="utf-8"))
        found = (
            dataset_settings(manifest["config"], 1)
            if step == 1
            else {**manifest["dataset_settings"], "model.seq_len": manifest["seq_len"]}
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return found == json.loads(json.dumps(settings))


def save_manifest(sweep_dir: Path, manifest: dict, runs: list[dict]) -> None:
    """sweep.json as it stands: the manifest with each run's current state (less its data settings)."""
    write_json_atomic(
        sweep_dir / MANIFEST,
        {
            **manifest,
            "runs": [{key: value for key, value in run.items() if not key.endswith("_settings")} for run in runs],
        },
    )


def step_log(sweep_dir: Path, run: dict, step: int, folder: str | None) -> Path:
    """A step's log: named after its data folder for steps 1 and 2 (shared by runs), after the run otherwise."""
    name = f"{Path(folder).parent.name}-{Path(folder).name}" if folder else run["tag"]
    return sweep_dir / "logs" / f"{name}.step{step}.log"


def run_steps(args: argparse.Namespace, run: dict, sweep_dir: Path, data_status: dict[str, str]) -> None:
    """Steps 1-4 of one run, up to the first failure (recorded in run). A data folder made or failed for an
    earlier run, or left current by an earlier invocation, is not made again; data_status records each outcome."""
    run["status"], run["error"], run["trained_earlier"] = "ok", None, False
    for step in (1, 2, 3, 4):
        folder = {1: run["processed_dir"], 2: run["masked_dir"]}.get(step)
        log = step_log(sweep_dir, run, step, folder)
        if folder is not None and folder in data_status:  # made (or failed) for an earlier run
            ok, error = not data_status[folder], data_status[folder]
        elif folder is not None and not args.overwrite and data_is_current(step, folder, run["data_settings"][step]):
            ok, error = True, ""  # made by an earlier invocation of this sweep, with the same settings
        elif step == 3 and not args.overwrite and trained_alike(run):
            ok, error = True, ""  # trained by an earlier invocation that stopped before its step 4 finished
            run["trained_earlier"] = True  # its training time is not in this invocation's seconds
        else:
            print(f"  step {step} ...", flush=True)
            ok, error = run_logged(step_command(step, args, run, sweep_dir), log)
        if folder is not None:
            data_status[folder] = error
        if not ok:
            run["status"], run["failed_step"], run["error"], run["log"] = "failed", step, error, str(log)
            print(f"  FAILED at step {step}: {error} (log: {log})", file=sys.stderr)
            break


def print_outcome(runs: list[dict], sweep_dir: Path) -> list[dict]:
    """The table of runs (results folder, or the error of a failed run) and the manifest's path; returns the failed."""
    failed = [run for run in runs if run["status"] == "failed"]
    print(f"\n{'run':<40}{'status':<14}results")
    for run in runs:
        print(f"{run['tag']:<40}{run['status']:<14}{run['results_dir'] if run['status'] != 'failed' else run['error']}")
    print(f"manifest: {sweep_dir / MANIFEST}")
    if failed:
        print(f"{len(failed)} of {len(runs)} run(s) failed", file=sys.stderr)
    return failed


def earlier_runs(sweep_dir: Path) -> dict[str, dict]:
    """tag -> run, from the sweep.json an earlier invocation left (nothing if there is none)."""
    try:
        return {run["tag"]: run for run in json.loads((sweep_dir / MANIFEST).read_text(encoding="utf-8"))["runs"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def execute(args: argparse.Namespace, runs: list[dict], sweep_dir: Path, extra: dict, after_run=None) -> list[dict]:
    """Run steps 1-4 for every planned run, going on past failures; write sweep.json; return the failed runs.
    args also needs `overwrite`; extra: more manifest keys (e.g. the grid); after_run(run): called after each run
    that finished, now or earlier (the study's extra step 4 on it)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    manifest = {
        "sweep": sweep_dir.name,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "configs": {"dataset": args.config_dataset, "model": args.config_model, "train": args.config_train},
        **extra,
        "sets": list(args.overrides),
        "runs": runs,
    }
    data_status: dict[str, str] = {}  # data folder -> "" (made) or why it failed
    earlier = earlier_runs(sweep_dir)
    for number, run in enumerate(runs, 1):
        started = time.perf_counter()
        results = Path(run["results_dir"])
        before = earlier.get(run["tag"], {})
        # a run that failed last time may have left an older run's results, a changed arm stale ones: both are redone
        stale = any(recorded_otherwise(folder / "manifest.json", run) for folder in (Path(run["run_dir"]), results))
        if (
            (results / "metrics.csv").is_file()
            and not args.overwrite
            and before.get("status") != "failed"
            and not stale
        ):
            run["status"] = "done earlier"
            if before.get("seconds") is not None:  # the time it took when it ran
                run["seconds"], run["trained_earlier"] = before["seconds"], before.get("trained_earlier", False)
            print(f"[{number}/{len(runs)}] {run['tag']}: done earlier ({results})")
        else:
            print(
                f"[{number}/{len(runs)}] {run['tag']}" + (": made with other settings than planned, redone" * stale),
                flush=True,
            )
            run_steps(args, run, sweep_dir, data_status)
            run["seconds"] = round(time.perf_counter() - started, 1)
            save_manifest(sweep_dir, manifest, runs)
        if after_run is not None and run["status"] != "failed":
            after_run(run)
    save_manifest(sweep_dir, manifest, runs)
    return print_outcome(runs, sweep_dir)


def main() -> None:
    parser = step_parser(
        __doc__,
        {
            "dataset": ("--config-dataset", "dataset_params.yaml"),
            "model": ("--config-model", "model_params.yaml"),
            "train": ("--config-train", "train_params.yaml"),
        },
    )
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="ROLE.KEY=[V1,V2,...]",
        help="a key and its values, repeatable: every combination is one run",
    )
    parser.add_argument(
        "--results",
        default=None,
        metavar="DIR",
        help="the sweep folder; default process_exp_results/sweeps/<timestamp>",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--overwrite", action="store_true", help="redo finished runs and their data")
    args = parser.parse_args()
    for text in args.overrides:
        parse_override(text)
        if text.split("=", 1)[0] in PLACED_KEYS:
            raise PipelineError(f"--set {text}: the sweep sets {text.split('=', 1)[0]} itself, per run")
    grid = dict(parse_grid(text) for text in args.grid)
    sweep_dir = Path(args.results or f"process_exp_results/sweeps/{time.strftime('sweep-%Y%m%d-%H%M%S')}")
    runs = plan_runs(args, combinations(grid), sweep_dir)
    print(
        f"sweep {sweep_dir}: {len(runs)} run(s), "
        f"{len({run['processed_dir'] for run in runs})} step-1 and {len({run['masked_dir'] for run in runs})} "
        f"step-2 dataset(s)"
    )

    if args.dry_run:
        done: set[str] = set()
        for run in runs:
            print(f"# {run['tag']}")
            for step, folder in ((1, run["processed_dir"]), (2, run["masked_dir"]), (3, None), (4, None)):
                if folder in done:  # made for an earlier run: shared
                    continue
                print(shlex.join(step_command(step, args, run, sweep_dir)))
                if folder is not None:
                    done.add(folder)
        return

    failed = execute(args, runs, sweep_dir, {"grid": grid})
    print(f"next: python process_exp_results/experiments/compare_runs.py {sweep_dir}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    run_step(main)
