"""Model export from the learner: automatically every N checkpoints, or by the ``export`` command.

INVARIANT: a bundle never covers more than a durable checkpoint. The automatic export runs
right after a checkpoint is saved (``Checkpointer.commit``) with that checkpoint's offsets;
the ``export`` command reads the newest checkpoint. Both bundle the NCM class means the
learner reads: the stream class means (``eval.class_means: stream``, the running learner's or
the checkpoint's), or the current encoder over every bank item (``bank``); publish the next
version into the registry folder ``<export.dir>/<learner>`` and announce it on
``<prefix>.models``. A failed export is logged and never stops training.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
import torch.nn.functional as F  # noqa: N812

from consumers.events import TopicPartitionKey
from consumers.exceptions import ProducerError
from consumers.producer import JsonProducer
from pipeline.config import Settings
from pipeline.exceptions import CheckpointError
from pipeline.learner.checkpoint import Checkpoint, load_latest
from pipeline.learner.context import LearnerContext
from pipeline.learner.predictions import refresh_means
from pipeline.learning.discriminant import discriminant, saved_covariance
from pipeline.learning.inference import ClassMeans, class_means
from pipeline.learning.model import StreamNet
from pipeline.learning.objectives import chosen_classifier
from pipeline.serving.announce import announcement
from pipeline.serving.exceptions import BundleError
from pipeline.serving.export import Provenance, bundle_parts
from pipeline.serving.registry import Published, publish

log = structlog.get_logger(__name__)

ANNOUNCE_FLUSH_S = 5.0


def registry_dir(settings: Settings, learner: str | None = None) -> Path:
    return settings.export.dir / (learner or settings.learner_name)


@dataclass
class AutoExport:
    """``export.every_checkpoints``: export after every N-th durable checkpoint."""

    every: int
    registry: Path
    keep: int
    checkpoints: int = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> AutoExport | None:
        e = settings.export
        if e.every_checkpoints <= 0:
            return None
        return cls(e.every_checkpoints, registry_dir(settings), e.keep)

    def after_checkpoint(
        self, ctx: LearnerContext, offsets: Mapping[TopicPartitionKey, int]
    ) -> Published | None:
        self.checkpoints += 1
        if self.checkpoints % self.every:
            return None
        try:
            published = export_context(ctx, offsets, self.registry, self.keep)
        except (BundleError, OSError) as exc:
            log.warning("model export failed; training continues", error=str(exc))
            return None
        announce(ctx.producer, ctx.settings, published)
        return published


def export_context(
    ctx: LearnerContext, offsets: Mapping[TopicPartitionKey, int], registry: Path, keep: int
) -> Published:
    """The running learner's model as the next bundle version of ``registry``."""
    s = ctx.settings
    means = refresh_means(ctx, force=True)  # the evaluation's means: the whole bank re-encoded
    c = ctx.counters
    origin = Provenance(
        learner=ctx.name,
        objective=s.train.objective,
        step=ctx.state.step,
        offsets=offsets,
        first_event_ms=c.first_event_ms,
        last_event_ms=c.last_event_ms,
        metrics=ctx.last_metrics,
        counters=c.as_dict(),
        bank_items=len(ctx.bank),
    )
    manifest, tensors = bundle_parts(
        ctx.state.model,
        s.model,
        ctx.registry.names,
        ctx.registry.class_task,
        means,
        chosen_classifier(s.train, s.eval.classifier),
        ctx.temperature,
        origin,
    )
    published = publish(registry, manifest, tensors, keep)
    log.info(
        "model exported", version=published.version, path=str(published.path), step=origin.step
    )
    return published


def export_checkpoint(settings: Settings, registry: Path) -> Published:
    """The newest checkpoint of ``settings``' learner, with the class means the learner reads:
    the checkpoint's stream means (``eval.class_means: stream``, classes the bank holds but
    the means never saw from the bank), or the means of its Redis bank."""
    ckpt = load_latest(settings.checkpoint_dir)
    if ckpt is None:
        raise CheckpointError(
            f"no checkpoint of learner {settings.learner_name!r} in {settings.checkpoint_dir}"
        )
    model = StreamNet(settings.model)
    try:
        model.load_state_dict(ckpt.model)
    except RuntimeError as exc:
        raise CheckpointError(
            f"the checkpoint in {settings.checkpoint_dir} does not fit the model settings "
            f"(pass the learner's own --config): {str(exc).splitlines()[0]}"
        ) from exc
    labels = list(ckpt.labels)
    feats, bank_labels = _bank_items(settings, labels)
    means = class_means(model, feats, bank_labels)
    if settings.eval.class_means == "stream" and ckpt.class_means is not None:
        means = with_stream_means(means, ckpt.class_means, settings.eval.covariance_shrinkage)
    origin = Provenance(
        learner=settings.learner_name,
        objective=settings.train.objective,
        step=ckpt.step,
        offsets=ckpt.offsets,
        first_event_ms=int(ckpt.counters.get("first_event_ms", 0)),
        last_event_ms=int(ckpt.counters.get("last_event_ms", 0)),
        metrics=ckpt.metrics,
        counters=ckpt.counters,
        bank_items=int(feats.shape[0]),
    )
    manifest, tensors = bundle_parts(
        model,
        settings.model,
        labels,
        _class_task(ckpt, labels),
        means,
        chosen_classifier(settings.train, settings.eval.classifier),
        ckpt.temperature,
        origin,
    )
    return publish(registry, manifest, tensors, settings.export.keep)


def with_stream_means(
    bank_means: ClassMeans, saved: Mapping[str, Any], shrinkage: float | None = None
) -> ClassMeans:
    """The saved stream means (one or more per class) of every class they hold, the bank's
    for the others; read through the saved shared covariance as the learner reads them
    (``eval.covariance_shrinkage``) when the state holds one, else as unit means."""
    counts, rows = saved["counts"], saved["means"]
    per_class = int(saved.get("per_class", 1))  # 1: a checkpoint of one mean per class
    held = torch.nonzero(counts > 0).squeeze(1)
    stream = held // per_class
    known = set(stream.tolist())
    extra = [i for i, label in enumerate(bank_means.labels.tolist()) if label not in known]
    labels = torch.cat([stream, bank_means.labels[extra].cpu()])
    means = torch.cat([rows[held].float(), bank_means.means[extra].float().cpu()])
    order = torch.argsort(labels, stable=True)
    scatter = saved.get("scatter")
    if shrinkage is not None and scatter is not None:
        cov = saved_covariance(scatter)
        return discriminant(labels[order], means[order], cov, shrinkage)
    return ClassMeans(labels[order], F.normalize(means[order], dim=-1))


def _class_task(ckpt: Checkpoint, labels: list[str]) -> dict[str, str | None]:
    return {name: ckpt.class_task.get(name) for name in labels}


def _bank_items(settings: Settings, labels: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and label indices of every item of the learner's bank in Redis.

    Items are read the way the learner reads them on restart (``MemoryBank.open``: sorted by
    id), so the class means are the ones a restarted learner computes. A class found in the
    bank but not in the checkpoint (written after it) is appended to ``labels``.
    """
    from memory_bank.bank import MemoryBank
    from memory_bank.index import make_index
    from memory_bank.redis_store import RedisBankStore, make_redis_client

    r, b, m = settings.redis, settings.bank, settings.model
    client = make_redis_client(
        r.url, r.username, r.password, r.socket_timeout_s, tls_options=r.tls_options()
    )
    index = {name: i for i, name in enumerate(labels)}

    def label_index(name: str) -> int:
        if name not in index:
            index[name] = len(labels)
            labels.append(name)
        return index[name]

    try:
        name = settings.learner_name
        store = RedisBankStore(client, r.key_prefix, name, m.input_dim, m.embed_dim)
        bank = MemoryBank.open(
            store,
            make_index("torch", m.embed_dim, torch.device("cpu")),
            capacity=b.capacity,
            input_dim=m.input_dim,
            embed_dim=m.embed_dim,
            device="cpu",
            seed=settings.train.seed,
            label_index=label_index,
            policy=b.policy,
            eviction=b.eviction,
        )
        _, feats, bank_labels = bank.occupied()
    finally:
        client.close()
    return feats, bank_labels


def announce(producer: JsonProducer, settings: Settings, published: Published) -> None:
    """Tell serving processes about a new version; a broker outage only delays them."""
    payload = announcement(settings.learner_name, published)
    producer.send(settings.kafka.models_topic, payload, key=settings.learner_name.encode())
    try:
        producer.flush(timeout_s=ANNOUNCE_FLUSH_S)
    except ProducerError as exc:
        log.warning(
            "model announcement not yet delivered", version=published.version, error=str(exc)
        )


def announce_once(settings: Settings, published: Published) -> bool:
    """The ``export`` command's announcement, through a producer of its own; False (and a
    warning) when the broker cannot be reached: the bundle is published all the same."""
    from consumers.admin import ensure_topics
    from consumers.exceptions import BrokerUnavailableError

    k = settings.kafka
    try:
        ensure_topics(k.client_options(), [k.models_topic], k.partitions, k.replication_factor)
        producer = JsonProducer(k.client_options())
    except BrokerUnavailableError as exc:
        log.warning("bundle exported but not announced", error=str(exc))
        return False
    try:
        key = settings.learner_name.encode()
        producer.send(k.models_topic, announcement(settings.learner_name, published), key=key)
        producer.flush(timeout_s=30.0)
    except ProducerError as exc:
        log.warning("bundle exported but not announced", error=str(exc))
        return False
    finally:
        producer.close()
    return True
