"""Secrets stay out of what is printed and logged: SecretStr fields and passwords in URLs."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from pipeline.cli import main
from pipeline.config import load_settings
from pipeline.exceptions import ConfigError, SupconStreamError
from pipeline.redaction import MASK, redact_argv, redact_url

SECRET = "s3cr3t-in-url"
URL = f"redis://u:{SECRET}@127.0.0.1:1/0"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """main() configures logging for the process, bound to this test's captured stderr;
    put the session's setup back so later tests do not write to a closed stream."""
    saved = structlog.get_config()
    handlers = logging.root.handlers[:]
    yield
    structlog.configure(**saved)
    logging.root.handlers[:] = handlers


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://u:pw@127.0.0.1:1/0", f"redis://u:{MASK}@127.0.0.1:1/0"),
        ("rediss://:pw@host:6380/2", f"rediss://:{MASK}@host:6380/2"),
        ("redis://token@host/0", f"redis://{MASK}@host/0"),  # a lone userinfo may be a token
        ("redis://u:p@ss/w@rd@host/0", f"redis://u:{MASK}@host/0"),  # unencoded @ and /
        (
            "SASL_SSL://a:pw1@h1:9092,SASL_SSL://b:pw2@h2:9092",
            f"SASL_SSL://a:{MASK}@h1:9092,SASL_SSL://b:{MASK}@h2:9092",
        ),
        ("redis://127.0.0.1:16379/0", "redis://127.0.0.1:16379/0"),
        ("h1:9092,h2:9092", "h1:9092,h2:9092"),
        ("runs/ckpt", "runs/ckpt"),
    ],
)
def test_redact_url_masks_the_password_and_keeps_the_rest(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redacted_dump_masks_passwords_in_every_url_setting() -> None:
    settings = load_settings(
        None,
        [f"redis.url={URL}", f"kafka.bootstrap_servers=SASL_SSL://k:{SECRET}@broker:9092"],
        environ={},
    )
    dump = settings.redacted()
    assert SECRET not in json.dumps(dump)
    assert dump["redis"]["url"] == f"redis://u:{MASK}@127.0.0.1:1/0"
    assert dump["kafka"]["bootstrap_servers"] == f"SASL_SSL://k:{MASK}@broker:9092"
    assert settings.redis.url == URL  # only the dump is masked; the client gets the password


def test_a_rejected_secret_value_is_not_echoed() -> None:
    # YAML reads 987654 as a number, which a SecretStr refuses: the error names the key only.
    with pytest.raises(ConfigError, match=r"redis\.password") as err:
        load_settings(None, ["redis.password=987654"], environ={})
    assert "987654" not in str(err.value)
    with pytest.raises(ConfigError, match=r"consumer\.batch_size.*got 'lots'"):
        load_settings(None, ["consumer.batch_size=lots"], environ={})


def test_config_command_prints_no_url_password(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--set", f"redis.url={URL}"]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out
    assert json.loads(out)["redis"]["url"] == f"redis://u:{MASK}@127.0.0.1:1/0"


@pytest.mark.parametrize(
    ("command", "runner"),
    [
        ("learn", "pipeline.learner.opening.open_io"),  # the first step after the log line
        ("sidecar", "pipeline.sidecar.service.run_sidecar"),
    ],
)
def test_startup_configuration_log_shows_no_url_password(
    command: str,
    runner: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The real command up to its configuration line; the process body itself is stubbed."""

    def stop_after_the_startup_log(*_args: object, **_kwargs: object) -> None:
        raise SupconStreamError(f"stub {command} stopped after start-up")

    monkeypatch.setattr(runner, stop_after_the_startup_log)
    caplog.set_level(logging.DEBUG)
    rc = main([command, "--set", f"redis.url={URL}", "--set", "redis.password=other-secret"])
    assert rc == 1
    err = capsys.readouterr().err
    logged = err + caplog.text
    assert "configuration" in err
    assert f"redis://u:{MASK}@127.0.0.1:1/0" in err
    assert f"stub {command} stopped" in err  # the command ran past its start-up log
    assert SECRET not in logged
    assert "other-secret" not in logged


def test_bench_report_command_line_masks_url_passwords() -> None:
    from pipeline.redaction import redact_argv  # what the throughput report records

    shown = " ".join(redact_argv(["bench", "throughput", "--set", f"redis.url={URL}"]))
    assert SECRET not in shown
    assert f"redis.url=redis://u:{MASK}@127.0.0.1:1/0" in shown


def test_bench_command_line_hides_secret_values() -> None:
    argv = [
        "bench",
        "throughput",
        "--set",
        "redis.password=hunter2",
        "--set",
        "kafka.sasl_password=s3cret",
        "--set",
        "consumer.batch_size=64",
    ]
    shown = " ".join(redact_argv(argv))
    assert "hunter2" not in shown
    assert "s3cret" not in shown
    assert "redis.password=**********" in shown
    assert "consumer.batch_size=64" in shown
