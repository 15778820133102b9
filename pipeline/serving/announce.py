"""The ``<prefix>.models`` announcement: "learner L published bundle version V".

JSON, keyed by the learner name (so one learner's announcements stay in order on one
partition)::

    {"learner": "supcon", "version": 7, "digest": "sha256:...", "step": 1200,
     "bundle": "v000007", "ts": 1764500000000}

A reader never trusts a path from the wire: it looks ``bundle`` up in its own registry
folder (the learner's ``export.dir`` may be mounted elsewhere) and verifies the digest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pipeline.serving.registry import Published


@dataclass(frozen=True)
class Announcement:
    learner: str
    version: int
    digest: str
    step: int | None = None


def announcement(learner: str, published: Published) -> dict[str, Any]:
    return {
        "learner": learner,
        "version": published.version,
        "digest": published.digest,
        "step": published.step,
        "bundle": published.path.name,
        "ts": int(time.time() * 1000),
    }


def parse_announcement(payload: object) -> Announcement | None:
    """The announcement in a decoded JSON value, or None when it is not one."""
    if not isinstance(payload, dict):
        return None
    learner, version, digest = payload.get("learner"), payload.get("version"), payload.get("digest")
    if not isinstance(learner, str) or type(version) is not int or not isinstance(digest, str):
        return None
    step = payload.get("step")
    return Announcement(learner, version, digest, step if type(step) is int else None)
