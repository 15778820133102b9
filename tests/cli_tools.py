"""Run the ``supcon-stream`` CLI as a user would: a subprocess of this interpreter."""

from __future__ import annotations

import subprocess

from pipeline.devtools.spawn import cli_command


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``supcon-stream ARGS...`` to completion, output captured as text, exit code not checked."""
    command, *rest = args
    return subprocess.run(
        cli_command(command, *rest), capture_output=True, text=True, timeout=timeout, check=False
    )
