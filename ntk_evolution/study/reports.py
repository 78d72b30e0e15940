"""Helpers of the study scripts (reproduce.py, robust_data_study.py): run an entry script in
this process with its output logged, and markdown tables."""

from __future__ import annotations

import contextlib
import io
import os
import shlex


def open_log(out: str):
    """Create the study's output folder and its log.txt (the entry scripts' output)."""
    os.makedirs(out, exist_ok=True)
    return open(os.path.join(out, "log.txt"), "w")


def call(script, command: str, log):
    """Run an entry script's main() in this process; its output goes to the log file."""
    print(f"$ python {script.__name__}.py {command}", flush=True)
    log.write(f"\n$ python {script.__name__}.py {command}\n")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        result = script.main(shlex.split(command))
    log.write(buffer.getvalue())
    log.flush()
    return result


def table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
