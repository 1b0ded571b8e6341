"""What the benchmarks share: the command line's frame, timing in alternating rounds, ratio checks, and how they
finish (table, checks, time, JSON)."""

import argparse
import time
from collections.abc import Callable, Hashable

import torch

from config_utils import write_json_atomic
from config_utils.errors import first_line


def make_parser(prog: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """Every benchmark's parser: `python benchmarks/NAME.py`, the epilog's defaults printed as written."""
    return argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def check_device(parser: argparse.ArgumentParser, device: str) -> None:
    """Refuse --device cuda up front where there is none, instead of skipping every implementation."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda asked, but torch.cuda.is_available() is False")


def one_line(error: BaseException) -> str:
    """An exception as a table note: its type and first line."""
    return f"{type(error).__name__}: {first_line(error)}".rstrip(": ")


def sync(device: torch.device) -> None:
    """CUDA runs asynchronously: wait for it, so the clock measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(step: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Run step() once between two device syncs; (milliseconds, what it returned)."""
    sync(device)
    start = time.perf_counter()
    result = step()
    sync(device)
    return (time.perf_counter() - start) * 1e3, result


def alternate(
    steps: dict[Hashable, Callable[[], object]],
    repeats: int,
    device: torch.device,
    before: Callable[[Hashable], None] | None = None,
    on_error: Callable[[Hashable, BaseException], None] | None = None,
) -> tuple[dict, dict]:
    """Run every step once per round, the order rotating each round; (milliseconds, returned values) per key.

    Rotating puts every implementation in every slot, so slow drift of the machine falls on all alike.
    before(key) runs untimed before each step. With on_error, a step that raises is reported to it and left
    out of the later rounds; without, the error propagates.
    """
    times, outputs = {key: [] for key in steps}, {key: [] for key in steps}
    running = list(steps)
    for r in range(repeats):
        shift = r % len(running) if running else 0
        for key in running[shift:] + running[:shift]:
            try:
                if before is not None:
                    before(key)
                ms, output = timed_ms(steps[key], device)
            except Exception as error:  # noqa: BLE001 - reported through on_error
                if on_error is None:
                    raise
                on_error(key, error)
                running.remove(key)
                continue
            times[key].append(ms)
            outputs[key].append(output)
    return times, outputs


def ratio_check(name: str, num: float | None, den: float | None, limit: float | None, detail: str = "") -> dict:
    """num / den (two median times) against an upper limit: PASS, FAIL, n/a (not measured) or info (no limit)."""
    if num is None or den is None:
        return {"check": name, "value": None, "status": "n/a", "detail": "not measured"}
    ratio = num / den
    status = "info" if limit is None else ("PASS" if ratio <= limit else "FAIL")
    return {
        "check": name,
        "value": round(ratio, 3),
        "status": status,
        "detail": detail or f"{num:.2f} ms / {den:.2f} ms",
    }


def library_meta(device: torch.device) -> dict:
    """Versions and the GPU's name, for the JSON's meta."""
    meta = {"torch": torch.__version__}
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    return meta


def format_checks(checks: list[dict], title: str) -> str:
    """One line per target: [PASS|FAIL|n/a|info] what, the measured value, and how it was computed."""
    lines = [f"checks ({title}):"]
    for check in checks:
        value = "-" if check["value"] is None else f"{check['value']:.3f}"
        lines.append(f"  [{check['status']:>4}] {check['check']}: {value}   ({check['detail']})")
    return "\n".join(lines)


def finish(payload: dict, table: str, checks_title: str, started: float, json_path: str | None) -> int:
    """Print the table and the checks, then write the JSON (atomically) if asked; returns the exit code."""
    print(f"\n{table}\n\n{format_checks(payload['checks'], checks_title)}")
    print(f"\ntotal {time.perf_counter() - started:.1f} s")
    if json_path:
        write_json_atomic(json_path, payload)
        print(f"wrote {json_path}")
    return 0
