"""What crosses from the learner to the sidecar: typed ``records`` over a Redis-stream ``channel``.

Torch-free: the writer runs in the learner, the reader in the sidecar.
"""
