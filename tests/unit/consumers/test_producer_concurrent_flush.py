"""A flush on one thread while another thread is inside send() (the serving loop sends
predictions while the consumer thread flushes before a commit): the flush must not count
that record as lost, recreate the client and send it a second time."""

from __future__ import annotations

import threading
from typing import Any

from consumers.producer import JsonProducer


class _Future:
    def __init__(self) -> None:
        self.callbacks: list[Any] = []

    def add_callback(self, f: Any, *args: Any) -> _Future:
        self.callbacks.append((f, args))
        return self

    def add_errback(self, f: Any, *args: Any) -> _Future:
        return self


class _SlowSendClient:
    """send() blocks until released (as a metadata fetch can); flush() acks what it holds."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.sent: list[bytes] = []
        self.pending: list[_Future] = []

    def send(
        self, topic: str, value: bytes, key: bytes | None = None, timestamp_ms: int | None = None
    ) -> _Future:
        self.entered.set()
        self.release.wait(10)
        self.sent.append(value)
        fut = _Future()
        self.pending.append(fut)
        return fut

    def flush(self, timeout: float | None = None) -> None:
        for fut in self.pending:
            for f, args in fut.callbacks:
                f(*args, None)
        self.pending.clear()

    def close(self, timeout: float | None = None) -> None:
        pass


class _Producer(JsonProducer):
    def __init__(self) -> None:
        self.clients: list[_SlowSendClient] = []
        super().__init__({"bootstrap_servers": ["127.0.0.1:1"]}, recreate_backoff_s=0.0)

    def _new_client(self) -> Any:
        self.clients.append(_SlowSendClient())
        return self.clients[-1]


def test_flush_during_another_threads_send_neither_recreates_nor_resends() -> None:
    producer = _Producer()
    client = producer.clients[0]
    sender = threading.Thread(target=producer.send, args=("t", b"prediction"))
    sender.start()
    assert client.entered.wait(10)
    producer.flush(timeout_s=5)  # the consumer thread's flush before a commit
    client.release.set()
    sender.join(10)
    producer.flush(timeout_s=5)  # the sending thread's own flush acknowledges it
    assert producer.recreated == 0
    assert len(producer.clients) == 1
    assert client.sent == [b"prediction"]
    assert producer.pending == 0
