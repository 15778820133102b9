"""The dev tools' one way of starting a CLI process: the command, its log, what is logged."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from structlog.testing import capture_logs

from pipeline.devtools.spawn import HIDDEN, cli_command, run, set_args, spawn
from pipeline.redaction import redact_argv


def test_cli_command_runs_this_interpreter_on_the_cli_module() -> None:
    cmd = cli_command("learn", *set_args(["a=1", "b=2"]))
    assert cmd == [sys.executable, "-m", "pipeline.cli", "learn", "--set", "a=1", "--set", "b=2"]


def test_logged_command_hides_secret_values_and_url_passwords() -> None:
    cmd = [
        "--set",
        "redis.password=hunter2",
        "--set",
        "kafka.sasl_password=s3",
        "--set",
        "redis.url=redis://user:pw@127.0.0.1:6379/0",
        "--set",
        "redis.url=redis://127.0.0.1:6379/0",
        "--set",
        "model.input_dim=8",
    ]
    shown = redact_argv(cmd)
    assert shown == [
        "--set",
        f"redis.password={HIDDEN}",
        "--set",
        f"kafka.sasl_password={HIDDEN}",
        "--set",
        f"redis.url=redis://user:{HIDDEN}@127.0.0.1:6379/0",
        "--set",
        "redis.url=redis://127.0.0.1:6379/0",
        "--set",
        "model.input_dim=8",
    ]
    assert not any(secret in " ".join(shown) for secret in ("hunter2", "s3", ":pw@"))


def _child(code: str, *secret: str) -> list[str]:
    return [sys.executable, "-c", code, *secret]


def test_spawn_logs_output_and_hides_secrets_in_its_log_line(tmp_path: Path) -> None:
    log_path = tmp_path / "child.log"
    log_path.write_bytes(b"before\n")
    code = "import os, sys; print(os.environ['OMP_NUM_THREADS']); print('err', file=sys.stderr)"
    with capture_logs() as logs:
        proc = spawn(_child(code, "redis.url=redis://u:topsecret@h/0"), log_path, threads=3)
        assert proc.wait(timeout=60) == 0
    text = log_path.read_text()
    assert text.startswith("before\n")  # appended by default
    assert "3\n" in text
    assert "err\n" in text
    assert "topsecret" not in str(logs)
    assert logs[0]["pid"] == proc.pid


def test_spawn_can_truncate_and_discard_stdout(tmp_path: Path) -> None:
    log_path = tmp_path / "child.log"
    log_path.write_bytes(b"before\n")
    code = "import sys; print('out'); print('err', file=sys.stderr)"
    proc = spawn(_child(code), log_path, append=False, stdout="discard")
    assert proc.wait(timeout=60) == 0
    assert log_path.read_text() == "err\n"


def test_run_captures_stdout_and_logs_stderr(tmp_path: Path) -> None:
    log_path = tmp_path / "child.log"
    code = "import os, sys; print(os.environ.get('OMP_NUM_THREADS')); print('e', file=sys.stderr)"
    done = run(_child(code), log_path, timeout_s=60, threads=None)
    assert done.returncode == 0
    assert done.stdout.decode().strip() == str(os.environ.get("OMP_NUM_THREADS"))
    assert log_path.read_text() == "e\n"
