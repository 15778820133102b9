"""The learner's network: input standardisation, an MLP encoder, a projection head for SupCon
and a CE head.

Inputs are standardised per feature with running statistics of the training events
(:mod:`pipeline.learning.standardise`, ``model.standardize``); augmentation is applied to the
standardised features, so its noise and masking are relative to each feature's own scale.

SCR-style inference uses the encoder output (``embed``), not the projection; the projection
exists only for the contrastive loss. The CE head is pre-allocated for ``max_classes`` so new
labels need no re-allocation; unseen classes are masked in the loss and at prediction time.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from pipeline.config import ModelSettings
from pipeline.learning.standardise import RunningStandardiser


class StreamNet(nn.Module):
    input_gain: torch.Tensor

    def __init__(self, cfg: ModelSettings) -> None:
        super().__init__()
        self.standardize = cfg.standardize
        self.standardiser = RunningStandardiser(cfg.input_dim)
        first = nn.Linear(cfg.input_dim, cfg.hidden_dim)
        self.encoder = nn.Sequential(
            first,
            nn.ReLU(inplace=True),
            nn.Linear(cfg.hidden_dim, cfg.embed_dim),
        )
        # The input layer computes W' (gain · z), W' initialised to W / gain: the same function
        # at the start, but Adam's step on W' (invariant to the gradient's scale) moves the
        # effective weight gain · W' by gain × lr, as per-layer rates of lr × 64 / input_dim
        # would (model.reference_input_dim; docs/forgetting.md, "Inputs of any width").
        gain = cfg.input_gain
        self.register_buffer("input_gain", torch.tensor(gain, dtype=torch.float32))
        if gain != 1.0:
            with torch.no_grad():
                first.weight.div_(gain)
        self._register_load_state_dict_pre_hook(self._fill_missing_gain)
        self.projection = nn.Sequential(
            nn.Linear(cfg.embed_dim, cfg.embed_dim),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.embed_dim, cfg.proj_dim),
        )
        self.head = nn.Linear(cfg.embed_dim, cfg.max_classes)

    def observe(self, x: torch.Tensor) -> None:
        """Fold training inputs ``[n, input_dim]`` into the standardisation statistics."""
        if self.standardize:
            self.standardiser.update(x)

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """Raw features to the network's input scale (identity until something is observed)."""
        return self.standardiser(x)

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Encoder output of already standardised (and perhaps augmented) inputs."""
        return self.encoder(z * self.input_gain)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder output (the representation used by NCM / kNN and stored in the bank)."""
        return self.encode(self.standardise(x))

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """L2-normalised projection of encoder outputs, the space SupCon contrasts in."""
        return F.normalize(self.projection(h), dim=-1)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h)

    def _fill_missing_gain(self, state_dict: dict[str, Any], prefix: str, *_args: Any) -> None:
        """A state saved before the input layer had a gain holds a plain layer: gain 1."""
        state_dict.setdefault(prefix + "input_gain", torch.ones_like(self.input_gain))


def augment(
    x: torch.Tensor, noise_std: float, mask_prob: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One stochastic view of tabular features: random feature masking plus Gaussian noise.

    Image augmentations (crops, flips) do not apply to feature vectors; masking and noise are
    the tabular analogues used for contrastive views. Applied to *standardised* features,
    ``noise_std`` is a fraction of each feature's standard deviation and a masked feature
    takes its running mean (0).
    """
    out = x
    if mask_prob > 0:
        keep = torch.rand(x.shape, device=x.device, generator=generator) >= mask_prob
        out = out * keep
    if noise_std > 0:
        out = out + noise_std * torch.randn(x.shape, device=x.device, generator=generator)
    return out
