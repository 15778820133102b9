"""Any override or environment value yields valid settings or one ConfigError line."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline.config import Settings, load_settings
from pipeline.exceptions import ConfigError

KEYS = [
    "kafka.partitions",
    "kafka.security_protocol",
    "redis.password",
    "redis.retries",
    "train.lr",
    "train.grad_clip",
    "consumer.batch_size",
    "checkpoint.ledger",
    "health.http_port",
    "model.input_dim",
    "nonexistent.key",
    "train",
    "train.lr.deeper",
]
values = st.text(max_size=20) | st.sampled_from(
    ["-1", "0", "1e309", "nan", "[1, 2]", "{a: 1}", "null"]
)


@settings(max_examples=300, deadline=None)
@example([("a\nb", "1")], {})
@example([("train.lr.deeper", "1"), ("train\n.lr", "x")], {})
@given(
    st.lists(st.tuples(st.sampled_from(KEYS) | st.text(max_size=12), values), max_size=4),
    st.dictionaries(st.sampled_from(["SUPCON_STREAM__TRAIN__LR", "SUPCON_STREAM__X"]), values),
)
def test_overrides_give_settings_or_one_config_error_line(pairs, environ):
    overrides = [f"{k}={v}" for k, v in pairs]
    try:
        result = load_settings(None, overrides, environ=environ)
    except ConfigError as exc:
        message = str(exc)
        assert message
        assert "\n" not in message  # the CLI prints it as one line
        return
    assert isinstance(result, Settings)
