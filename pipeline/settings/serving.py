"""The ``export`` and ``serve`` sections of the settings .

Both are part of :class:`pipeline.config.Settings`; see docs/serving.md for how they are used.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from pipeline.settings.frozen import Frozen as _Frozen


class ExportSettings(_Frozen):
    every_checkpoints: int = Field(
        0,
        ge=0,
        description="Export a model bundle after every N-th durable checkpoint (0 = never) "
        "and announce it on <prefix>.models.",
    )
    dir: Path = Field(
        Path("runs/models"),
        description="Model registry: bundles go to <dir>/<learner name>/v<version>.",
    )
    keep: int = Field(5, ge=1, description="Bundles kept per learner; older ones are deleted.")


class ServeSettings(_Frozen):
    learner: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="Whose bundles to serve (<export.dir>/<learner>); defaults to "
        "learner.name, then the objective.",
    )
    model_dir: Path | None = Field(
        None,
        description="Registry folder to serve from, instead of <export.dir>/<learner>; a "
        "bundle folder (v000004) pins that version and announcements are ignored.",
    )
    group_id: str | None = Field(
        None, description="Consumer group; defaults to '<prefix>.serve.<learner>'."
    )
    input_topic: str | None = Field(
        None, description="Topic of the events to answer; defaults to <prefix>.events."
    )
    answer_labeled: bool = Field(
        False,
        description="Also answer events that carry a label (a requests topic); by default "
        "labeled events are the learner's and are only counted.",
    )
    wait_for_model_s: float = Field(
        300.0, ge=0, description="How long to wait at start for a first loadable bundle."
    )
    http_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Serve GET /metrics and /healthz on <http_host>:<port>; 0 = any port.",
    )
    http_host: str = "127.0.0.1"
