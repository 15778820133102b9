"""``compare topic:NAME`` on a real broker: the labeled events of a topic slice, validated by
the learner's decoder (malformed and unlabeled events are left out and counted)."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest
import structlog
from kafka import KafkaProducer

from consumers.admin import ensure_topics
from pipeline import cli

pytestmark = pytest.mark.integration


def test_compare_reads_a_topic_slice(bootstrap, unique, tmp_path, capsys):
    topic = f"hist{unique}"
    ensure_topics({"bootstrap_servers": bootstrap}, [topic], 2, 1, timeout_s=30)
    rng = np.random.default_rng(0)
    means = rng.normal(0, 1, (4, 8))
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for i in range(240):
        label = i * 4 // 240  # classes 0..3 in order: two tasks of two classes
        features = (means[label] + 0.3 * rng.normal(0, 1, 8)).tolist()
        event = {"id": f"h{i}", "features": features, "label": label, "task": label // 2}
        producer.send(topic, orjson.dumps(event), key=event["id"].encode())
    producer.send(topic, b"{not json")
    producer.send(topic, orjson.dumps({"id": "u1", "features": [0.0] * 8, "label": None}))
    producer.flush(30)
    producer.close()

    argv = ["compare", f"topic:{topic}", "--seeds", "1", "--memories", "20"]
    argv += ["--methods", "ce_finetune,supcon", "--out", str(tmp_path)]
    argv += ["--set", "train.iters_per_batch=1", "--set", f"kafka.bootstrap_servers={bootstrap}"]
    try:
        code = cli.main(argv)
    finally:
        structlog.reset_defaults()
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    report = json.loads((tmp_path / "compare.json").read_text())
    assert report["config"]["data"] == f"topic:{topic}"
    supcon = next(r for r in report["runs"] if r["method"] == "supcon")
    assert set(supcon["per_class"]) == {"0", "1", "2", "3"}
    assert "not_json=1" in err
    assert "unlabeled=1" in err
    assert json.loads(out.strip().splitlines()[-1])["final_accuracy"]
