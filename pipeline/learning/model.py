"""The learner's network: an MLP encoder, a projection head for SupCon and a CE head.

SCR-style inference uses the encoder output (``embed``), not the projection; the projection
exists only for the contrastive loss. The CE head is pre-allocated for ``max_classes`` so new
labels need no re-allocation; unseen classes are masked in the loss and at prediction time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from pipeline.config import ModelSettings


class StreamNet(nn.Module):
    def __init__(self, cfg: ModelSettings) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(cfg.input_dim, cfg.hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.hidden_dim, cfg.embed_dim),
        )
        self.projection = nn.Sequential(
            nn.Linear(cfg.embed_dim, cfg.embed_dim),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.embed_dim, cfg.proj_dim),
        )
        self.head = nn.Linear(cfg.embed_dim, cfg.max_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder output (the representation used by NCM / kNN and stored in the bank)."""
        return self.encoder(x)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """L2-normalised projection of encoder outputs, the space SupCon contrasts in."""
        return F.normalize(self.projection(h), dim=-1)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h)


def augment(
    x: torch.Tensor, noise_std: float, mask_prob: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One stochastic view of tabular features: random feature masking plus Gaussian noise.

    Image augmentations (crops, flips) do not apply to feature vectors; masking and noise are
    the tabular analogues used for contrastive views.
    """
    out = x
    if mask_prob > 0:
        keep = torch.rand(x.shape, device=x.device, generator=generator) >= mask_prob
        out = out * keep
    if noise_std > 0:
        out = out + noise_std * torch.randn(x.shape, device=x.device, generator=generator)
    return out
