"""Errors of the Kafka side. Malformed events are not errors: they become dead letters."""


class ConsumerError(Exception):
    """Root of the errors raised by ``consumers``."""


class SourceClosedError(ConsumerError):
    """The source was stopped, or its consumer thread died (the cause is chained)."""


class BrokerUnavailableError(ConsumerError):
    """The broker could not be reached within the configured time."""
