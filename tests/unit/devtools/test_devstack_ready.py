"""redis-server readiness: an open port is not enough while Redis loads its dataset."""

from __future__ import annotations

import socket
import threading

import pytest

from pipeline.devtools.devstack import redis_answers


def _one_reply_server(reply: bytes) -> tuple[int, threading.Thread]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(1024)
            conn.sendall(reply)
        srv.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return port, thread


@pytest.mark.parametrize(
    ("reply", "ready"),
    [
        (b"-LOADING Redis is loading the dataset in memory\r\n", False),
        (b"+PONG\r\n", True),
        (b"-NOAUTH Authentication required.\r\n", True),
    ],
)
def test_redis_answers_reads_the_reply_not_just_the_port(reply: bytes, ready: bool) -> None:
    port, thread = _one_reply_server(reply)
    # A generous timeout: the reply comes from a thread, which a loaded machine may run late.
    assert redis_answers(port, timeout_s=10.0) is ready
    thread.join(5)


def test_redis_answers_is_false_when_nothing_listens() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert redis_answers(port) is False
