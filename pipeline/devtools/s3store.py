"""A local S3-compatible server (moto) on loopback, so the embedded broker's log survives
broker restarts (``devstack up --durable`` and the durable test fixture).

Tansu 0.6 compiles in two storage engines: ``memory://`` (lost on restart) and ``s3://``.
Measured here: Tansu with ``--storage-engine s3://tansu/`` against ``moto_server`` (PyPI
``moto[server]``), bucket created first, keeps topic data and committed offsets across a
broker restart. Tansu reads the endpoint and credentials from the environment
(:func:`s3_environment`). moto keeps its objects in memory: the log lives as long as the S3
server does, so stopping the S3 server (``devstack down``) drops it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.devtools.devstack import (
    LOOPBACK,
    ManagedProcess,
    _wait_until,
    port_open,
    stop_process,
)
from pipeline.exceptions import DevstackError

BUCKET = "tansu"
STORAGE_URL = f"s3://{BUCKET}/"
# moto accepts any credentials; these only have to be present.
_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "devstack",
    "AWS_SECRET_ACCESS_KEY": "devstack",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def find_moto_server() -> Path:
    """``moto_server`` beside this interpreter (a virtualenv's bin/) or on PATH."""
    beside = Path(sys.executable).parent / "moto_server"
    if beside.is_file():
        return beside
    on_path = shutil.which("moto_server")
    if on_path:
        return Path(on_path)
    raise DevstackError(
        "moto_server was not found: install the devstack extra "
        "(pip install 'supcon-stream[devstack]', which brings moto[server])"
    )


def s3_environment(port: int) -> dict[str, str]:
    """What Tansu needs to reach the S3 server on ``port`` (plain HTTP on loopback)."""
    return {
        "AWS_ENDPOINT": f"http://{LOOPBACK}:{port}",
        "AWS_ALLOW_HTTP": "true",
        **_CREDENTIALS,
    }


def _create_bucket(port: int) -> None:
    request = urllib.request.Request(f"http://{LOOPBACK}:{port}/{BUCKET}", method="PUT")
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310 - loopback URL
            reply.read()
    except urllib.error.HTTPError as exc:
        if exc.code != 409:  # 409: the bucket exists already (a restarted broker)
            raise DevstackError(f"creating the S3 bucket {BUCKET!r} failed: {exc}") from exc
    except OSError as exc:
        raise DevstackError(f"the S3 server on port {port} did not answer: {exc}") from exc


def start_s3(port: int, workdir: Path, timeout_s: float = 30.0) -> ManagedProcess:
    """Start moto_server on ``127.0.0.1:port`` and create the broker's bucket."""
    binary = find_moto_server()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"s3-{port}.log"
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            [str(binary), "-H", LOOPBACK, "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=workdir,
        )
    _wait_until(lambda: port_open(port), timeout_s, f"S3 server on port {port}", proc)
    _create_bucket(port)
    return ManagedProcess("s3", proc.pid, port, str(log_path))


class DurableBroker:
    """Tansu on S3 storage plus its S3 server, on free loopback ports (the test fixture's).

    :meth:`restart_broker` stops the broker by PID and starts it again on the same port and
    storage: its topics, records and committed offsets are still there.
    """

    def __init__(self, workdir: Path) -> None:
        from pipeline.devtools.devstack import free_port, start_broker

        self.workdir = workdir
        self.s3 = start_s3(free_port(), workdir)
        try:
            self.broker = start_broker(free_port(), workdir, s3_port=self.s3.port)
        except DevstackError:
            stop_process(self.s3.pid)
            raise

    @property
    def address(self) -> str:
        return self.broker.address

    def restart_broker(self, down_s: float = 0.0) -> None:
        """Stop the broker, leave it down ``down_s`` seconds, start it on the same storage."""
        from pipeline.devtools.devstack import start_broker

        stop_process(self.broker.pid)
        time.sleep(down_s)
        self.broker = start_broker(self.broker.port, self.workdir, s3_port=self.s3.port)

    def stop(self) -> None:
        stop_process(self.broker.pid)
        stop_process(self.s3.pid)
