"""Data-parallel training across the learner's consumer group on ``torch.distributed``.

``group`` (the rank of this process from torchrun's environment, the process group, the few
collectives the learner uses, the model digest) and ``replicas`` (the DDP module that
all-reduces gradients every step). Only a learner started with ``WORLD_SIZE`` > 1 imports
anything here; a single learner never initialises ``torch.distributed``.
"""
