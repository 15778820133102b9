"""Kafka side of supcon-stream: event decoding, dead letters, micro-batching, producers."""
