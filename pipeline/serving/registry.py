"""A model registry folder: one sub-folder per bundle version, ``v000001``, ``v000002``, ...

Publication is atomic: a bundle is written into a hidden ``.tmp-*`` folder and renamed to
its version; a rename onto an existing version fails, so two exporters (the learner's
automatic export and an ``export`` command) never overwrite each other: the loser takes the
next number. Readers list only ``v<digits>`` folders, so they never see a half-written bundle.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch

from pipeline.serving.bundle import MANIFEST, Bundle, read_bundle, write_bundle
from pipeline.serving.exceptions import BundleError

log = structlog.get_logger(__name__)

_VERSION = re.compile(r"^v(\d{6,})$")
_PUBLISH_ATTEMPTS = 20


@dataclass(frozen=True)
class Published:
    version: int
    path: Path
    digest: str
    step: int = 0


def version_dir(registry: Path, version: int) -> Path:
    return registry / f"v{version:06d}"


def versions(registry: Path) -> list[tuple[int, Path]]:
    """(version, folder) of every published bundle, newest first."""
    if not registry.is_dir():
        return []
    found = []
    for child in registry.iterdir():
        m = _VERSION.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found, reverse=True)


def publish(
    registry: Path, manifest: dict[str, Any], tensors: dict[str, torch.Tensor], keep: int
) -> Published:
    """Write the bundle as the next version of ``registry``; keep the newest ``keep``."""
    registry.mkdir(parents=True, exist_ok=True)
    for _ in range(_PUBLISH_ATTEMPTS):
        existing = versions(registry)
        version = existing[0][0] + 1 if existing else 1
        tmp = registry / f".tmp-{uuid.uuid4().hex}"
        try:
            digest = write_bundle(tmp, {**manifest, "version": version}, tensors)
            target = version_dir(registry, version)
            try:
                os.rename(tmp, target)  # fails if another exporter took this number
            except OSError:
                continue
            _fsync_dir(registry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        prune(registry, keep)
        return Published(version, target, digest, int(manifest.get("step") or 0))
    raise BundleError(f"could not publish a bundle in {registry}: versions kept colliding")


def prune(registry: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` versions (a serving process holds its model in
    memory, so deleting the folder it loaded from does not disturb it)."""
    removed = []
    for _, path in versions(registry)[keep:]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def newest_loadable(registry: Path, newer_than: int = 0) -> Bundle | None:
    """The newest version above ``newer_than`` that loads and verifies, or None.

    A version that fails (corrupt, incompatible) is logged once here and skipped.
    """
    for version, path in versions(registry):
        if version <= newer_than:
            return None
        try:
            return read_bundle(path)
        except BundleError as exc:
            log.warning("model bundle rejected", version=version, error=str(exc))
    return None


def resolve(path: str | Path) -> Bundle:
    """A bundle folder, or a registry folder (its newest loadable version)."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return read_bundle(path)
    if not path.is_dir():
        raise BundleError(f"no model bundle or registry at {path}")
    bundle = newest_loadable(path)
    if bundle is None:
        raise BundleError(f"{path} holds no loadable model bundle")
    return bundle


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
