"""supcon-stream pipeline: composes the Kafka source and the memory bank and owns the learning."""

__version__ = "0.1.0"
