"""Cross-series masking (paper section III.B, Fig. 3).

A case with ``S`` series, each cut into ``N`` patches, has ``S x N`` tokens indexed ``(series, patch)``.
Two masks are combined:

* **intra-series masking** -- every shown series keeps its own random ``(1 - mask_ratio)`` share of patches,
  drawn independently per series, so a region hidden in one series is often visible in another (the
  cross-series signal). ``same_position=True`` is the paper's "Random patch-mask x" ablation: one patch
  mask shared by all series of a case.
* **inter-series masking** -- ``k ~ U{1, s-1}`` whole series of the ``s`` present series are hidden
  (mask ratio 100%); they are reconstructed (``"reconstruct"``, the paper's check mark), hidden but not
  scored (``"no_reconstruct"``, the paper's circle) or never hidden (``"off"``, the paper's cross).

Absent series (``present`` False: a missing acquisition) are never visible and never scored.
The masker is pure tensor code: no nnU-Net, no network, so its invariants are unit-testable.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass

import torch

SERIES_MASKING_MODES = ("reconstruct", "no_reconstruct", "off")


@dataclass
class SeriesMask:
    """Result of one draw of :class:`CrossSeriesMasker`; every tensor is boolean.

    Attributes:
        visible: ``[B, S, N]`` tokens fed to the encoder.
        scored: ``[B, S, N]`` tokens whose reconstruction enters the loss (never visible, never absent).
        hidden_series: ``[B, S]`` series hidden whole by inter-series masking.
        present: ``[B, S]`` series that exist in the case.
    """

    visible: torch.Tensor
    scored: torch.Tensor
    hidden_series: torch.Tensor
    present: torch.Tensor

    def to(self, device: torch.device | str) -> SeriesMask:
        return SeriesMask(*(t.to(device) for t in (self.visible, self.scored, self.hidden_series, self.present)))


TRAIN_STREAM = 0
VALIDATION_STREAM = 1


def mask_seed(seed: int, epoch: int, stream: int, rank: int) -> int:
    """Seed of the mask generator for one (seed, epoch, stream, rank): the masks of a run are then a function of
    these four numbers alone, so ``--c`` redraws the masks an interrupted epoch would have used, and DDP ranks draw
    different masks instead of hiding the same tokens on every GPU.

    A cryptographic digest of the decimal numbers rather than ``hash()``: ``hash`` of an int tuple is deterministic
    within one CPython build, but its algorithm is an implementation detail that has changed between versions, and a
    resumed run may well use another interpreter. Returns an int in ``[0, 2**63)`` (valid for ``manual_seed``).
    """
    key = ",".join(str(int(v)) for v in (seed, epoch, stream, rank)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Patches left visible in a shown series: at least one, so every shown series contributes a token."""
    return max(1, int(round(num_patches * (1.0 - mask_ratio))))


class CrossSeriesMasker:
    """Draws cross-series masks for a batch.

    Args:
        mask_ratio: share of each shown series' patches that is hidden (paper default 0.875).
        series_masking: ``"reconstruct"``, ``"no_reconstruct"`` or ``"off"`` (see module docstring).
        same_position: share one patch mask across the series of a case (ablation).
    """

    def __init__(self, mask_ratio: float = 0.875, series_masking: str = "reconstruct", same_position: bool = False):
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}: a ratio of 1 leaves the encoder nothing")
        if series_masking not in SERIES_MASKING_MODES:
            raise ValueError(f"series_masking must be one of {SERIES_MASKING_MODES}, got {series_masking!r}")
        self.mask_ratio = float(mask_ratio)
        self.series_masking = series_masking
        self.same_position = bool(same_position)
        self._warned_single_series = False

    def __repr__(self) -> str:
        return (f"CrossSeriesMasker(mask_ratio={self.mask_ratio}, series_masking={self.series_masking!r}, "
                f"same_position={self.same_position})")

    def __call__(self, batch_size: int, num_series: int, num_patches: int, present: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, device: torch.device | str | None = None) -> SeriesMask:
        """Draw masks for ``batch_size`` cases of ``num_series`` series with ``num_patches`` patches each.

        ``present`` is ``[B, S]`` bool (default: all present). Random numbers come from ``generator`` (on the CPU,
        so a seed gives the same masks on every device); the result is moved to ``device``.
        """
        B, S, N = int(batch_size), int(num_series), int(num_patches)
        if B < 1 or S < 1 or N < 1:
            raise ValueError(f"batch_size, num_series and num_patches must be >= 1, got {B}, {S}, {N}")
        if present is None:
            present = torch.ones(B, S, dtype=torch.bool)
        present = present.detach().to("cpu", torch.bool)
        if tuple(present.shape) != (B, S):
            raise ValueError(f"present must have shape [B, S] = [{B}, {S}], got {list(present.shape)}")
        if S == 1 and self.series_masking != "off" and not self._warned_single_series:
            warnings.warn("CrossSeriesMasker: the data has a single series, so inter-series masking cannot hide one; "
                          "only intra-series masking is applied (plain MAE).", stacklevel=2)
            self._warned_single_series = True

        # Inter-series masking: rank the present series by noise and hide the k lowest, k ~ U{1, s-1}.
        num_present = present.sum(1)
        hidden_series = torch.zeros(B, S, dtype=torch.bool)
        if self.series_masking != "off" and S > 1:
            u = torch.rand(B, generator=generator)
            k = torch.where(num_present >= 2, (u * (num_present - 1).clamp(min=1)).floor().long() + 1,
                            torch.zeros_like(num_present))
            series_noise = torch.rand(B, S, generator=generator).masked_fill(~present, math.inf)
            series_rank = series_noise.argsort(1).argsort(1)
            hidden_series = (series_rank < k[:, None]) & present
        shown = present & ~hidden_series

        # Intra-series masking: keep the n lowest-noise patches of each series (one noise per case if same_position).
        n_keep = num_kept(N, self.mask_ratio)
        noise = torch.rand(B, 1 if self.same_position else S, N, generator=generator).expand(B, S, N)
        keep = noise.argsort(2).argsort(2) < n_keep

        visible = keep & shown[:, :, None]
        scored = ~keep & shown[:, :, None]
        if self.series_masking == "reconstruct":
            scored = scored | hidden_series[:, :, None].expand(B, S, N)
        mask = SeriesMask(visible=visible, scored=scored, hidden_series=hidden_series, present=present)
        return mask.to(device) if device is not None else mask
