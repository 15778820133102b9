"""RedisBankStore against a real redis-server: layout, dimension checks, retries, corruption."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import redis

from memory_bank.exceptions import BankCorruptError, BankUnavailableError
from memory_bank.protocols import StoredItem
from memory_bank.redis_store import RedisBankStore, make_redis_client
from pipeline.devtools.devstack import free_port

pytestmark = pytest.mark.integration

IN_DIM, EMB_DIM = 4, 8


def item(event_id: str, label: str = "cat", seed: int = 0) -> StoredItem:
    rng = np.random.default_rng(seed)
    return StoredItem(
        id=event_id,
        features=rng.standard_normal(IN_DIM).astype(np.float32),
        embedding=rng.standard_normal(EMB_DIM).astype(np.float32),
        label=label,
        task=None,
    )


def make_store(client: redis.Redis, unique: str, **kwargs: Any) -> RedisBankStore:
    return RedisBankStore(
        client,
        f"test-{unique}",
        "bank",
        kwargs.pop("input_dim", IN_DIM),
        kwargs.pop("embed_dim", EMB_DIM),
        **kwargs,
    )


def test_layout(redis_client: redis.Redis, unique: str) -> None:
    store = make_store(redis_client, unique)
    stored = item("ev-1", "dog")
    store.apply([stored], [], {"dog": 3})
    base = f"test-{unique}:bank:bank"
    assert redis_client.hget(f"{base}:feat", "ev-1") == stored.features.tobytes()
    assert redis_client.hget(f"{base}:emb", "ev-1") == stored.embedding.tobytes()
    assert orjson.loads(redis_client.hget(f"{base}:meta", "ev-1") or b"") == {
        "label": "dog",
        "task": None,
    }
    assert redis_client.hget(f"{base}:seen", "dog") == b"3"
    assert orjson.loads(redis_client.get(f"{base}:dims") or b"") == {
        "input_dim": IN_DIM,
        "embed_dim": EMB_DIM,
    }


def test_dimension_mismatch_is_a_clear_error(redis_client: redis.Redis, unique: str) -> None:
    make_store(redis_client, unique).apply([item("a")], [], {"cat": 1})
    other = make_store(redis_client, unique, embed_dim=EMB_DIM * 2)
    with pytest.raises(BankCorruptError, match=r"input_dim=4 embed_dim=16.*another bank name"):
        other.load()
    wide = StoredItem("b", np.zeros(IN_DIM, np.float32), np.zeros(EMB_DIM * 2, np.float32), "x")
    with pytest.raises(BankCorruptError, match="embed_dim"):
        other.apply([wide], [], {"x": 1})
    # The refused apply wrote nothing.
    assert [i.id for i in make_store(redis_client, unique).load().items] == ["a"]
    assert make_store(redis_client, unique).load().seen_per_class == {"cat": 1}


def test_item_with_wrong_byte_length_is_reported(redis_client: redis.Redis, unique: str) -> None:
    store = make_store(redis_client, unique)
    store.apply([item("a"), item("b")], [], {"cat": 2})
    redis_client.hset(f"test-{unique}:bank:bank:feat", "b", b"\x00" * 7)
    with pytest.raises(BankCorruptError, match=r"'b'.*7 feature bytes"):
        store.load()


@pytest.mark.parametrize(
    "meta", [b'{"label": 3}', b'{"task": "t"}', b'["cat"]', b'{"label": "cat", "task": 1}']
)
def test_item_with_bad_metadata_is_named(
    redis_client: redis.Redis, unique: str, meta: bytes
) -> None:
    store = make_store(redis_client, unique)
    store.apply([item("a"), item("b"), item("c")], [], {"cat": 3})
    redis_client.hset(f"test-{unique}:bank:bank:meta", "b", meta)
    with pytest.raises(BankCorruptError, match=r"item 'b' .* has metadata"):
        store.load()


def test_a_retried_apply_whose_reply_was_lost_applies_once(
    redis_client: redis.Redis, unique: str
) -> None:
    store = make_store(redis_client, unique, backoff_s=0.01)
    real_script = store._apply_script
    calls = []

    def commit_then_drop_reply(**kwargs: Any) -> Any:
        calls.append(1)
        result = real_script(**kwargs)
        if len(calls) == 1:
            raise redis.ConnectionError("connection reset after EXEC")
        return result

    store._apply_script = commit_then_drop_reply  # type: ignore[assignment]
    store.apply([item("a")], [], {"cat": 1})
    assert len(calls) == 2
    snapshot = store.load()
    assert [i.id for i in snapshot.items] == ["a"]
    assert snapshot.seen_per_class == {"cat": 1}  # not 2: the retry found its token


def test_unreachable_redis_raises_bank_unavailable() -> None:
    client = make_redis_client(f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=0.2)
    store = RedisBankStore(client, "test", "bank", IN_DIM, EMB_DIM, retries=2, backoff_s=0.01)
    with pytest.raises(BankUnavailableError, match="after 3 attempts"):
        store.load()
    with pytest.raises(BankUnavailableError):
        store.apply([item("a")], [], {"cat": 1})


def test_client_must_return_bytes(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses"):
        RedisBankStore(client, "test", "bank", IN_DIM, EMB_DIM)
    client.close()


def test_make_redis_client_talks_to_the_server(redis_url: str, unique: str) -> None:
    client = make_redis_client(redis_url, socket_timeout_s=1.0)
    try:
        assert client.ping()
        store = make_store(client, unique)
        store.apply([item("a")], [], {"cat": 1})
        assert [i.id for i in store.load().items] == ["a"]
    finally:
        client.close()


def test_make_redis_client_unwraps_a_secret(stack_dir: Path) -> None:
    from pydantic import SecretStr

    from pipeline.devtools.devstack import start_redis, stop_process

    server = start_redis(free_port(), stack_dir, password="s3cret", appendonly=False)
    try:
        client = make_redis_client(
            f"redis://{server.address}/0", password=SecretStr("s3cret"), socket_timeout_s=1.0
        )
        assert client.ping()
        client.close()
        wrong = make_redis_client(f"redis://{server.address}/0", password="nope")
        store = RedisBankStore(wrong, "test", "bank", IN_DIM, EMB_DIM, backoff_s=0.01)
        with pytest.raises(BankUnavailableError, match="refused"):  # no retries on auth errors
            store.load()
        wrong.close()
    finally:
        stop_process(server.pid)
