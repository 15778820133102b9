"""Errors of the serving room."""

from pipeline.exceptions import SupconStreamError


class BundleError(SupconStreamError):
    """A model bundle is missing, corrupt (digest mismatch, unreadable file) or incompatible
    (unknown format, a model that does not fit its manifest)."""
