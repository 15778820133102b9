"""Durable copy of the memory bank in Redis (:class:`~memory_bank.protocols.BankStore`).

Layout, for ``P = <key_prefix>:bank:<bank_name>``::

    P:feat     hash  id -> float32 little-endian bytes [input_dim]
    P:emb      hash  id -> float32 little-endian bytes [embed_dim] (L2-normalised)
    P:meta     hash  id -> orjson {"label": <class name>, "task": <str|null>}
    P:seen     hash  class name -> events offered to the reservoir (int)
    P:dims     string orjson {"input_dim": .., "embed_dim": ..}, checked on load and apply
    P:applied  string token of the last apply that committed (see below)

The mirror in the learner is the per-step source; Redis is touched once per ``MemoryBank.add``
(one :meth:`RedisBankStore.apply`), at checkpoints (:meth:`write_embeddings`) and on restart
(:meth:`load`). Never one round trip per item: a round trip costs far more than the
record it carries (docs/performance.md).

INVARIANT: an ``apply`` is applied at most once, even when it is retried. ``apply`` is one Lua
script (atomic like MULTI/EXEC, one round trip, multi-field HSET/HDEL of 1000 fields) that
starts by comparing ``P:applied`` with the call's token and ends by storing the token. A retry
after a lost reply (our own, or redis-py's built-in one) therefore finds its token and does
nothing, instead of bumping the ``seen`` counters twice: HINCRBY is the one write here that is
not idempotent on its own. One learner writes a bank, so one "last token" key suffices.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import orjson
import redis
import structlog

from memory_bank.exceptions import BankCorruptError, BankError, BankUnavailableError
from memory_bank.protocols import BankSnapshot, StoredItem
from memory_bank.redis_client import make_redis_client  # noqa: F401 - re-exported for callers

log = structlog.get_logger(__name__)

T = TypeVar("T")

_F32 = np.dtype("<f4")
# Fields per HSCAN step, per HMGET and per write_embeddings script call: 100k items take a
# few dozen commands, and no single command blocks Redis for long.
_SCAN_COUNT = 5_000
_READ_CHUNK = 5_000
_WRITE_CHUNK = 5_000

# apply and write_embeddings ship vectors as one concatenated blob per call and ids/metadata
# as JSON arrays, which Lua splits: redis-py packs every argument on the client, so a few
# large arguments cost less than one per field, and one script less than a MULTI/EXEC
# pipeline of the same writes (docs/performance.md).
# Lua's unpack() is bounded by the C stack (8000 values in Redis' Lua), hence the chunks.

# KEYS: feat, emb, meta, seen, dims, applied.
# ARGV: 1 token, 2 dims json, 3 evicted ids (json array), 4 added ids (json array),
#       5 added metadata (json array of json strings), 6 features blob, 7 embeddings blob,
#       8 feature bytes per item, 9 embedding bytes per item,
#       10 seen increments (json object: class name -> decimal string).
_APPLY_LUA = """
if redis.call('GET', KEYS[6]) == ARGV[1] then
  return 0
end
local dims = redis.call('GET', KEYS[5])
if dims and dims ~= ARGV[2] then
  return redis.error_reply('BANKDIMS ' .. dims)
end
local evicted = cjson.decode(ARGV[3])
local ids = cjson.decode(ARGV[4])
local metas = cjson.decode(ARGV[5])
local feats, embs = ARGV[6], ARGV[7]
local fb, eb = tonumber(ARGV[8]), tonumber(ARGV[9])
local chunk = 1000
for i = 1, #evicted, chunk do
  local last = math.min(i + chunk - 1, #evicted)
  redis.call('HDEL', KEYS[1], unpack(evicted, i, last))
  redis.call('HDEL', KEYS[2], unpack(evicted, i, last))
  redis.call('HDEL', KEYS[3], unpack(evicted, i, last))
end
for i = 1, #ids, chunk do
  local last = math.min(i + chunk - 1, #ids)
  local f, e, m = {}, {}, {}
  for j = i, last do
    local id = ids[j]
    f[#f + 1] = id
    f[#f + 1] = string.sub(feats, (j - 1) * fb + 1, j * fb)
    e[#e + 1] = id
    e[#e + 1] = string.sub(embs, (j - 1) * eb + 1, j * eb)
    m[#m + 1] = id
    m[#m + 1] = metas[j]
  end
  redis.call('HSET', KEYS[1], unpack(f))
  redis.call('HSET', KEYS[2], unpack(e))
  redis.call('HSET', KEYS[3], unpack(m))
end
for name, increment in pairs(cjson.decode(ARGV[10])) do
  redis.call('HINCRBY', KEYS[4], name, increment)
end
if not dims then
  redis.call('SET', KEYS[5], ARGV[2])
end
redis.call('SET', KEYS[6], ARGV[1])
return 1
"""

# KEYS: feat, emb. ARGV: ids (json array), embeddings blob, embedding bytes per item.
# Writes an embedding only where the item still exists, so a flush racing an eviction
# cannot resurrect half an item (an emb without feat/meta).
_WRITE_EMB_LUA = """
local ids = cjson.decode(ARGV[1])
local embs, eb = ARGV[2], tonumber(ARGV[3])
local n = 0
for j = 1, #ids do
  if redis.call('HEXISTS', KEYS[1], ids[j]) == 1 then
    redis.call('HSET', KEYS[2], ids[j], string.sub(embs, (j - 1) * eb + 1, j * eb))
    n = n + 1
  end
end
return n
"""

# KEYS: meta. ARGV: cursor, count. One HSCAN step over meta, returned as {next cursor, ids as
# a json array, metadata as a json array}: three reply elements instead of two per item.
# (Vectors are read with plain pipelined HMGETs: concatenating them in Lua cost the server
# more than parsing them costs redis-py (docs/performance.md), and the HMGET pipeline lets
# the client parse while the server still sends.)
_SCAN_META_LUA = """
local reply = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local flat = reply[2]
if #flat == 0 then
  return {reply[1], '[]', '[]'}
end
local ids, metas = {}, {}
for i = 1, #flat, 2 do
  ids[#ids + 1] = flat[i]
  metas[#metas + 1] = flat[i + 1]
end
return {reply[1], cjson.encode(ids), '[' .. table.concat(metas, ',') .. ']'}
"""

_RETRYABLE = (redis.ConnectionError, redis.TimeoutError)
# Subclasses of ConnectionError that no amount of waiting fixes.
_NOT_RETRYABLE = (redis.AuthenticationError, redis.exceptions.AuthorizationError)


def ping_redis(client: redis.Redis) -> None:
    """One PING. :class:`BankUnavailableError` while Redis cannot be reached (worth waiting
    for); a refused login raises :class:`BankError`, which waiting does not fix."""
    try:
        client.ping()
    except _NOT_RETRYABLE as exc:
        raise BankError(f"redis refused the connection: {exc}") from exc
    except _RETRYABLE as exc:
        raise BankUnavailableError(f"cannot reach redis: {exc}") from exc


class RedisBankStore:
    """:class:`~memory_bank.protocols.BankStore` on Redis hashes (layout in the module doc).

    Every operation is idempotent and retried on ``ConnectionError`` / ``TimeoutError`` with
    exponential backoff (``backoff_s``, doubled per attempt up to ``max_backoff_s``,
    ``retries`` times), then raises :class:`BankUnavailableError`. ``on_health`` (optional)
    is called with the error text on each failed attempt and with None on the first success
    after a failure, so an outage shows in the learner's health status.
    """

    def __init__(
        self,
        client: redis.Redis,
        key_prefix: str,
        bank_name: str,
        input_dim: int,
        embed_dim: int,
        *,
        retries: int = 5,
        backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
        on_health: Callable[[str | None], None] | None = None,
    ) -> None:
        if input_dim < 1 or embed_dim < 1:
            raise ValueError(f"dimensions must be >= 1, got {input_dim=} {embed_dim=}")
        if retries < 0 or backoff_s < 0:
            raise ValueError(f"retries and backoff_s must be >= 0, got {retries=} {backoff_s=}")
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError(
                "RedisBankStore needs a client with decode_responses=False: vectors are binary"
            )
        self._client = client
        self.input_dim = input_dim
        self.embed_dim = embed_dim
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        # Told the error while Redis is failing, and None once an operation succeeds again.
        self._on_health = on_health
        self._failing = False
        base = f"{key_prefix}:bank:{bank_name}"
        self._key_prefix = key_prefix
        self.bank_key = base
        self._feat = f"{base}:feat"
        self._emb = f"{base}:emb"
        self._meta = f"{base}:meta"
        self._seen = f"{base}:seen"
        self._dims = f"{base}:dims"
        self._applied = f"{base}:applied"
        self._dims_json = orjson.dumps({"input_dim": input_dim, "embed_dim": embed_dim})
        self._apply_script = client.register_script(_APPLY_LUA)
        self._write_emb_script = client.register_script(_WRITE_EMB_LUA)
        self._scan_meta_script = client.register_script(_SCAN_META_LUA)
        self._log = log.bind(bank=base)

    # -- BankStore -------------------------------------------------------------------------

    def load(self) -> BankSnapshot:
        """Read the whole bank: HSCAN steps over ``meta``, then pipelined HMGETs."""
        started = time.perf_counter()
        snapshot = self._retrying("load", self._load_once)
        self._log.info(
            "bank_store_loaded",
            items=len(snapshot),
            classes=len(snapshot.seen_per_class),
            seconds=round(time.perf_counter() - started, 3),
        )
        return snapshot

    def apply(
        self,
        added: Sequence[StoredItem],
        evicted_ids: Sequence[str],
        seen_increments: Mapping[str, int],
    ) -> None:
        """Atomically remove ``evicted_ids``, then add ``added``, then bump ``seen``.

        Removals go first, so an id that is in both ends up stored.
        """
        seen = {name: int(inc) for name, inc in seen_increments.items() if int(inc) != 0}
        if not added and not evicted_ids and not seen:
            return
        features, embeddings = self._stack(added)
        args: list[bytes | str | int] = [
            uuid.uuid4().hex,  # one token per call, reused by every retry of this call
            self._dims_json,
            orjson.dumps(list(evicted_ids)),
            orjson.dumps([item.id for item in added]),
            orjson.dumps(
                [orjson.dumps({"label": it.label, "task": it.task}).decode() for it in added]
            ),
            features.tobytes(),
            embeddings.tobytes(),
            4 * self.input_dim,
            4 * self.embed_dim,
            # Decimal strings: Lua numbers are doubles, and HINCRBY wants an integer literal.
            orjson.dumps({name: str(inc) for name, inc in seen.items()}),
        ]
        keys = [self._feat, self._emb, self._meta, self._seen, self._dims, self._applied]

        def run() -> None:
            try:
                self._apply_script(keys=keys, args=args)
            except redis.ResponseError as exc:
                if str(exc).startswith("BANKDIMS"):
                    stored = str(exc).removeprefix("BANKDIMS").strip()
                    raise BankCorruptError(self._dims_message(stored)) from exc
                raise

        self._retrying("apply", run)

    def write_embeddings(self, ids: Sequence[str], embeddings: np.ndarray) -> None:
        """Overwrite embeddings of ids still stored; others are skipped server-side."""
        if len(ids) != len(embeddings):
            raise ValueError(f"{len(ids)} ids but {len(embeddings)} embeddings")
        if not len(ids):
            return
        matrix = np.ascontiguousarray(embeddings, dtype=_F32)
        if matrix.ndim != 2 or matrix.shape[1] != self.embed_dim:
            raise ValueError(f"embeddings must be [n, {self.embed_dim}], got {matrix.shape}")
        chunks = [
            (
                orjson.dumps(list(ids[start : start + _WRITE_CHUNK])),
                matrix[start : start + _WRITE_CHUNK].tobytes(),
            )
            for start in range(0, len(ids), _WRITE_CHUNK)
        ]

        def run() -> int:
            pipe = self._client.pipeline(transaction=False)
            for ids_json, blob in chunks:
                self._write_emb_script(
                    keys=[self._feat, self._emb],
                    args=[ids_json, blob, 4 * self.embed_dim],
                    client=pipe,
                )
            return sum(int(n) for n in pipe.execute())

        written = self._retrying("write_embeddings", run)
        self._log.debug("bank_embeddings_written", written=written, skipped=len(ids) - written)

    def clear(self) -> None:
        keys = [self._feat, self._emb, self._meta, self._seen, self._dims, self._applied]
        self._retrying("clear", lambda: self._client.delete(*keys))
        self._log.info("bank_store_cleared")

    def set_aside(self, new_bank_name: str) -> list[str]:
        """Rename this bank's keys to those of ``new_bank_name`` (a fresh lineage keeps the
        old bank readable under that name). Returns the new keys; a missing key is skipped.
        """
        target = f"{self._key_prefix}:bank:{new_bank_name}"
        moved: list[str] = []
        for key in (self._feat, self._emb, self._meta, self._seen, self._dims, self._applied):
            new_key = target + key[len(self.bank_key) :]
            # RENAMENX: never overwrite a bank already set aside under that name.
            if self._client.exists(key):
                if not self._client.renamenx(key, new_key):
                    raise BankError(f"cannot set the bank aside: {new_key} exists already")
                moved.append(new_key)
        self._log.info("bank_store_set_aside", to=target, keys=len(moved))
        return moved

    # -- internals -------------------------------------------------------------------------

    def _retrying(self, operation: str, fn: Callable[[], T]) -> T:
        # Only idempotent operations come through here (see the module docstring for apply).
        attempt = 0
        while True:
            try:
                result = fn()
            except _NOT_RETRYABLE as exc:
                self._report(str(exc))
                raise BankUnavailableError(
                    f"redis refused {operation} on {self.bank_key}: {exc}"
                ) from exc
            except _RETRYABLE as exc:
                self._report(str(exc))
                if attempt >= self.retries:
                    raise BankUnavailableError(
                        f"redis unavailable for {operation} on {self.bank_key} after "
                        f"{attempt + 1} attempts: {exc}"
                    ) from exc
                delay = min(self.max_backoff_s, self.backoff_s * (2**attempt))
                self._log.warning(
                    "bank_store_retry",
                    operation=operation,
                    attempt=attempt + 1,
                    delay_s=delay,
                    error=str(exc),
                )
                time.sleep(delay)
                attempt += 1
            else:
                if self._failing:
                    self._failing = False
                    self._log.info(
                        "bank_store_recovered", operation=operation, attempts=attempt + 1
                    )
                    if self._on_health is not None:
                        self._on_health(None)
                return result

    def _report(self, error: str) -> None:
        self._failing = True
        if self._on_health is not None:
            self._on_health(error)

    def _dims_message(self, stored: str | bytes) -> str:
        return (
            f"bank {self.bank_key} was written with dimensions {stored!s}, but this learner "
            f"uses input_dim={self.input_dim} embed_dim={self.embed_dim}: use another bank "
            "name, or clear this bank"
        )

    def _check_dims(self, raw: bytes | None) -> None:
        if raw is None:
            return  # empty bank, or cleared: apply writes the dims with the first items
        try:
            stored = orjson.loads(raw)
            dims = (int(stored["input_dim"]), int(stored["embed_dim"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise BankCorruptError(f"unreadable {self._dims}: {raw!r}") from exc
        if dims != (self.input_dim, self.embed_dim):
            raise BankCorruptError(self._dims_message(raw.decode("utf-8", "replace")))

    def _stack(self, added: Sequence[StoredItem]) -> tuple[np.ndarray, np.ndarray]:
        """Features [n, input_dim] and embeddings [n, embed_dim] as little-endian float32."""
        features = np.empty((len(added), self.input_dim), dtype=_F32)
        embeddings = np.empty((len(added), self.embed_dim), dtype=_F32)
        for row, item in enumerate(added):
            f, e = np.asarray(item.features), np.asarray(item.embedding)
            if f.shape != (self.input_dim,) or e.shape != (self.embed_dim,):
                raise ValueError(
                    f"item {item.id!r}: features {f.shape} / embedding {e.shape}, "
                    f"expected ({self.input_dim},) / ({self.embed_dim},)"
                )
            features[row] = f
            embeddings[row] = e
        return features, embeddings

    def _load_once(self) -> BankSnapshot:
        head = self._client.pipeline(transaction=False)
        head.get(self._dims)
        head.hgetall(self._seen)
        dims_raw, seen_raw = head.execute()
        self._check_dims(dims_raw)
        seen = {name.decode(): int(count) for name, count in seen_raw.items()}

        ids: list[str] = []
        metas: list[Any] = []
        cursor: bytes | int = 0
        while True:
            cursor, ids_json, metas_json = self._scan_meta_script(
                keys=[self._meta], args=[cursor, _SCAN_COUNT]
            )
            try:
                ids.extend(orjson.loads(ids_json))
                metas.extend(orjson.loads(metas_json))
            except orjson.JSONDecodeError as exc:
                raise BankCorruptError(f"unreadable item metadata in {self._meta}: {exc}") from exc
            if int(cursor) == 0:
                break
        # HSCAN may return a field twice (while the hash rehashes): keep the first.
        first: dict[str, int] = {}
        for position, event_id in enumerate(ids):
            first.setdefault(event_id, position)
        unique_ids = list(first)

        pipe = self._client.pipeline(transaction=False)
        for start in range(0, len(unique_ids), _READ_CHUNK):
            pipe.hmget(self._feat, unique_ids[start : start + _READ_CHUNK])
            pipe.hmget(self._emb, unique_ids[start : start + _READ_CHUNK])
        replies = pipe.execute()
        feats_raw: list[bytes | None] = [v for reply in replies[0::2] for v in reply]
        embs_raw: list[bytes | None] = [v for reply in replies[1::2] for v in reply]

        keep = self._rows_with_vectors(unique_ids, feats_raw, embs_raw)
        # One join + frombuffer per hash instead of one array per item.
        features = np.frombuffer(b"".join([feats_raw[r] or b"" for r in keep]), dtype=_F32)
        embeddings = np.frombuffer(b"".join([embs_raw[r] or b"" for r in keep]), dtype=_F32)
        kept_ids = tuple(unique_ids[row] for row in keep)
        labels, tasks = self._labels_and_tasks(kept_ids, [metas[first[i]] for i in kept_ids])
        return BankSnapshot(
            ids=kept_ids,
            labels=labels,
            tasks=tasks,
            features=features.reshape(len(keep), self.input_dim),
            embeddings=embeddings.reshape(len(keep), self.embed_dim),
            seen_per_class=seen,
        )

    def _rows_with_vectors(
        self, ids: list[str], feats_raw: list[bytes | None], embs_raw: list[bytes | None]
    ) -> list[int]:
        """Rows whose two vectors are both stored, each checked for its length."""
        feat_bytes, emb_bytes = 4 * self.input_dim, 4 * self.embed_dim
        keep = [
            row
            for row, (f, e) in enumerate(zip(feats_raw, embs_raw, strict=True))
            if f is not None and e is not None
        ]
        sizes = {(len(feats_raw[r] or b""), len(embs_raw[r] or b"")) for r in keep}
        if sizes - {(feat_bytes, emb_bytes)}:
            for row in keep:
                f, e = len(feats_raw[row] or b""), len(embs_raw[row] or b"")
                if (f, e) != (feat_bytes, emb_bytes):
                    raise BankCorruptError(
                        f"item {ids[row]!r} in {self.bank_key} holds {f} feature bytes "
                        f"and {e} embedding bytes, expected {feat_bytes} and {emb_bytes} "
                        f"(input_dim={self.input_dim}, embed_dim={self.embed_dim})"
                    )
        if len(keep) < len(ids):
            # apply() is atomic: an id in meta without vectors was evicted between the scan
            # and the reads (by a second writer), so it is no longer part of the bank.
            self._log.warning("bank_store_items_vanished_during_load", count=len(ids) - len(keep))
        return keep

    def _labels_and_tasks(
        self, ids: tuple[str, ...], metas: list[Any]
    ) -> tuple[tuple[str, ...], tuple[str | None, ...]]:
        """The class name and task of each item, every metadata record checked."""
        try:  # the common case in bulk: dicts with a str label and a str or null task
            labels = tuple([meta["label"] for meta in metas])
            tasks = tuple([meta.get("task") for meta in metas])
        except (TypeError, KeyError, AttributeError):
            labels = tasks = ()
        if (
            len(labels) == len(ids)
            and set(map(type, labels)) <= {str}
            and set(map(type, tasks)) <= {str, type(None)}
        ):
            return labels, tasks
        for event_id, meta in zip(ids, metas, strict=True):  # name the first bad one
            label = meta.get("label") if isinstance(meta, dict) else None
            task = meta.get("task") if isinstance(meta, dict) else None
            if not isinstance(label, str) or not (task is None or isinstance(task, str)):
                raise BankCorruptError(
                    f"item {event_id!r} in {self.bank_key} has metadata {meta!r}: "
                    "expected {'label': str, 'task': str or null}"
                )
        raise AssertionError("unreachable: every metadata record passed the check")
