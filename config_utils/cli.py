"""What every step script shares: the config options, `--set` overrides and the exit-2 error path."""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable

from config_utils.config import ConfigSection, load_config, parse_override
from config_utils.errors import PipelineError
from config_utils.io import is_disk_full, release_output_locks

SET_HELP = (
    "override one config key, repeatable: ROLE.KEY=VALUE with ROLE dataset, model or train and "
    "KEY the dotted path in that file, the value parsed as YAML "
    "(e.g. --set dataset.load_params.source=files --set model.n_experts=8 --set train.max_steps=20). "
    "Keys of all three configs are accepted, so one list can be passed to every step."
)


def add_set_option(parser: argparse.ArgumentParser, note: str = "") -> None:
    """The --set option (args.overrides) every step and experiment script takes; note: what the script adds."""
    help_text = f"{SET_HELP} {note}" if note else SET_HELP
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="ROLE.KEY=VALUE", help=help_text
    )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def step_parser(description: str, config_flags: dict[str, tuple[str, str]]) -> argparse.ArgumentParser:
    """config_flags: role -> (option name, default file), e.g. {"dataset": ("--config-name", "dataset_params.yaml")}."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    for role, (flag, default) in config_flags.items():
        parser.add_argument(
            flag,
            dest=f"config_{role}",
            default=default,
            metavar="YAML",
            help=f"{role} config: a name in configs/ (e.g. demo/{default}) or a path",
        )
    add_set_option(parser)
    return parser


def load_step_configs(args: argparse.Namespace, roles: list[str]) -> dict[str, ConfigSection]:
    """Parse every override (unknown keys fail even for roles this step does not read), then load."""
    overrides = [parse_override(text) for text in args.overrides]
    return {role: load_config(role, getattr(args, f"config_{role}"), overrides) for role in roles}


def run_step(main: Callable[[], None]) -> None:
    """Run a step; bad input becomes one line on stderr and exit code 2, never a traceback."""
    try:
        try:
            main()
        finally:
            release_output_locks()  # and remove their files: a step that stops leaves nothing behind
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        if is_disk_full(error):
            where = f" writing {error.filename}" if error.filename else ""
            print(
                f"error: no space left on the device{where}; free space there (or choose other output folders) and "
                f"run again: outputs written whole before this one are intact",
                file=sys.stderr,
            )
            sys.exit(2)
        if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        # an output folder this user may not write (or on a read-only file system), or an input it may not read
        where = f"{error.filename}: " if error.filename else ""
        print(
            f"error: {where}{error.strerror or error}: give this user access there, or choose output folders it "
            f"can write (the configs' *_dir, save_path and aim_repo keys, step 4's --save_path); nothing was "
            f"written in place of earlier outputs",
            file=sys.stderr,
        )
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; nothing was written in place of earlier outputs", file=sys.stderr)
        sys.exit(130)
