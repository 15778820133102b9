"""The bundle format: round trip, digest, corruption and incompatibility, registry versions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from serving_helpers import CONFIG, LABELS, publish_model

from pipeline.learning.inference import NCM_TEMPERATURE, predict_head, predict_ncm
from pipeline.serving.bundle import MANIFEST, PROTOTYPE_BIAS, WEIGHTS, content_digest, read_bundle
from pipeline.serving.exceptions import BundleError
from pipeline.serving.predictor import Predictor
from pipeline.serving.registry import newest_loadable, resolve, versions


def test_predictor_gives_the_learners_ncm_predictions(tmp_path: Path) -> None:
    published, model, means, queries = publish_model(tmp_path, temperature=0.05)
    predictor = Predictor.load(published.path)
    out = predictor.predict(queries.numpy())
    idx, conf = predict_ncm(model, queries, means, 0.05)
    assert out.class_index.tolist() == idx.tolist()
    assert out.labels == [LABELS[i] for i in idx.tolist()]
    assert np.array_equal(out.confidences, conf.numpy())
    with torch.no_grad():
        assert np.array_equal(out.embeddings, model.embed(queries).numpy())
    raw = predictor.predict(queries, temperature=NCM_TEMPERATURE)
    assert np.array_equal(raw.confidences, predict_ncm(model, queries, means)[1].numpy())


def test_a_class_with_several_means_is_served_as_the_learner_reads_it(tmp_path: Path) -> None:
    published, model, means, queries = publish_model(tmp_path, per_task=True)
    assert means.labels.tolist() == [0, 0, 1, 2]
    bundle = read_bundle(published.path)
    assert bundle.manifest["prototypes"]["classes"] == ["cat", "cat", "dog", "7"]
    out = Predictor.load(published.path).predict(queries)
    idx, conf = predict_ncm(model, queries, means, 0.05)
    assert out.class_index.tolist() == idx.tolist()
    assert np.array_equal(out.confidences, conf.numpy())


def test_means_read_through_a_shared_covariance_are_served_as_the_learner_reads_them(
    tmp_path: Path,
) -> None:
    published, model, means, queries = publish_model(tmp_path, shared_covariance=True)
    assert means.bias is not None
    bundle = read_bundle(published.path)
    assert bundle.manifest["prototypes"]["bias"] == PROTOTYPE_BIAS
    assert torch.equal(bundle.tensors[PROTOTYPE_BIAS], means.bias)
    out = Predictor.load(published.path).predict(queries)
    idx, conf = predict_ncm(model, queries, means, 0.05)
    assert out.class_index.tolist() == idx.tolist()
    assert np.array_equal(out.confidences, conf.numpy())
    # without its biases the same bundle would read otherwise: they are not decoration
    plain = predict_ncm(model, queries, type(means)(means.labels, means.means), 0.05)
    assert not torch.equal(plain[1], conf)


def test_a_bundle_of_format_version_1_still_serves_its_cosine_means(tmp_path: Path) -> None:
    published, model, means, queries = publish_model(tmp_path)
    path = published.path / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 1
    del manifest["prototypes"]["bias"]
    manifest["digest"] = content_digest(manifest, (published.path / WEIGHTS).read_bytes())
    path.write_text(json.dumps(manifest))
    out = Predictor.load(published.path).predict(queries)
    assert out.class_index.tolist() == predict_ncm(model, queries, means, 0.05)[0].tolist()


def test_head_bundle_predicts_with_the_head(tmp_path: Path) -> None:
    published, model, _, queries = publish_model(tmp_path, classifier="head")
    out = Predictor.load(published.path).predict(queries)
    seen = torch.zeros(CONFIG.max_classes, dtype=torch.bool)
    seen[: len(LABELS)] = True
    idx, conf = predict_head(model, queries, seen)
    assert out.class_index.tolist() == idx.tolist()
    assert np.array_equal(out.confidences, conf.numpy())


def test_manifest_describes_the_model(tmp_path: Path) -> None:
    published, *_ = publish_model(tmp_path)
    manifest = json.loads((published.path / MANIFEST).read_text())
    assert manifest["version"] == 1 == published.version
    assert manifest["model"]["input_dim"] == CONFIG.input_dim
    assert manifest["labels"] == LABELS
    assert manifest["prototypes"]["classes"] == LABELS
    assert manifest["calibration"]["temperature"] == 0.05
    assert manifest["offsets"] == [{"topic": "t.events", "partition": 0, "offset": 17}]
    assert manifest["event_time"] == {"first_ms": 1000, "last_ms": 2000}
    assert manifest["metrics"] == {"ece": 0.1, "ece_calibrated": None}  # NaN -> null
    assert manifest["digest"] == published.digest
    assert published.digest.startswith("sha256:")
    assert manifest["weights"]["tensors"]["ncm.prototypes"] == [3, CONFIG.embed_dim]


def test_a_flipped_weight_byte_is_detected(tmp_path: Path) -> None:
    published, *_ = publish_model(tmp_path)
    data = bytearray((published.path / WEIGHTS).read_bytes())
    data[-3] ^= 0x01
    (published.path / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="digest mismatch"):
        read_bundle(published.path)


def test_an_edited_manifest_is_detected(tmp_path: Path) -> None:
    published, *_ = publish_model(tmp_path)
    path = published.path / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["labels"] = ["cat", "dog", "8"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="digest mismatch"):
        read_bundle(published.path)


def test_missing_files_and_unknown_formats_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"no manifest\.json"):
        read_bundle(tmp_path / "nothing")
    published, *_ = publish_model(tmp_path / "reg")
    (published.path / WEIGHTS).unlink()
    with pytest.raises(BundleError, match="cannot read"):
        read_bundle(published.path)
    other, *_ = publish_model(tmp_path / "reg2")
    path = other.path / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="format version 99"):
        read_bundle(other.path)


def test_weights_that_do_not_fit_the_config_are_incompatible(tmp_path: Path) -> None:
    published, *_ = publish_model(tmp_path)
    path = published.path / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["model"]["hidden_dim"] = 32
    from pipeline.serving.bundle import content_digest

    manifest["digest"] = content_digest(manifest, (published.path / WEIGHTS).read_bytes())
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="do not fit the model config"):
        Predictor.load(published.path)


def test_registry_versions_increase_and_keep_the_newest(tmp_path: Path) -> None:
    for seed in range(4):
        publish_model(tmp_path, seed=seed, keep=2)
    assert [v for v, _ in versions(tmp_path)] == [4, 3]
    assert resolve(tmp_path).version == 4
    assert not list(tmp_path.glob(".tmp-*"))


def test_newest_loadable_skips_a_corrupt_newest_version(tmp_path: Path) -> None:
    publish_model(tmp_path, seed=0)
    newest, *_ = publish_model(tmp_path, seed=1)
    (newest.path / WEIGHTS).write_bytes(b"garbage")
    bundle = newest_loadable(tmp_path)
    assert bundle is not None
    assert bundle.version == 1
    assert newest_loadable(tmp_path, newer_than=1) is None


def test_predict_rejects_features_of_the_wrong_width(tmp_path: Path) -> None:
    published, *_ = publish_model(tmp_path)
    with pytest.raises(ValueError, match=r"\[n, 8\]"):
        Predictor.load(published.path).predict(np.zeros((2, 3), np.float32))
