"""Config loading and common I/O shared by the four step scripts."""

from config_utils.cli import load_step_configs, run_step, step_parser
from config_utils.config import ConfigSection, load_config, resolve_config_path
from config_utils.errors import PipelineError, first_line
from config_utils.io import atomic_dir, atomic_file, read_manifest, write_json_atomic, write_text_atomic

__all__ = [
    "ConfigSection",
    "PipelineError",
    "atomic_dir",
    "atomic_file",
    "first_line",
    "load_config",
    "load_step_configs",
    "read_manifest",
    "resolve_config_path",
    "run_step",
    "step_parser",
    "write_json_atomic",
    "write_text_atomic",
]
