"""The sidecar process: telemetry from Redis in, rolling loss and forgetting to Kafka out.

``service`` (the loop, back-off, cursor), ``state`` (pure per-learner aggregation),
``sink`` (the Kafka publisher). Loads no torch (import-linter and a /proc/PID/maps test).
"""
