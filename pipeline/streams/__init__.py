"""Event streams for Kafka: built-in ``scenarios``, labeled ``files``, and ``playback``.

Playback is the producer behind ``supcon-stream replay``; in the code, "replay" means
memory replay only.
"""
