"""Per-case classification (e.g. benign/malignant, paper III.C and Tables III, IV) on the CSM encoder.

:class:`CSMClassificationNetwork` is the fine-tuning encoder of :class:`csm_nnunet.segmentation.SeriesTokenEncoder`
(so :mod:`csm_nnunet.adapt` loads CSM/MAE pretraining checkpoints into it exactly as into the segmentation network),
followed by a masked mean over the tokens of the present series, a LayerNorm and a linear head. Mean pooling is what
MAE fine-tuning uses for classification; it weighs every present token equally, so a case with a missing series is
the mean over the tokens it has, never over zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from csm_nnunet.network import ViTPreset
from csm_nnunet.segmentation import SeriesTokenEncoder


class CSMClassificationNetwork(SeriesTokenEncoder):
    """Series-tokenized ViT encoder + masked mean pooling + linear head.

    ``x [B, S, X, Y, Z]`` (one channel per series; ``present [B, S]`` optional, default: a series is absent when its
    channel is all zero while another is not) -> logits ``[B, num_classes]``.

    Args:
        num_classes: number of classes (>= 2).
        dropout: dropout before the head (0 by default; small datasets may want 0.1-0.3).
        Other arguments as :class:`~csm_nnunet.segmentation.SeriesTokenEncoder`.
    """

    def __init__(self, num_series: int, num_classes: int, patch_size: Sequence[int], preset: str | ViTPreset = "B16",
                 token_size: int | None = None, series_names: Sequence[str] | None = None,
                 fused_tokens: bool = False, dropout: float = 0.0):
        super().__init__(num_series, patch_size, preset, token_size, series_names, fused_tokens)
        self.num_classes = int(num_classes)
        if self.num_classes < 2:
            raise ValueError(f"a classifier needs >= 2 classes, got num_classes={num_classes}")
        D = self.preset.embed_dim
        self.head_norm = nn.LayerNorm(D)
        self.head_drop = nn.Dropout(float(dropout))
        self.head = nn.Linear(D, self.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)  # small logits at the start: the loss starts near log(K)
        nn.init.zeros_(self.head.bias)

    def pooled_features(self, x: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, D]``: the mean of the encoder's output tokens over every patch of the present series."""
        x, _, groups = self._prepare_inputs(x, present)
        tokens = self.forward_encoder(x, groups, (self.preset.depth,))[0]  # [B, G, N, D], zeros at absent series
        weight = groups.to(tokens.dtype)[:, :, None, None]
        count = weight.sum(1) * self.num_patches  # [B, 1, 1]
        return (tokens * weight).sum((1, 2)) / count.reshape(-1, 1)

    def forward(self, x: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.head_drop(self.head_norm(self.pooled_features(x, present))))
