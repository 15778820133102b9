"""Errors of the Kafka side. Malformed events are not errors: they become dead letters."""


class ConsumerError(Exception):
    """Root of the errors raised by ``consumers``."""


class SourceClosedError(ConsumerError):
    """The source was stopped, or its consumer thread died (the cause is chained)."""


class BrokerUnavailableError(ConsumerError):
    """The broker could not be reached within the configured time."""


class ProducerError(ConsumerError):
    """Records could not be delivered, even after recreating the producer once.

    The undelivered records stay queued in the :class:`~consumers.producer.JsonProducer`; the
    next ``flush`` tries them again.
    """
