"""The model bundle: a folder with ``model.safetensors`` and ``manifest.json``.

Loading a bundle executes no code: the weights are read with safetensors (a JSON header and
raw little-endian tensor bytes; unlike a pickle, nothing in the file can run), the manifest
with ``json``. ``manifest["digest"]`` is the SHA-256 of the manifest without that field
(canonical JSON: sorted keys, no spaces) followed by the weights file's bytes, so any change
to either file (a torn copy, a flipped byte, an edited label) is detected at load.

Tensors in ``model.safetensors``: ``model.<name>`` for every entry of the network's
``state_dict`` (encoder, projection, CE head) and ``ncm.prototypes``, the ``[k, embed_dim]``
rows of the nearest-class-mean classifier, row ``i`` for the class
``manifest["prototypes"]["classes"][i]``: L2-normalised class means read by cosine, or, with
``ncm.bias`` ``[k]`` beside them (format version 2, ``manifest["prototypes"]["bias"]``), the
weights of the linear discriminant the learner reads its class means through
(``eval.covariance_shrinkage``), a row's score ``e . row + bias`` for the unit embedding
``e``. Version 1 bundles (no bias) still load. The manifest fields are documented in
docs/serving.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.serving.exceptions import BundleError

FORMAT = "supcon-stream-bundle"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 2 added the optional ncm.bias
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
MODEL_PREFIX = "model."
PROTOTYPES = "ncm.prototypes"
PROTOTYPE_BIAS = "ncm.bias"
CLASSIFIERS = ("ncm", "head")
REQUIRED = ("format", "format_version", "version", "model", "classifier", "labels", "digest")


@dataclass(frozen=True)
class Bundle:
    """A bundle read and verified by :func:`read_bundle`."""

    path: Path
    manifest: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def digest(self) -> str:
        return str(self.manifest["digest"])

    def model_state(self) -> dict[str, torch.Tensor]:
        n = len(MODEL_PREFIX)
        return {k[n:]: v for k, v in self.tensors.items() if k.startswith(MODEL_PREFIX)}


def canonical_json(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def content_digest(manifest: dict[str, Any], weights: bytes) -> str:
    """``sha256:<hex>`` of the manifest without its ``digest`` field, then the weights."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    h = hashlib.sha256(canonical_json(body))
    h.update(b"\0")
    h.update(weights)
    return f"sha256:{h.hexdigest()}"


def write_bundle(
    directory: Path, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> str:
    """Write both files into ``directory`` (created, must be empty) and fsync them.

    ``manifest`` gets its ``format``, ``format_version``, ``weights`` and ``digest`` fields
    here; the digest is returned. Publication (an atomic rename into the registry) is the
    caller's: see :func:`pipeline.serving.registry.publish`.
    """
    from safetensors.torch import save

    directory.mkdir(parents=True, exist_ok=False)
    weights = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    full = {
        **manifest,
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "weights": {
            "file": WEIGHTS,
            "tensors": {k: list(v.shape) for k, v in sorted(tensors.items())},
        },
    }
    full["digest"] = content_digest(full, weights)
    _write_synced(directory / WEIGHTS, weights)
    _write_synced(directory / MANIFEST, json.dumps(full, indent=2, sort_keys=True).encode())
    return str(full["digest"])


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of a bundle folder, checked for format and required fields (not digest)."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise BundleError(f"{directory} is not a model bundle: no {MANIFEST}") from None
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        readable = ", ".join(map(str, READABLE_VERSIONS))
        raise BundleError(
            f"{path}: bundle format version {manifest.get('format_version')!r} is not "
            f"supported (this code reads versions {readable})"
        )
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise BundleError(f"{path}: manifest lacks {', '.join(missing)}")
    if manifest["classifier"] not in CLASSIFIERS:
        raise BundleError(f"{path}: unknown classifier {manifest['classifier']!r}")
    return manifest


def read_bundle(directory: str | Path) -> Bundle:
    """Read and verify a bundle: format, digest, tensors. Raises :class:`BundleError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    directory = Path(directory)
    manifest = read_manifest(directory)
    try:
        weights = (directory / WEIGHTS).read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read {directory / WEIGHTS}: {exc.strerror or exc}") from exc
    try:
        digest = content_digest(manifest, weights)
    except ValueError as exc:  # a non-finite number slipped into an edited manifest
        raise BundleError(f"{directory / MANIFEST}: {exc}") from exc
    if digest != manifest["digest"]:
        raise BundleError(
            f"{directory}: content digest mismatch (manifest says {manifest['digest']}, "
            f"files hash to {digest}): the bundle is corrupt or was modified"
        )
    try:
        tensors = load(weights)
    except (SafetensorError, ValueError) as exc:
        raise BundleError(f"{directory / WEIGHTS} is not a safetensors file: {exc}") from exc
    return Bundle(directory, manifest, tensors)
