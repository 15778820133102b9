"""Errors raised by the pipeline. Bad payloads are data (dead letters), not exceptions."""


class SupconStreamError(Exception):
    """Root of the pipeline's errors; the CLI prints one clear line and exits 1
    (2 for configuration and usage errors)."""


class ConfigError(SupconStreamError):
    """A configuration file, environment override or CLI value is invalid."""


class CheckpointError(SupconStreamError):
    """A checkpoint could not be written or none of the existing ones could be loaded."""


class DevstackError(SupconStreamError):
    """The embedded broker or redis-server could not be started, found or stopped."""
