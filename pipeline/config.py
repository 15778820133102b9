"""Settings: frozen pydantic models, one per component, loaded from YAML plus environment.

The environment is read in exactly one place (:func:`load_settings`). Overrides use
``SUPCON_STREAM__<SECTION>__<KEY>=value`` (double underscores separate levels) or
``--set section.key=value`` on the command line; values are parsed as YAML scalars.
An unknown key or a bad value raises :class:`ConfigError` naming the dotted key.

Secrets never reach a log, the ``config`` command or an error message: ``SecretStr`` fields
print as ``**********``, and a password written into a URL (``redis://user:pw@host/0``, in any
setting) is masked the same way, keeping the user name (:mod:`pipeline.redaction`).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator

from consumers.config import ConsumerTuning
from pipeline.exceptions import ConfigError
from pipeline.redaction import redact_tree
from pipeline.settings.frozen import Frozen as _Frozen
from pipeline.settings.learning import (
    BankSettings,
    EvalSettings,
    ModelSettings,
    TrainSettings,
    eviction_target_problem,
)
from pipeline.settings.serving import ExportSettings, ServeSettings
from pipeline.strict_yaml import DuplicateKeyError, load_yaml

ENV_PREFIX = "SUPCON_STREAM__"


class KafkaSettings(_Frozen):
    bootstrap_servers: str = "127.0.0.1:19092"
    topic_prefix: str = Field("supcon", pattern=r"^[A-Za-z0-9._-]+$")
    partitions: int = Field(4, ge=1)
    replication_factor: int = Field(1, ge=1)
    client_id: str = "supcon-stream"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: SecretStr | None = Field(
        None, description="Password of an encrypted ssl_keyfile."
    )
    ssl_check_hostname: bool = True
    request_timeout_ms: int = Field(30_000, ge=1000)
    reconnect_backoff_ms: int = Field(100, ge=1)
    reconnect_backoff_max_ms: int = Field(5_000, ge=1)

    @property
    def events_topic(self) -> str:
        return f"{self.topic_prefix}.events"

    @property
    def models_topic(self) -> str:
        """Announcements of exported model bundles (pipeline/serving/)."""
        return f"{self.topic_prefix}.models"

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic_prefix}.dlq"

    @property
    def predictions_topic(self) -> str:
        return f"{self.topic_prefix}.predictions"

    @property
    def loss_topic(self) -> str:
        return f"{self.topic_prefix}.metrics.loss"

    @property
    def forgetting_topic(self) -> str:
        return f"{self.topic_prefix}.metrics.forgetting"

    @property
    def alerts_topic(self) -> str:
        return f"{self.topic_prefix}.alerts"

    def all_topics(self) -> list[str]:
        metrics = [self.loss_topic, self.forgetting_topic, self.alerts_topic]
        return [
            self.events_topic,
            self.dlq_topic,
            self.predictions_topic,
            self.models_topic,
            *metrics,
        ]

    def client_options(self) -> dict[str, Any]:
        """Connection options shared by every kafka-python client (consumer, producer, admin)."""
        opts: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
            # Reconnects after a lost broker back off exponentially up to the max.
            "reconnect_backoff_ms": self.reconnect_backoff_ms,
            "reconnect_backoff_max_ms": max(
                self.reconnect_backoff_ms, self.reconnect_backoff_max_ms
            ),
        }
        if self.sasl_mechanism:
            opts["sasl_mechanism"] = self.sasl_mechanism
            opts["sasl_plain_username"] = self.sasl_username
            opts["sasl_plain_password"] = (
                self.sasl_password.get_secret_value() if self.sasl_password else None
            )
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(self, key):
                opts[key] = getattr(self, key)
        if self.ssl_password is not None:
            opts["ssl_password"] = self.ssl_password.get_secret_value()
        if not self.ssl_check_hostname:
            opts["ssl_check_hostname"] = False
        return opts


class ConsumerSettings(ConsumerTuning):
    """The ``consumer`` section: the source's knobs and bounds (:class:`ConsumerTuning`), plus
    the group and the number of consumer processes."""

    group_id: str | None = Field(
        None, description="Consumer group; defaults to '<prefix>.learner.<learner.name>'."
    )
    processes: int = Field(
        1,
        ge=1,
        le=64,
        description="Consumer processes (members of the learner's group) that poll and decode "
        "for it; 1 = a thread in the learner process.",
    )

    @field_validator("client")
    @classmethod
    def _client_installed(cls, client: str) -> str:
        if client == "confluent" and importlib.util.find_spec("confluent_kafka") is None:
            raise ValueError("'confluent' needs confluent-kafka: pip install 'supcon-stream[fast]'")
        return client


class RedisSettings(_Frozen):
    url: str = "redis://127.0.0.1:16379/0"
    username: str | None = None
    password: SecretStr | None = None
    key_prefix: str = Field("supcon", pattern=r"^[A-Za-z0-9._:-]+$")
    socket_timeout_s: float = Field(5.0, gt=0)
    telemetry_maxlen: int = Field(100_000, ge=100)
    retries: int = Field(8, ge=0, description="Bank operation retries on a lost connection.")
    retry_backoff_s: float = Field(0.1, ge=0, description="First retry delay, doubled each time.")
    retry_max_backoff_s: float = Field(5.0, ge=0, description="Cap of one retry delay.")
    ssl_cafile: str | None = Field(None, description="CA file for TLS (use a rediss:// url).")
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    def tls_options(self) -> dict[str, str]:
        """redis-py TLS keyword arguments (TLS itself is switched on by a rediss:// url)."""
        names = {"ssl_cafile": "ssl_ca_certs", "ssl_certfile": "ssl_certfile"}
        names["ssl_keyfile"] = "ssl_keyfile"
        return {kw: getattr(self, key) for key, kw in names.items() if getattr(self, key)}


class CheckpointSettings(_Frozen):
    dir: Path = Path("runs/checkpoints")
    every_steps: int = Field(500, ge=1)  # optimizer iterations: 100 batches at the default 5
    every_seconds: float = Field(30.0, gt=0)
    keep: int = Field(3, ge=1)
    ledger: bool = Field(
        False,
        description=(
            "Append trained event ids to <dir>/<name>/ledger.jsonl (pipeline/learner/ledger.py)."
        ),
    )


class HealthSettings(_Frozen):
    every_s: float = Field(2.0, gt=0, description="Period of the learner's health.json refresh.")
    stale_after_s: float = Field(
        30.0, gt=0, description="`status` calls a learner whose health.json is older unresponsive."
    )
    http_port: int | None = Field(
        None, ge=0, le=65535, description="Serve GET /healthz on 127.0.0.1:<port>; 0 = any port."
    )
    http_host: str = "127.0.0.1"


class LearnerSettings(_Frozen):
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="Names group, bank, checkpoints and telemetry; defaults to the objective.",
    )
    startup_wait_s: float = Field(
        300.0, ge=0, description="How long to wait at start for an unreachable broker or Redis."
    )


class SidecarSettings(_Frozen):
    window: int = Field(50, ge=1)
    ema_alpha: float = Field(0.1, gt=0, le=1)
    publish_every_s: float = Field(2.0, gt=0)
    learners: tuple[str, ...] = Field(
        (), description="Learner names to follow; empty follows every telemetry stream found."
    )
    rate_window_s: float = Field(
        10.0, gt=0, description="Time window (learner clock) of the events/s rate."
    )
    rediscover_every_s: float = Field(
        5.0, gt=0, description="How often to look for new learners' telemetry streams."
    )
    progress_every_s: float = Field(30.0, gt=0, description="Period of the progress log line.")
    read_count: int = Field(
        1000, ge=1, description="Telemetry records read per learner per Redis round trip."
    )
    http_port: int | None = Field(None, ge=0, le=65535, description="Serve /metrics, /healthz.")
    http_host: str = "127.0.0.1"


class SloSettings(_Frozen):
    """Quality SLOs: the sidecar's alert events and its supcon_slo_* series (alerts.yml)."""

    loss_target: float = Field(0.99, gt=0, lt=1, description="Good steps / steps (loss SLI).")
    loss_max: float | None = Field(None, gt=0, description="A bad step's loss; null: relative.")
    loss_vs_mean: float = Field(2.0, gt=1, description="Bad: loss > this × the rolling mean.")
    forgetting_max: float = Field(0.3, gt=0, le=1, description="Bound on average forgetting.")
    stability_gap_max: float = Field(0.3, gt=0, le=1, description="Best − newest avg accuracy.")
    ece_max: float = Field(0.25, gt=0, le=1, description="Bound on the calibration error.")
    min_evaluations: int = Field(3, ge=1, description="Evaluations before the eval SLOs count.")


class DevstackSettings(_Frozen):
    dir: Path = Path(".devstack")
    broker_port: int = Field(19092, ge=1, le=65535)
    redis_port: int = Field(16379, ge=1, le=65535)
    s3_port: int = Field(
        19000, ge=1, le=65535, description="S3 server (moto) of `devstack up --durable`."
    )


class LoggingSettings(_Frozen):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_logs: bool = False


class Settings(_Frozen):
    kafka: KafkaSettings = KafkaSettings()
    consumer: ConsumerSettings = ConsumerSettings()
    redis: RedisSettings = RedisSettings()
    model: ModelSettings = ModelSettings()
    train: TrainSettings = TrainSettings()
    bank: BankSettings = BankSettings()
    eval: EvalSettings = EvalSettings()
    checkpoint: CheckpointSettings = CheckpointSettings()
    health: HealthSettings = HealthSettings()
    learner: LearnerSettings = LearnerSettings()
    sidecar: SidecarSettings = SidecarSettings()
    slo: SloSettings = SloSettings()
    devstack: DevstackSettings = DevstackSettings()
    logging: LoggingSettings = LoggingSettings()
    export: ExportSettings = ExportSettings()
    serve: ServeSettings = ServeSettings()

    @model_validator(mode="after")
    def _check_cross_fields(self) -> Settings:
        if self.model.proj_dim > 4096 or self.model.embed_dim > 4096:
            raise ValueError("model dimensions above 4096 are not supported")
        if problem := eviction_target_problem(self.bank, self.eval):
            raise ValueError(problem)
        return self

    @property
    def learner_name(self) -> str:
        return self.learner.name or self.train.objective

    @property
    def group_id(self) -> str:
        return self.consumer.group_id or f"{self.kafka.topic_prefix}.learner.{self.learner_name}"

    @property
    def checkpoint_dir(self) -> Path:
        return self.checkpoint.dir / self.learner_name

    def redacted(self) -> dict[str, Any]:
        """A dump safe for logs: SecretStr fields and passwords inside URLs print as MASK."""
        return dict(redact_tree(self.model_dump(mode="json")))


def _secret_keys(model: type[BaseModel], prefix: str = "") -> frozenset[str]:
    """Dotted names of every ``SecretStr`` field under ``model``."""
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys |= _secret_keys(annotation, f"{prefix}{name}.")
        elif "SecretStr" in str(annotation):
            keys.add(f"{prefix}{name}")
    return frozenset(keys)


_SECRET_KEYS = _secret_keys(Settings)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted!r}: cannot set a key below the scalar {part!r}")
        node = child
    node[parts[-1]] = value


def _parse_scalar(dotted: str, raw: str) -> Any:
    try:
        return load_yaml(raw)
    except DuplicateKeyError as exc:
        raise ConfigError(f"{dotted}: {exc.problem}") from None
    except yaml.YAMLError:
        return raw


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for item in err.errors():
        # repr()'s escaping keeps a key with a newline on the one error line.
        key = repr(".".join(str(p) for p in item["loc"]))[1:-1] or "<root>"
        if item["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
        else:
            got = item.get("input")
            if isinstance(got, dict):
                shown = ""
            elif key in _SECRET_KEYS:  # a bad password is still a password
                shown = " (value hidden)"
            else:
                shown = f" (got {redact_tree(got)!r})"
            lines.append(f"{source}: {key}: {item['msg']}{shown}")
    return "; ".join(lines)


def load_settings(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build settings from a YAML file, then environment, then ``key=value`` overrides."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        try:
            loaded = load_yaml(text)
        except DuplicateKeyError as exc:
            line = exc.problem_mark.line + 1 if exc.problem_mark else "?"
            raise ConfigError(f"{path}: line {line}: {exc.problem}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = loaded
    env = os.environ if environ is None else environ
    for name, raw in sorted(env.items()):
        if name.startswith(ENV_PREFIX):
            dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".")
            _set_dotted(tree, dotted, _parse_scalar(dotted, raw))
            source = f"{source} + environment"
    if overrides:
        source = f"{source} + --set"
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected section.key=value")
        _set_dotted(tree, key.strip(), _parse_scalar(key.strip(), raw))
    try:
        return Settings.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None
