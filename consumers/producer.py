"""A small, safe JSON producer: acks=all, retries, flush that raises, and self-healing.

Why the self-healing: a producer can get stuck for good after a broker restart (measured with
an idempotent producer: ``UnknownProducerIdError`` then a fatal ``InitProducerId`` error; every
later send fails). Retrying on the same client never recovers, so on a failed send or flush
the client is closed and recreated ONCE per call, after a backoff, and every record that was
not acknowledged is sent again through the new client. Re-sending can duplicate a record that
the broker had in fact stored: delivery is at-least-once, like the rest of the stream.

Records are tracked from ``send`` until the broker acknowledges them, so ``flush`` can say
whether everything sent before it is durable, which the consumer relies on (a dead letter is
durable before the offset that covers it is committed).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson
import structlog
from kafka import KafkaProducer
from kafka.errors import KafkaError, MessageSizeTooLargeError

from consumers.exceptions import BrokerUnavailableError, ProducerError

log = structlog.get_logger(__name__)

_Item = tuple[str, bytes, bytes | None, int | None]  # topic, value, key, timestamp ms


def _discard(producer: KafkaProducer) -> None:
    """Close a client now, dropping what it still holds (the caller tracks those records).

    ``KafkaProducer.close(timeout=0)`` flushes first and raises ``KafkaTimeoutError`` when
    records are pending, before it would force the sender down; a broken client always has
    pending records, so the sender is then stopped directly.
    """
    try:
        producer.close(timeout=0)
    except KafkaError as exc:
        sender = getattr(producer, "_sender", None)  # private, checked: kafka-python 3.0.x
        if sender is not None and hasattr(sender, "force_close"):
            sender.force_close()
            sender.join(1.0)
        log.debug("discarded a producer client with pending records", error=repr(exc))


class JsonProducer:
    """Thread-safe wrapper around one ``KafkaProducer`` that it may replace when it breaks.

    Raises :class:`BrokerUnavailableError` when no broker answers at construction.

    ``client_options`` are the connection options shared by all clients (bootstrap servers,
    security, ``request_timeout_ms``); ``producer_options`` may override any producer setting.
    Idempotence is off by default: with at-least-once delivery downstream it buys little,
    and idempotent producers are the ones that wedge after a broker restart.
    """

    def __init__(
        self,
        client_options: Mapping[str, Any],
        linger_ms: int = 5,
        *,
        enable_idempotence: bool = False,
        delivery_timeout_ms: int = 60_000,
        max_block_ms: int = 10_000,
        recreate_backoff_s: float = 1.0,
        producer_options: Mapping[str, Any] | None = None,
        on_health: Callable[[str | None], None] | None = None,
    ) -> None:
        request_timeout_ms = int(client_options.get("request_timeout_ms", 30_000))
        self._options: dict[str, Any] = {
            **client_options,
            "acks": "all",
            "linger_ms": linger_ms,
            "enable_idempotence": enable_idempotence,
            # kafka-python refuses delivery_timeout_ms <= linger_ms + request_timeout_ms.
            "delivery_timeout_ms": max(delivery_timeout_ms, linger_ms + request_timeout_ms + 1),
            # Bounds how long send() may block on metadata or a full buffer.
            "max_block_ms": max_block_ms,
            **(producer_options or {}),
        }
        self._recreate_backoff_s = recreate_backoff_s
        self._lock = threading.Lock()  # guards the two dicts below (callbacks run elsewhere)
        self._client_lock = threading.RLock()  # serialises create/replace/close of the client
        self._seq = itertools.count()
        self._unacked: dict[int, _Item] = {}
        self._failed: dict[int, tuple[_Item, BaseException]] = {}
        # Records whose send() has not returned (with callbacks attached) yet: a flush from
        # another thread (the consumer thread flushes before a commit) does not wait for them.
        self._sending: set[int] = set()
        self._generation = 0
        self._recreated = 0
        self._closed = False
        # Told the error when a flush fails, and None at the next flush that succeeds.
        self._on_health = on_health
        self._failing = False
        # After a failed (re)connect, sends queue their records until this time instead of
        # each blocking on a new connection attempt; the delay doubles up to 30 s.
        self._reconnect_at = 0.0
        self._reconnect_delay_s = recreate_backoff_s
        try:
            self._producer: KafkaProducer | None = self._new_client()
        except KafkaError as exc:  # KafkaTimeoutError: "Unable to bootstrap from ..."
            servers = client_options.get("bootstrap_servers")
            raise BrokerUnavailableError(
                f"cannot connect a Kafka producer to {servers}: {exc}"
            ) from exc

    # ---- public API -----------------------------------------------------------------------

    @property
    def recreated(self) -> int:
        """How many times the underlying client was replaced."""
        return self._recreated

    @property
    def pending(self) -> int:
        """Records sent but not yet acknowledged (including failed ones kept for a retry)."""
        with self._lock:
            return len(self._unacked) + len(self._failed)

    def send(
        self,
        topic: str,
        value: bytes | Mapping[str, Any],
        key: bytes | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        """Queue one record; a mapping is serialised with orjson. Returns without waiting.

        ``timestamp_ms`` sets the record's timestamp (playback keeps the original's); None
        lets the client stamp it with the current time.

        Raises ``MessageSizeTooLargeError``/``TypeError``/``ValueError`` for a record that can
        never be sent. While the broker is unreachable (even a recreated client fails) the
        record is kept and re-sent by the next :meth:`flush`, which reports the outage.
        """
        payload = bytes(value) if isinstance(value, bytes | bytearray) else orjson.dumps(value)
        self._send_item((topic, payload, key, timestamp_ms), retry=True)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Block until every record sent before this call is acknowledged, or raise.

        On a failure (a record's delivery failed, or the time ran out) the client is
        recreated once and the unacknowledged records re-sent within the same time budget;
        :class:`ProducerError` if that fails too (the records stay queued for the next try).
        """
        deadline = time.monotonic() + timeout_s
        upto = next(self._seq)
        problem = self._flush_until(deadline, upto)
        if problem is None:
            self._report(None)
            return
        log.warning("producer flush failed; recreating the client", error=repr(problem))
        try:
            self._recreate(problem)
        except ProducerError as exc:
            self._report(str(exc))
            raise
        # Re-sent records got new numbers: everything queued so far must be acknowledged.
        problem = self._flush_until(deadline, next(self._seq))
        if problem is None:
            self._report(None)
            return
        self._report(repr(problem))
        raise ProducerError(
            f"{self.pending} record(s) not acknowledged by the broker after recreating "
            f"the producer: {problem!r}"
        ) from (problem if isinstance(problem, BaseException) else None)

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush (raising :class:`ProducerError` if records are still undelivered), then close."""
        if self._closed:
            return
        try:
            self.flush(timeout_s)
        finally:
            with self._client_lock:
                self._closed = True
                producer, self._producer = self._producer, None
                if producer is not None:
                    _discard(producer)

    # ---- internals ------------------------------------------------------------------------

    def _new_client(self) -> KafkaProducer:
        return KafkaProducer(**self._options)

    def _report(self, error: str | None) -> None:
        if (error is None) == (not self._failing):
            return
        self._failing = error is not None
        if self._on_health is not None:
            self._on_health(error)

    def _client(self) -> tuple[KafkaProducer, int]:
        with self._client_lock:
            if self._closed:
                raise ProducerError("the producer is closed")
            if self._producer is None:  # a previous recreate failed to connect
                if time.monotonic() < self._reconnect_at:
                    raise ProducerError("no broker connection; waiting to reconnect")
                try:
                    self._producer = self._new_client()
                except KafkaError as exc:
                    self._reconnect_at = time.monotonic() + self._reconnect_delay_s
                    self._reconnect_delay_s = min(30.0, 2 * self._reconnect_delay_s)
                    raise ProducerError(f"cannot create a Kafka producer: {exc!r}") from exc
                self._reconnect_delay_s = self._recreate_backoff_s
                self._generation += 1
            return self._producer, self._generation

    def _keep_for_retry(self, item: _Item, exc: BaseException) -> None:
        """Hold a record the broker could not take now; the next flush re-sends or reports it."""
        with self._lock:
            self._failed[next(self._seq)] = (item, exc)

    def _send_item(self, item: _Item, retry: bool) -> None:
        topic, payload, key, timestamp_ms = item
        if self._closed:
            raise ProducerError("the producer is closed")
        try:
            producer, generation = self._client()
        except ProducerError as exc:
            if not retry:
                raise
            # No client (the broker is unreachable): queue the record rather than fail the
            # caller; flush() retries and reports, and a checkpoint waits for it.
            self._keep_for_retry(item, exc)
            return
        seq = next(self._seq)
        with self._lock:
            self._unacked[seq] = item
            self._sending.add(seq)
        try:
            future = producer.send(topic, value=payload, key=key, timestamp_ms=timestamp_ms)
            future.add_callback(self._on_ack, seq)
            future.add_errback(self._on_error, seq)
        except MessageSizeTooLargeError:
            self._forget(seq)
            raise
        except KafkaError as exc:
            # Closed client, metadata or buffer timeout, fatal idempotence state: the
            # signs of a broken client rather than of a bad record.
            self._forget(seq)
            if not retry:
                raise ProducerError(f"send to {topic!r} failed after recreate: {exc!r}") from exc
            try:
                if generation == self._generation:
                    log.warning(
                        "producer send failed; recreating the client", topic=topic, error=repr(exc)
                    )
                    self._recreate(exc)
                self._send_item(item, retry=False)
            except ProducerError as again:
                self._keep_for_retry(item, again)
            return
        except BaseException:
            self._forget(seq)
            raise
        finally:
            with self._lock:
                self._sending.discard(seq)

    def _forget(self, seq: int) -> None:
        with self._lock:
            self._unacked.pop(seq, None)

    def _on_ack(self, seq: int, _metadata: object) -> None:
        with self._lock:
            self._unacked.pop(seq, None)

    def _on_error(self, seq: int, exc: BaseException) -> None:
        # Runs on the client's I/O thread. A callback from a client already replaced finds
        # nothing here (its records were moved for re-sending) and is ignored.
        with self._lock:
            item = self._unacked.pop(seq, None)
            if item is not None:
                self._failed[seq] = (item, exc)

    def _flush_until(self, deadline: float, upto: int) -> BaseException | str | None:
        """One flush attempt; None when every record numbered below ``upto`` is acknowledged."""
        producer = self._producer
        if producer is None:
            with self._lock:
                waiting = len(self._failed) + len(self._unacked)
            # The last recreate could not connect; the queued records are in _failed.
            return f"no producer client, {waiting} record(s) queued" if waiting else None
        try:
            producer.flush(timeout=max(0.0, deadline - time.monotonic()))
        except KafkaError as exc:  # KafkaTimeoutError when the budget ran out
            return exc
        with self._lock:
            if self._failed:
                return next(iter(self._failed.values()))[1]
            # A send still in progress on another thread was not "sent before" this flush;
            # counting it made a concurrent flush recreate the client and send it twice.
            stuck = sum(1 for seq in self._unacked if seq < upto and seq not in self._sending)
        return f"{stuck} record(s) unacknowledged after flush" if stuck else None

    def _recreate(self, reason: object) -> None:
        """Replace the client after a backoff and re-send every unacknowledged record."""
        with self._client_lock:
            if self._closed:
                raise ProducerError("the producer is closed")
            old, self._producer = self._producer, None
            self._generation += 1
            if old is not None:
                _discard(old)  # abort its in-flight batches; they are re-sent below
            with self._lock:
                items = [*self._unacked.values(), *(item for item, _ in self._failed.values())]
                self._unacked.clear()
                self._failed.clear()
            time.sleep(self._recreate_backoff_s)
            self._recreated += 1
            try:
                self._producer = self._new_client()
            except KafkaError as exc:
                self._reconnect_at = time.monotonic() + self._reconnect_delay_s
                self._reconnect_delay_s = min(30.0, 2 * self._reconnect_delay_s)
                with self._lock:  # keep them for the next attempt; nothing is dropped
                    for item in items:
                        self._failed[next(self._seq)] = (item, exc)
                log.error("producer recreate failed", error=repr(exc), queued=len(items))
                raise ProducerError(f"cannot recreate the Kafka producer: {exc!r}") from exc
            log.warning(
                "producer recreated",
                reason=repr(reason),
                resent=len(items),
                recreated=self._recreated,
            )
        for item in items:
            try:
                self._send_item(item, retry=False)
            except (ProducerError, KafkaError) as exc:
                with self._lock:  # kept for the next flush, which reports the failure
                    self._failed[next(self._seq)] = (item, exc)
