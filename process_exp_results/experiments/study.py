r"""The earlier study, redone: its five masking configurations and its defects as an arm, on real text, with seeds;
and (--profile learned) the same question asked of a model that learned.

Profile early (the default; the earlier study's scale: width 128, 4 experts, 400 steps). Arms (each trained with
--seeds seeds, train.random_seed 0..N-1; one seed's data are every seed's data):
  seq64_mask0.15            seq_len 64, mask 0.15 (the reference arm: its test split is the common set)
  seq64_mask0.05            seq_len 64, mask 0.05
  seq128_mask0.10           seq_len 128, mask 0.10
  seq128_mask0.30           seq_len 128, mask 0.30
  seq64_mask0.15_balanced   seq_len 64, mask 0.15, train/valid/test balanced over the corpus's main topics
                            (data_params.train_topics), with the reference arm's tokenizer
  seed_replica              seq_len 64, mask 0.15 with the earlier model's defects: causal attention, a router
                            left at its initialisation (train.freeze_router: it never received a gradient) and no
                            balancing loss
Profile learned (width 256, 8 experts, seq_len 128, 4,000 steps with dynamic masking; seen design). Arms:
  moe_top1                  the reference: top-1 MoE
  supervised_router         each router trained to send family f of the corpus's coarse_topics to expert f mod E
                            (without families: topic t to expert t mod E), then fitted alone to that target on the
                            final representation for half as many steps again; judged at that granularity: the
                            power check (its index must be high, or the index or the control is wrong)
  frozen_router             routers left at their random init: how often a router that learned nothing clears 0
  dense_equal_active        one FFN as wide as one expert: the reference's active parameters without experts
  moe_top2                  top-2 MoE
  seed_replica              the earlier model's defects, as above
  Right after each reference and supervised run, step 4 on it at the corpus's coarse_topics
  (results_coarse/<tag>@families/) and, for the reference's seed 0, at its checkpoints from 12.5%, 25% and 50% of
  its steps (emergence/: does specialization appear as the model learns?); <corpus>-<design>_emergence.png draws them (learned.py). A stopped study resumes: finished
  runs are kept, an interrupted training continues from its newest checkpoint. Runs go seed-major in both
  profiles: a study stopped early has every arm once before any twice.
Designs (early profile): `seen` (every topic in training; step 4 on the test split) runs every arm; `held_out` (two topics held out
by step 1, step 4 pooling them with the test split's: the earlier study's design, where topic and unfamiliar text
mix) runs the reference arm and seed_replica. Corpora are YAML files (experiments/corpora.py): configs/corpora/ has
reddit (../shared/data/reddit_sample, topic = subreddit), agnews, 20newsgroups and builtin (offline, synthetic; what
--quick uses); --corpus takes one of those names or a file of your own.

The masking comparison is on one common evaluation set per corpus and design: the reference arm's step-2 test
split (the same documents, cut to 64 tokens, masked once at 0.15 with the dataset seed). The masking arms and
seed_replica share its split, so none trained on it; the balanced arm's own split holds many of its documents, so
it and the reference arm are also scored on the documents neither trained on, and compared there
(common_eval.json in each results folder; study_summary.py). Each corpus and design is one sweep folder (sweep.py:
resumable, a failed run is reported and the rest go on; rerun the command to finish), compared by compare_runs.py
(comparison.md / .csv / .png, and arms.md / arms.png: each arm over its seeds). Writes study.md (the arm tables of
every corpus and design), study.json, study_loss.png and study_index.png into --out.
    python process_exp_results/experiments/study.py --jobs 2 --out process_exp_results/study         # reddit and agnews
    python process_exp_results/experiments/study.py --quick --jobs 2 --out process_exp_results/study_quick   # builtin, 1 seed
    python process_exp_results/experiments/study.py --profile learned --corpus 20newsgroups --seeds 2
Extra --set options apply to every run, after the study's own sizes (e.g. --set train.max_steps=800).
"""

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[2])  # run as a script: import the project, not this folder

import argparse
import contextlib
import functools
import io
import json
import os
import shlex
import subprocess
import time

from config_utils import PipelineError, run_step, write_json_atomic, write_text_atomic
from config_utils.cli import HelpFormatter, add_set_option
from config_utils.config import parse_override
from process_exp_results.experiments import learned, study_summary
from process_exp_results.experiments.corpora import check_named_topics, load_corpus
from process_exp_results.experiments.study_summary import BALANCED_ARM, LEARNED_REFERENCE_ARM, REFERENCE_ARM
from process_exp_results.experiments.sweep import PLACED_KEYS, execute, plan_runs

REPO = Path(__file__).resolve().parents[2]


def _masking(seq_len: int, mask_prob: float) -> dict:
    return {"model.seq_len": seq_len, "dataset.data_params.mask_prob": mask_prob}


# the earlier study's defects: causal attention, a router that never received a gradient, no balancing loss
DEFECTS = {"model.attention": "causal", "train.freeze_router": True, "model.load_balance_coef": 0.0}
EARLY_ARMS = {
    REFERENCE_ARM: _masking(64, 0.15),
    "seq64_mask0.05": _masking(64, 0.05),
    "seq128_mask0.10": _masking(128, 0.10),
    "seq128_mask0.30": _masking(128, 0.30),
    BALANCED_ARM: _masking(64, 0.15),  # + the corpus's train_topics and the reference arm's tokenizer
    "seed_replica": {**_masking(64, 0.15), **DEFECTS},
}
# the learned profile asks what routing a model that learned does, against its controls (the reference arm first)
LEARNED_ARMS = {
    LEARNED_REFERENCE_ARM: {},
    learned.SUPERVISED_ARM: {
        "train.router_supervision": "topic"
    },  # the power check (by family where the corpus has them)
    learned.FROZEN_ARM: {"train.freeze_router": True},  # a router that learned nothing: the false clearances
    "dense_equal_active": {"model.n_experts": 1},  # one FFN as wide as one expert: the reference's active parameters
    "moe_top2": {"model.top_k_experts": 2},
    "seed_replica": DEFECTS,
}
# the documented CPU scale: the demo model with 4 experts, 400 steps of 32 sequences
SCALE = {
    "model.embedding_dim": 128,
    "model.num_head": 4,
    "model.n_encoder_blocks": 2,
    "model.n_experts": 4,
    "model.top_k_experts": 1,
    "model.moe_dim": 256,
    "train.max_steps": 400,
    "train.batch_size": 32,
    "train.learning_rate": 1e-3,
    "train.eval_steps": 50,  # a routing snapshot per evaluation: the saturation curve
    "train.eval_batches": 4,
    "train.save_steps": 400,
    "train.keep_checkpoints": 1,
    "train.device": "cpu",
    "dataset.data_params.num_proc": 1,
}
QUICK_SCALE = {
    **SCALE,
    "model.embedding_dim": 64,
    "model.num_head": 2,
    "model.moe_dim": 128,
    "train.max_steps": 40,
    "train.learning_rate": 3e-3,
    "train.eval_steps": 20,
    "train.eval_batches": 2,
    "train.save_steps": 40,
}
# chosen on 20 Newsgroups (docs/results.md): width 256 learns far more per CPU-second than 128 and runs in bf16;
# 4,000 steps of 32 sequences, the learning rate falling linearly to 0 (cosine settles routing more but learns less);
# a checkpoint every 1/8 of the steps, all kept (128 MB each): step 4 at 12.5, 25, 50, 100% is the emergence curve
LEARNED_SCALE = {
    **SCALE,
    "model.embedding_dim": 256,
    "model.moe_dim": 1024,
    "model.n_experts": 8,
    "model.seq_len": 128,
    "dataset.data_params.mask_prob": 0.15,
    "train.max_steps": 4000,
    "train.eval_steps": 250,
    "train.eval_batches": 8,
    "train.save_steps": 500,
    "train.keep_checkpoints": 8,  # all 8 regular ones (pruning takes those interruptions wrote first)
    "train.masking": "dynamic",  # re-masked every epoch: the 12,000 posts are seen about 10 times
    "train.mixed_precision": "auto",
    "train.log_steps": 10,
}
QUICK_LEARNED_SCALE = {
    **QUICK_SCALE,
    "model.n_experts": 4,
    "train.eval_steps": 5,  # a routing snapshot at every checkpoint
    "train.save_steps": 5,
    "train.keep_checkpoints": 8,
}
PROFILES = {
    "early": {"arms": EARLY_ARMS, "designs": {"seen": list(EARLY_ARMS), "held_out": [REFERENCE_ARM, "seed_replica"]}},
    "learned": {"arms": LEARNED_ARMS, "designs": {"seen": list(LEARNED_ARMS)}},
}
ARMS = {**EARLY_ARMS, **LEARNED_ARMS}  # every arm of either profile, by name
QUICK_STEP4 = ["--n-random-routers", "8"]  # the references' cost is per random router


def design_arms(args: argparse.Namespace, design: str) -> list[str]:
    """The design's arms (its reference arm first), less those --arms leaves out."""
    return [arm for arm in PROFILES[args.profile]["designs"][design] if args.arms is None or arm in args.arms]


def reference_arm(args: argparse.Namespace, design: str) -> str:
    """The arm every other is compared with: the design's first (--arms must keep it)."""
    return PROFILES[args.profile]["designs"][design][0]


def run_scale(args: argparse.Namespace) -> dict:
    """The profile's sizes with the user's --set texts over them: what every run trains with."""
    return {**profile_scale(args), **dict(parse_override_pair(text) for text in args.overrides)}


def emergence_steps_of(args: argparse.Namespace) -> list[int]:
    """The checkpoint steps step 4 reads for the emergence curve (none when training is not set in steps)."""
    scale = run_scale(args)
    if not scale.get("train.max_steps") or not scale.get("train.save_steps"):
        return []
    return learned.emergence_steps(int(scale["train.max_steps"]), int(scale["train.save_steps"]))


def parse_override_pair(text: str) -> tuple[str, object]:
    role, path, value = parse_override(text)
    return ".".join([role, *path]), value


def profile_scale(args: argparse.Namespace) -> dict:
    if args.profile == "learned":
        return QUICK_LEARNED_SCALE if args.quick else LEARNED_SCALE
    return QUICK_SCALE if args.quick else SCALE


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--out", default=None, metavar="DIR", help="default process_exp_results/study[_learned][_quick]"
    )
    parser.add_argument(
        "--corpus",
        action="append",
        metavar="NAME_OR_FILE",
        help="a corpus file (configs/corpora/*.yaml: source, fields, sizes, held-out and balanced topics) or the name "
        "of one there (reddit, agnews, 20newsgroups, builtin); repeat for several; default reddit and agnews "
        "(--quick: builtin)",
    )
    parser.add_argument(
        "--profile",
        choices=list(PROFILES),
        default="early",
        help="early: the earlier study's scale and masking arms (models that learned little); learned: a model that "
        "learns (width 256, 8 experts, 4,000 steps) with the reference, supervised, frozen, dense, top-2 and "
        "seed_replica arms, and step 4 along the reference's training",
    )
    parser.add_argument(
        "--designs", default=None, help="comma-separated subset of seen, held_out (default: all of the profile's)"
    )
    parser.add_argument(
        "--arms",
        default=None,
        help="comma-separated subset of the profile's arms, its reference arm among them (default: all of them)",
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds per arm (default 3; learned 2; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="builtin corpus, one seed, a smaller model, 40 steps")
    parser.add_argument("--n-boot", type=int, default=None, help="step 4: bootstrap resamples (default 200; quick 50)")
    parser.add_argument("--n-perm", type=int, default=None, help="step 4: permutations (default 200; quick 50)")
    add_set_option(parser, "Applied after the study's own sizes.")
    parser.add_argument("--overwrite", action="store_true", help="redo finished runs")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: rebuild study.md, study.json and the figures from the runs finished so far (a study "
        "that is still running or was stopped; its unfinished runs are listed)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="corpus-design sweeps run at once, each a worker process with cores/JOBS threads (2 on 2 cores: small "
        "models use one core poorly, and the steps' start-up overlaps)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # run the sweeps, no summary
    args = parser.parse_args()
    names = args.corpus or (["builtin"] if args.quick else ["reddit", "agnews"])
    args.corpora = {}
    for corpus in map(load_corpus, names):
        if corpus.name in args.corpora:
            raise PipelineError(f"--corpus {corpus.path}: a second corpus named {corpus.name!r}; rename one file")
        args.corpora[corpus.name] = corpus
    designs = args.designs or ",".join(PROFILES[args.profile]["designs"])
    args.designs = [name.strip() for name in designs.split(",") if name.strip()]
    default_seeds = 1 if args.quick else (2 if args.profile == "learned" else 3)
    args.seeds = default_seeds if args.seeds is None else args.seeds
    args.n_boot = (50 if args.quick else 200) if args.n_boot is None else args.n_boot
    args.n_perm = (50 if args.quick else 200) if args.n_perm is None else args.n_perm
    default_out = "process_exp_results/study" + ("_learned" if args.profile == "learned" else "")
    args.out = Path(args.out or (default_out + "_quick" if args.quick else default_out))
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Names, counts and --set keys, before anything runs."""
    profile_arms = list(PROFILES[args.profile]["arms"])
    if args.arms is not None:
        args.arms = [name.strip() for name in args.arms.split(",") if name.strip()]
        unknown = [name for name in args.arms if name not in profile_arms]
        if unknown or profile_arms[0] not in args.arms:
            why = f"unknown {unknown}" if unknown else f"the reference arm {profile_arms[0]} must be among them"
            raise PipelineError(f"--arms: {why}; the {args.profile} profile's arms: {', '.join(profile_arms)}")
    profile_designs = PROFILES[args.profile]["designs"]
    unknown = [name for name in args.designs if name not in profile_designs]
    if unknown or not args.designs:
        raise PipelineError(
            f"--designs: unknown {unknown or 'none given'} for --profile {args.profile}; choose from "
            f"{', '.join(profile_designs)}"
        )
    for option, value in (
        ("--seeds", args.seeds),
        ("--jobs", args.jobs),
        ("--n-boot", args.n_boot),
        ("--n-perm", args.n_perm),
    ):
        if value < 1:
            raise PipelineError(f"{option} {value}: must be at least 1")
    for corpus in args.corpora.values():
        for design, key in (("held_out", "held_out"), ("seen", "balanced")):
            if design in args.designs and not getattr(corpus, key):
                raise PipelineError(f"{corpus.path}: {key} is empty; the {design} design needs its topics")
        if not args.worker:  # the study that starts the workers has read the corpora already
            check_named_topics(corpus)  # before any run: a misspelt topic would fail one arm at step 1
    arms = PROFILES[args.profile]["arms"].values()
    own = PLACED_KEYS | {key for arm in arms for key in arm} | {"train.random_seed"}
    own |= {"dataset.data_params.eval_topics", "dataset.data_params.train_topics", "dataset.data_params.tokenizer_name"}
    own |= {"train.router_topic_map", "train.router_refit_batches"}  # learned.supervised_settings
    own.add("train.aim_repo")  # one repository per sweep: workers never share one
    for text in args.overrides:
        role, path, _ = parse_override(text)
        if ".".join([role, *path]) in own:
            raise PipelineError(f"--set {text}: the study sets this key itself")


def runner_for(args: argparse.Namespace, corpus: str, design: str) -> argparse.Namespace:
    """What sweep.py's plan_runs and execute need: the demo configs, the corpus and scale, then the --set texts."""
    held_out = args.corpora[corpus].held_out if design == "held_out" else []
    sets = {**args.corpora[corpus].sets, **profile_scale(args)}
    sets["dataset.data_params.eval_topics"] = held_out
    return argparse.Namespace(
        config_dataset="demo/dataset_params.yaml",
        config_model="demo/model_params.yaml",
        config_train="demo/train_params.yaml",
        overrides=[
            *(f"{key}={json.dumps(value)}" for key, value in sets.items()),
            f"train.aim_repo={args.out / f'{corpus}-{design}'}",  # one Aim repository per sweep: workers never share
            *args.overrides,
        ],
        overwrite=args.overwrite,
        step4_options=[
            "--n-boot",
            str(args.n_boot),
            "--n-perm",
            str(args.n_perm),
            *(QUICK_STEP4 if args.quick else []),
            *(["--pool-held-out"] if design == "held_out" else []),  # analysed as the earlier study did
        ],
    )


def plan_design(args: argparse.Namespace, runner: argparse.Namespace, corpus: str, design: str) -> list[dict]:
    """One run per arm and seed (the reference arm first: the balanced arm uses its tokenizer), tagged
    <arm>__seed-<seed>."""
    sweep_dir = args.out / f"{corpus}-{design}"
    arms = design_arms(args, design)

    def plan(tokenizer: str | None) -> list[dict]:
        assignments, labels = [], []
        for seed in range(args.seeds):  # seed-major: a study stopped early has every arm once before any twice
            for arm in arms:
                extra = {}
                if arm == BALANCED_ARM:
                    extra = {"dataset.data_params.train_topics": args.corpora[corpus].balanced}
                    extra["dataset.data_params.tokenizer_name"] = tokenizer
                if arm == learned.SUPERVISED_ARM:
                    extra = learned.supervised_settings(args.corpora[corpus])
                assignments.append({**ARMS[arm], **extra, "train.random_seed": seed})
                labels.append((arm, seed))
        runs = plan_runs(runner, assignments, sweep_dir, [f"{arm}__seed-{seed}" for arm, seed in labels])
        for run, (arm, seed) in zip(runs, labels):
            run["arm"], run["seed"] = arm, seed
        return runs

    runs = plan(None)
    if BALANCED_ARM not in arms:
        return runs
    reference = next(run for run in runs if run["arm"] == arms[0])
    return plan(str(Path(reference["masked_dir"]) / "tokenizer"))


def worker_command(args: argparse.Namespace, corpus: str, design: str) -> list[str]:
    """This script for one corpus and design, with the same settings, as a worker (it writes no study.md)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--out", str(args.out)]
    command += ["--corpus", str(args.corpora[corpus].path)]
    command += ["--profile", args.profile, "--designs", design, "--seeds", str(args.seeds)]
    command += ["--arms", ",".join(args.arms)] if args.arms else []
    command += ["--n-boot", str(args.n_boot), "--n-perm", str(args.n_perm)]
    command += [*(["--quick"] if args.quick else []), *(["--overwrite"] if args.overwrite else [])]
    for text in args.overrides:
        command += ["--set", text]
    return [*command, "--worker"]


def run_workers(args: argparse.Namespace, pairs: list[tuple[str, str]]) -> None:
    """The sweeps in args.jobs worker processes at a time, largest first; each logs to <out>/logs/<pair>.log.
    A worker that stops with an error (a failed run is not one: its sweep.json records it) stops the study."""
    # OMP_NUM_THREADS (default: every core) is the budget of all workers together: more threads than cores spin
    total = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, total // args.jobs))}
    waiting = sorted(pairs, key=lambda pair: -len(PROFILES[args.profile]["designs"][pair[1]]))
    running: list[tuple[subprocess.Popen, str]] = []
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    while waiting or running:
        while waiting and len(running) < args.jobs:
            corpus, design = waiting.pop(0)
            log = args.out / "logs" / f"{corpus}-{design}.log"
            with open(log, "w", encoding="utf-8") as handle:
                process = subprocess.Popen(
                    worker_command(args, corpus, design), stdout=handle, stderr=subprocess.STDOUT, env=env
                )
            running.append((process, f"{corpus}-{design}"))
            print(f"started {corpus}-{design} ({env['OMP_NUM_THREADS']} thread(s); log: {log})", flush=True)
        time.sleep(1.0)
        for process, name in [entry for entry in running if entry[0].poll() is not None]:
            running.remove((process, name))
            print(f"finished {name} (exit {process.returncode})", flush=True)
            if process.returncode != 0:  # a failed run does not stop a worker: it is recorded in its sweep.json
                log = args.out / "logs" / f"{name}.log"
                raise PipelineError(f"the {name} worker stopped with exit {process.returncode}; see {log}")


def run_design(args: argparse.Namespace, corpus: str, design: str, sweep_dir: Path) -> None:
    """One corpus and design: its runs through sweep.py's execute (resumable), and for the learned profile step 4
    on each reference run's checkpoints and at the corpus's families right after it."""
    runner = runner_for(args, corpus, design)
    runs = plan_design(args, runner, corpus, design)
    print(f"\n== {corpus}, {design} topics: {len(runs)} runs in {sweep_dir}", flush=True)
    reference = reference_arm(args, design)
    metadata = {"experiment": "study", "corpus": corpus, "design": design, "reference_arm": reference}
    after_run = None
    if args.profile == "learned":
        coarse = args.corpora[corpus].path if args.corpora[corpus].coarse_topics else None
        after_run = functools.partial(
            learned.run_extra_step4,
            runner,
            sweep_dir=sweep_dir,
            reference_arm=reference,
            steps=emergence_steps_of(args),
            coarse_file=coarse,
        )
    execute(runner, runs, sweep_dir, metadata, after_run)


def main() -> None:
    args = parse_args()
    from process_exp_results.experiments.compare_runs import compare  # loads torch: after the arguments are checked

    started = time.perf_counter()
    designs = {}
    pairs = [(corpus, design) for corpus in args.corpora for design in args.designs]
    in_workers = args.jobs > 1 and len(pairs) > 1 and not args.worker and not args.report_only
    if in_workers:
        run_workers(args, pairs)
    for corpus, design in pairs:
        sweep_dir = args.out / f"{corpus}-{design}"
        if not in_workers and not args.report_only:
            run_design(args, corpus, design, sweep_dir)
        if args.worker:
            continue
        if not (sweep_dir / "sweep.json").is_file():
            why = "no run has started there" if args.report_only else f"its worker wrote none; see {args.out / 'logs'}"
            raise PipelineError(f"{sweep_dir}: no sweep.json ({why}); run the study without --report-only first")
        runs = json.loads((sweep_dir / "sweep.json").read_text(encoding="utf-8"))["runs"]
        study_summary.score_on_common_set(runs, reference_arm(args, design))
        with contextlib.redirect_stdout(io.StringIO()):  # its tables are in study.md; the files stay
            _, designs[f"{corpus}-{design}"] = compare([str(sweep_dir)], sweep_dir / "comparison")
        if args.profile == "learned":
            reference = reference_arm(args, design)
            views = learned.learned_views(
                runs, designs[f"{corpus}-{design}"], sweep_dir, reference, emergence_steps_of(args)
            )
            designs[f"{corpus}-{design}"]["learned"] = views
    if args.worker:
        return
    seconds = round(time.perf_counter() - started, 1)
    settings = {
        "profile": args.profile,
        "scale": profile_scale(args),
        "sets": list(args.overrides),
        "seeds": args.seeds,
        "n_boot": args.n_boot,
        "n_perm": args.n_perm,
        "seconds": seconds,
    }
    write_json_atomic(args.out / "study.json", {"settings": settings, "designs": designs})
    figures = study_summary.write_figures(designs, args.out)
    from process_exp_results.experiments.emergence_figure import write_emergence_figure  # matplotlib: only here

    for name, design in designs.items():
        views = design.get("learned")
        path = args.out / f"{name}_emergence.png"
        if views and write_emergence_figure(views["emergence"], views["loss_curves"], path):
            figures.append(path)
    table = study_summary.study_markdown(designs, settings)
    write_text_atomic(args.out / "study.md", table + "\n")
    print(table)
    print(f"\nstudy: {args.out / 'study.md'} and {args.out / 'study.json'} ({seconds / 60:.1f} min)")
    print("figures: " + ", ".join(str(path) for path in figures))
    unfinished = [
        run["tag"] for design in designs.values() for run in design["runs"] if run["status"] in ("failed", "planned")
    ]
    unfinished += [
        f"step 4 {name}" for design in designs.values() for run in design["runs"] for name in run["extra_failed"]
    ]
    if unfinished:
        kept = [a for a in sys.argv[1:] if a not in ("--overwrite", "--report-only")]
        again = shlex.join(["python", "process_exp_results/experiments/study.py", *kept])
        print(
            f"{len(unfinished)} run(s) not finished; to finish them (finished runs are kept): {again}", file=sys.stderr
        )
        sys.exit(1)


if __name__ == "__main__":
    run_step(main)
