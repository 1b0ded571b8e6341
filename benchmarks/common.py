"""What the benchmarks share: how they print their checks and finish (table, checks, time, JSON)."""
import time

from config_utils import write_json_atomic


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
