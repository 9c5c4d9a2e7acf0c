"""Segmentation fine-tuning network for a CSM-pretrained series-tokenized ViT encoder (paper section III.C).

The encoder is the pretraining encoder of :class:`csm_nnunet.network.CSMMaskedAutoencoder` with the same parameter
names and shapes (``patch_embed_weight [S, D, t^3]``, ``patch_embed_bias [S, D]``, ``series_embed [S, D]``,
``eva.*``), so pretrained weights copy key by key (:mod:`csm_nnunet.adapt`). A token is one ``t^3`` patch of one
series; every patch of every *present* series is encoded and the tokens of absent series are dropped (a case with
fewer series is padded and the padding hidden from attention, as in pretraining), so a missing acquisition never
feeds zeros into the transformer.

Data flow for ``x [B, S, X, Y, Z]`` on a ``g = (gx, gy, gz)`` token grid (``N = gx*gy*gz``):

1. encoder: ``[B, L, D]`` tokens (``L`` = most present tokens of any case); hidden states are tapped at ``u``
   evenly spaced depths (``u = log2(t)``: 4 for 16^3 tokens, 3 for the Primus 8^3 tokens; the last tap after
   ``eva.norm``) and scattered back to ``[B, S, N, D]`` (zeros at absent series).
2. series fusion per tap, per grid position: :class:`AttentionSeriesFusion` (default) or :class:`ConcatSeriesFusion`
   -> ``[B, D, gx, gy, gz]``. Averaging series tokens loses what makes the series different (a prototype that did
   so lost clearly to a channel-fused ViT), so both fusions keep per-series projections.
3. UNETR-style decoder (:class:`UNETRDecoder`): the deepest fused map is upsampled ``u`` times by transposed
   convolutions; the shallower taps reach the intermediate resolutions ``2^r * g`` through their own transposed
   convolutions; a convolutional branch on the full-resolution input supplies the finest skip. Conv blocks are
   nnU-Net's (Conv3d 3x3x3, InstanceNorm3d(affine), LeakyReLU 0.01).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn

from csm_nnunet.cuda_graphs import CudaGraphCache
from csm_nnunet.network import (
    ViTPreset,
    _build_eva,
    _padding_mask,
    gather_kept,
    get_preset,
    init_token_embedding,
    patchify_groups,
    rope_for,
)

#: State-dict keys (exact names) of the encoder that carry one row per series, matched by series name on adaptation.
PER_SERIES_ENCODER_KEYS: tuple[str, ...] = ("patch_embed_weight", "patch_embed_bias", "series_embed")
#: Prefix of the transformer's keys (dynamic-network-architectures ``Eva``; Primus' key names).
EVA_PREFIX = "eva."
FUSIONS = ("attention", "concat")
#: how a fusion normalises the encoder taps: per token over channels ("layer", LayerNorm) or per channel over the
#: patch positions of one case and series ("instance", :class:`TokenInstanceNorm`)
FUSION_NORMS = ("layer", "instance")
MAX_DECODER_CHANNELS = 320  # nnU-Net's feature cap for 3D networks


def is_encoder_key(key: str) -> bool:
    """Whether a state-dict key belongs to the (pretrainable) encoder rather than to fusion/decoder/heads."""
    return key in PER_SERIES_ENCODER_KEYS or key.startswith(EVA_PREFIX)


def infer_present(x: torch.Tensor) -> torch.Tensor:
    """``[B, S]`` presence from the input itself, for nnU-Net's predictor, which passes only image windows.

    Convention (README "Missing series"): a missing series is stored as an all-zero image, and nnU-Net's
    normalisation keeps it exactly zero. So within a window a series is absent when it is zero everywhere while
    another series is not. A window where every series is zero (outside a brain mask, say) keeps all series: there is
    nothing to tell them apart and nothing to drop.
    """
    nonzero = (x != 0).flatten(2).any(2)
    return nonzero | ~nonzero.any(1, keepdim=True)


class ConvBlock(nn.Sequential):
    """nnU-Net's conv-norm-nonlinearity unit: Conv3d 3x3x3 (padding 1) -> InstanceNorm3d(affine) -> LeakyReLU(0.01).
    ``[B, C_in, X, Y, Z] -> [B, C_out, X, Y, Z]``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.Conv3d(in_channels, out_channels, 3, padding=1),
                         nn.InstanceNorm3d(out_channels, eps=1e-5, affine=True),
                         nn.LeakyReLU(0.01, inplace=True))


class TokenInstanceNorm(nn.Module):
    """Standardise each channel over the patch positions of one case and series, then a per-channel affine:
    ``tokens [B, S, N, D]`` -> same shape. nnU-Net's InstanceNorm, applied to token maps.

    Why not LayerNorm: it divides every token by its own scale. Pretrained encoders put 76-89 % of their token
    variance on one axis (benchmarks/probe_encoder.py), and how far a token lies along that axis carries what a patch
    contains; per-token normalisation removes exactly that (a linear patch head on LayerNorm-ed CSM taps lost the
    enhancing compartment entirely, on the raw taps it kept it). Normalising a channel across positions keeps the
    differences between tokens. A series absent from a case has all-zero tokens and stays zero (before the affine),
    and the fusions ignore absent series anyway. Measured at the CPU scale of docs/experiments.md it is not better
    than LayerNorm overall (it helps CSM weights on the enhancing rim, hurts scratch), so it is an option, not the
    default."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens.float()
        mean = x.mean(2, keepdim=True)
        var = x.var(2, unbiased=False, keepdim=True)
        return ((x - mean) * torch.rsqrt(var + self.eps)).to(tokens.dtype) * self.weight + self.bias


def make_fusion_norm(kind: str, dim: int) -> nn.Module:
    """The normalisation a series fusion applies to its tap (see :data:`FUSION_NORMS`)."""
    if kind == "layer":
        return nn.LayerNorm(dim)
    if kind == "instance":
        return TokenInstanceNorm(dim)
    raise ValueError(f"fusion_norm must be one of {FUSION_NORMS}, got {kind!r}")


class AttentionSeriesFusion(nn.Module):
    """Attention pooling over the present series of each region.

    Per head, a learned query scores each series token with a *per-series* key projection; the pooled value is the
    attention-weighted sum of *per-series* value projections. Because every series has its own value projection,
    even uniform attention (the state at initialisation, the query starting near zero) is a concatenate-and-project
    of the series and not an average, so series-specific information survives; the learned weights then let a
    region lean on the series that show it best. Absent series get weight exactly 0 (masked before the softmax).

    ``tokens [B, S, N, D]`` (normalised here by ``norm``, since intermediate ViT states are unnormalised),
    ``present [B, S]`` -> ``[B, N, out_dim]``.
    """

    def __init__(self, num_series: int, dim: int, num_heads: int, out_dim: int, norm: str = "layer"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"fusion width {dim} is not divisible by its {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.norm = make_fusion_norm(norm, dim)
        self.query = nn.Parameter(torch.zeros(num_heads, self.head_dim))
        self.key_weight = nn.Parameter(torch.empty(num_series, dim, dim))
        self.key_bias = nn.Parameter(torch.zeros(num_series, dim))
        self.value_weight = nn.Parameter(torch.empty(num_series, dim, dim))
        self.value_bias = nn.Parameter(torch.zeros(num_series, dim))
        self.proj = nn.Linear(dim, out_dim)
        nn.init.normal_(self.query, std=0.02)
        for s in range(num_series):
            nn.init.xavier_uniform_(self.key_weight.data[s])
            nn.init.xavier_uniform_(self.value_weight.data[s])
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, tokens: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        B, S, N, D = tokens.shape
        h = self.norm(tokens)
        k = torch.einsum("bsnd,sed->bsne", h, self.key_weight) + self.key_bias[None, :, None]
        v = torch.einsum("bsnd,sed->bsne", h, self.value_weight) + self.value_bias[None, :, None]
        k = k.reshape(B, S, N, self.num_heads, self.head_dim)
        v = v.reshape(B, S, N, self.num_heads, self.head_dim)
        scores = (k * self.query.to(k.dtype)).sum(-1).float() / math.sqrt(self.head_dim)  # [B, S, N, H]
        scores = scores.masked_fill(~present[:, :, None, None], float("-inf"))
        weights = scores.softmax(dim=1).to(v.dtype)
        pooled = (weights[..., None] * v).sum(1)  # [B, N, H, hd]
        return self.proj(pooled.reshape(B, N, D))


class ConcatSeriesFusion(nn.Module):
    """Concatenate the ``S`` series tokens of a region in series order and project ``S*D -> out_dim``.

    An absent series' slot holds a learned per-series "absent" embedding instead of its token, so "series missing"
    is distinguishable from "series present with a zero feature". ``tokens [B, S, N, D]``, ``present [B, S]``
    -> ``[B, N, out_dim]``.
    """

    def __init__(self, num_series: int, dim: int, out_dim: int, norm: str = "layer"):
        super().__init__()
        self.norm = make_fusion_norm(norm, dim)
        self.absent_embed = nn.Parameter(torch.zeros(num_series, dim))
        self.proj = nn.Linear(num_series * dim, out_dim)
        nn.init.normal_(self.absent_embed, std=0.02)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, tokens: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        B, S, N, D = tokens.shape
        h = self.norm(tokens)
        h = torch.where(present[:, :, None, None], h, self.absent_embed[None, :, None].to(h.dtype))
        return self.proj(h.permute(0, 2, 1, 3).reshape(B, N, S * D))


class UNETRDecoder(nn.Module):
    """UNETR-style convolutional decoder from fused token maps to full resolution.

    Resolution level ``r`` is ``2^r`` times the token grid (level 0 = grid, level ``u`` = full resolution,
    ``u = log2(token_size)``); its width is ``min(base * 2^(u - r), 320)``.

    * ``bottom [B, D, *g]`` (deepest tap) is lifted level by level with ``ConvTranspose3d(k=2, s=2)``.
    * ``skips[r - 1] [B, D, *g]`` for ``r = 1 .. u-1`` (shallower taps for finer levels) reach level ``r`` through
      ``r`` steps of (transposed conv -> conv block) at the level's width.
    * ``image [B, C_in, X, Y, Z]`` feeds two conv blocks at full resolution (level ``u`` skip).
    * at every level: concat(upsampled, skip) -> two conv blocks; 1x1x1 segmentation heads per level.

    ``deep_supervision`` is an attribute (as in nnU-Net's ``UNetDecoder``; nnU-Net trainers toggle
    ``network.decoder.deep_supervision``). Output: ``[B, K, X, Y, Z]``, or with deep supervision a list of logits
    for levels ``u, u-1, .., 1`` (highest resolution first).
    """

    def __init__(self, embed_dim: int, image_channels: int, num_classes: int, num_levels: int,
                 base_channels: int = 32, deep_supervision: bool = False):
        super().__init__()
        u = num_levels
        self.num_levels = u
        self.deep_supervision = bool(deep_supervision)
        self.channels = [min(base_channels * 2 ** (u - r), MAX_DECODER_CHANNELS) for r in range(u + 1)]
        ch = self.channels
        self.skip_paths = nn.ModuleList()
        for r in range(1, u):
            steps: list[nn.Module] = []
            for j in range(r):
                steps += [nn.ConvTranspose3d(embed_dim if j == 0 else ch[r], ch[r], 2, stride=2),
                          ConvBlock(ch[r], ch[r])]
            self.skip_paths.append(nn.Sequential(*steps))
        self.image_branch = nn.Sequential(ConvBlock(image_channels, ch[u]), ConvBlock(ch[u], ch[u]))
        self.upsample = nn.ModuleList(nn.ConvTranspose3d(embed_dim if r == 1 else ch[r - 1], ch[r], 2, stride=2)
                                      for r in range(1, u + 1))
        self.stages = nn.ModuleList(nn.Sequential(ConvBlock(2 * ch[r], ch[r]), ConvBlock(ch[r], ch[r]))
                                    for r in range(1, u + 1))
        self.seg_heads = nn.ModuleList(nn.Conv3d(ch[r], num_classes, 1) for r in range(1, u + 1))
        for m in self.modules():
            if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):  # nnU-Net's InitWeights_He(1e-2)
                nn.init.kaiming_normal_(m.weight, a=1e-2)
                nn.init.zeros_(m.bias)

    def forward(self, bottom: torch.Tensor, skips: Sequence[torch.Tensor], image: torch.Tensor
                ) -> torch.Tensor | list[torch.Tensor]:
        u = self.num_levels
        if len(skips) != u - 1:
            raise ValueError(f"decoder expects {u - 1} skip maps, got {len(skips)}")
        y = bottom
        outputs = []
        for r in range(1, u + 1):
            y = self.upsample[r - 1](y)
            skip = self.skip_paths[r - 1](skips[r - 1]) if r < u else self.image_branch(image)
            y = self.stages[r - 1](torch.cat([y, skip], 1))
            if self.deep_supervision or r == u:
                outputs.append(self.seg_heads[r - 1](y))
        return outputs[::-1] if self.deep_supervision else outputs[0]


class SeriesTokenEncoder(nn.Module):
    """The fine-tuning encoder shared by segmentation and classification: the pretraining encoder of
    :class:`csm_nnunet.network.CSMMaskedAutoencoder` (same parameter names, shapes and initialisation) run on every
    token of the present series. Subclasses add their heads; :mod:`csm_nnunet.adapt` loads pretrained weights into any
    subclass.

    Args:
        num_series: input channels ``S`` (one series each).
        patch_size: spatial input size; each axis a positive multiple of the token size.
        preset: a name in :data:`csm_nnunet.network.PRESETS` or a :class:`ViTPreset` (must match the pretraining).
        token_size: overrides the preset's token edge (>= 8; a power of two where a decoder doubles resolution).
        series_names: optional channel names (checked to be unique, length ``S``; used to match pretrained series).
        fused_tokens: the channel-fused baseline: one token per patch carrying all series as channels (one
            projection ``[1, D, S*t^3]``), everything else identical. It cannot drop an absent series (its channels
            are zeros inside the token, the paper's zero-padding); it exists so series tokens can be compared with
            fused tokens at the same encoder width/depth and head.
        same_position_bias: add a learned per-block, per-head attention bias between the tokens of one position in
            different series (beyond the paper; fine-tuning networks only, off by default). Why: the encoders here
            attend almost uniformly after CSM pretraining and to one "sink" token after fine-tuning, never to the
            same position in another series (docs/experiments.md, "Where the series tokens look"), so a same-voxel
            contrast such as T1ce - T1 can only be combined after the encoder. It starts at ``log(N)`` (N token
            positions), where a query gives its position's other series together about as much attention as all
            other tokens, and learns from there. Costs a ``[B, heads, L, L]`` additive mask per block, which also
            keeps SDPA off its flash kernel on a GPU.
    """

    def __init__(self, num_series: int, patch_size: Sequence[int], preset: str | ViTPreset = "B16",
                 token_size: int | None = None, series_names: Sequence[str] | None = None,
                 fused_tokens: bool = False, power_of_two_tokens: bool = False, same_position_bias: bool = False):
        super().__init__()
        self.preset = get_preset(preset)
        self.num_series = int(num_series)
        if self.num_series < 1:
            raise ValueError(f"num_series must be >= 1, got {num_series}")
        self.series_names = None if series_names is None else [str(s) for s in series_names]
        if self.series_names is not None:
            if len(self.series_names) != self.num_series:
                raise ValueError(f"series_names has {len(self.series_names)} entries {self.series_names} but "
                                 f"num_series is {self.num_series}")
            if len(set(self.series_names)) != len(self.series_names):
                raise ValueError(f"series names must be unique, got {self.series_names}")
        self.token_size = int(token_size or self.preset.token_size)
        t = self.token_size
        if t < 8 or (power_of_two_tokens and t & (t - 1)):
            why = " and a power of two (the decoder doubles resolution per stage)" if power_of_two_tokens else ""
            raise ValueError(f"token_size must be >= 8{why}, got {t}")
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) != 3:
            raise ValueError(f"CSM networks are 3D; got patch size {self.patch_size}. Use a 3d_fullres configuration.")
        if any(p % t or p < t for p in self.patch_size):
            raise ValueError(f"patch size {self.patch_size} is not a positive multiple of the token size {t} on "
                             f"every axis")
        self.grid = tuple(p // t for p in self.patch_size)
        self.num_patches = int(math.prod(self.grid))
        self.fused_tokens = bool(fused_tokens)
        self.num_groups = 1 if self.fused_tokens else self.num_series  # token groups G
        p = self.preset
        D, S, G = p.embed_dim, self.num_series, self.num_groups
        self.patch_embed_weight = nn.Parameter(torch.empty(G, D, (S // G) * t ** 3))
        self.patch_embed_bias = nn.Parameter(torch.zeros(G, D))
        self.series_embed = nn.Parameter(torch.zeros(G, D))
        self.eva = _build_eva(p, D, p.depth, p.num_heads, self.grid, abs_pos=True)
        init_token_embedding(self.patch_embed_weight, self.series_embed, self.eva.pos_embed, self.grid)
        if same_position_bias and (self.fused_tokens or S < 2):
            raise ValueError("same_position_bias needs series tokens of >= 2 series: with "
                             f"{'fused tokens' if self.fused_tokens else 'one series'} no token has another series "
                             "at its position")
        # not an encoder key (is_encoder_key): a pretraining checkpoint has no such tensor, so it always starts fresh
        self.same_position_bias = nn.Parameter(torch.full((p.depth, p.num_heads), math.log(self.num_patches))) \
            if same_position_bias else None

    def encoder_state_keys(self) -> list[str]:
        """The state-dict keys that belong to the encoder (and can be loaded from a pretraining checkpoint)."""
        return [k for k in self.state_dict() if is_encoder_key(k)]

    def _check_inputs(self, x: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.num_series:
            raise ValueError(f"input must be [B, S={self.num_series}, X, Y, Z] (one channel per series"
                             f"{'' if self.series_names is None else ' ' + str(self.series_names)}), got "
                             f"{list(x.shape)}")
        if tuple(x.shape[2:]) != self.patch_size:
            raise ValueError(f"input spatial shape {tuple(x.shape[2:])} differs from the network patch size "
                             f"{self.patch_size} (the token grid and positional table are fixed at construction)")
        B = x.shape[0]
        if present is None:
            return infer_present(x)
        if tuple(present.shape) != (B, self.num_series):
            raise ValueError(f"present must have shape [B, S] = [{B}, {self.num_series}], got {list(present.shape)}")
        present = present.to(device=x.device, dtype=torch.bool)
        empty = (~present.any(1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"case(s) {empty} of the batch have no present series; nothing to predict from")
        return present

    def _prepare_inputs(self, x: torch.Tensor, present: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Check ``x``/``present`` (see :meth:`_check_inputs`), zero the absent series so their content never
        matters, and give the presence of the token groups: ``present [B, S]`` itself, or ``[B, 1]`` (any series
        present) with fused tokens. Returns ``(x, present, groups)``."""
        present = self._check_inputs(x, present)
        x = torch.where(present[:, :, None, None, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        groups = present.any(1, keepdim=True) if self.fused_tokens else present
        return x, present, groups

    # ---------------------------------------------------------------- forward
    def forward_encoder(self, x: torch.Tensor, present: torch.Tensor, tap_depths: Sequence[int],
                        compact: bool = True) -> list[torch.Tensor]:
        """Encode every patch of every present series of ``x [B, S, X, Y, Z]`` (absent channels already zeroed).

        Returns the hidden states after the blocks counted in ``tap_depths`` (the last block's after ``eva.norm``),
        each scattered back to ``[B, G, N, D]`` with zeros at absent series (``G = S``; ``G = 1`` with fused
        tokens, ``present [B, 1]``). Cases with fewer present series are padded to the longest token sequence ``L``
        and the padding is hidden from attention, so a case's result does not depend on the rest of the batch.

        ``compact=False`` gives the same result for the present tokens (to rounding) by another route: all ``G*N``
        tokens go through the transformer and the absent ones are only hidden from attention (as keys; their own
        outputs are discarded). Absent tokens then cost compute, but every shape is fixed by the input's shape and
        nothing waits on the GPU (the compact route reads the token count back to size its gather), which is what
        a captured CUDA graph needs (:meth:`CSMSegmentationNetwork.forward`).
        """
        B, S = x.shape[0], self.num_groups
        N, D = self.num_patches, self.preset.embed_dim
        patches = patchify_groups(x, S, self.token_size, self.grid)
        # per-series projection of every patch; absent rows are computed but dropped below (cheap next to attention)
        emb = torch.einsum("bsnp,sdp->bsnd", patches, self.patch_embed_weight) + self.patch_embed_bias[None, :, None]
        emb = emb + self.eva.pos_embed[0][None, None] + self.series_embed[None, :, None]
        emb = emb.reshape(B, S * N, D)
        keep = present[:, :, None].expand(B, S, N).reshape(B, S * N)
        if compact:
            token_ids, valid = gather_kept(keep)  # kept tokens first, in (series, patch) order
        else:  # every token in place; absent ones stay "invalid": hidden as keys, their outputs dropped
            token_ids, valid = torch.arange(S * N, device=x.device).expand(B, S * N), keep
        L = token_ids.shape[1]
        h = emb.gather(1, token_ids[..., None].expand(B, L, D))
        rope = rope_for(self.eva, token_ids % N)
        attn_mask = _padding_mask(valid, h.dtype, always=not compact)
        pairs = None  # [B, 1, L, L]: 1 where query and key are one position in two series (same_position_bias)
        if self.same_position_bias is not None:
            pos, series = token_ids % N, token_ids // N
            pairs = ((pos[:, :, None] == pos[:, None]) & (series[:, :, None] != series[:, None]))[:, None].to(h.dtype)
        # padded (or absent) slots scatter into a spare last slot that is dropped
        dest = torch.where(valid, token_ids, torch.full_like(token_ids, S * N))[..., None].expand(B, L, D)
        taps = []
        for depth, blk in enumerate(self.eva.blocks, start=1):
            mask = attn_mask
            if pairs is not None:
                bias = pairs * self.same_position_bias[depth - 1].to(h.dtype)[None, :, None, None]
                mask = bias if attn_mask is None else bias + attn_mask
            h = blk(h, rope=rope, attn_mask=mask)
            if depth in tap_depths:
                out = self.eva.norm(h) if depth == self.preset.depth else h
                full = out.new_zeros(B, S * N + 1, D).scatter(1, dest, out)[:, : S * N]
                taps.append(full.reshape(B, S, N, D))
        return taps


class CSMSegmentationNetwork(SeriesTokenEncoder):
    """Series-tokenized ViT encoder + per-region series fusion + UNETR-style decoder.

    Args:
        num_series: input channels ``S`` (one series each).
        num_classes: output logits channels (nnU-Net's label count, background included).
        patch_size: spatial input size; each axis a positive multiple of the token size. The token grid and the
            positional table are fixed to it (use :func:`csm_nnunet.adapt.adapt_encoder_state` to resample a
            pretrained table to another grid).
        preset: a name in :data:`csm_nnunet.network.PRESETS` or a :class:`ViTPreset` (must match the pretraining).
        token_size: overrides the preset's token edge; a power of two >= 8 (the decoder doubles resolution).
        fusion: ``"attention"`` (:class:`AttentionSeriesFusion`) or ``"concat"`` (:class:`ConcatSeriesFusion`).
        fusion_norm: how the fusions normalise the encoder taps, ``"layer"`` (per token) or ``"instance"`` (per
            channel over the patch positions, :class:`TokenInstanceNorm`).
        deep_supervision: return logits of every decoder level (highest resolution first), nnU-Net style.
        series_names: optional channel names (documentation for adaptation; checked to be unique, length ``S``).
        base_channels: decoder width at full resolution (doubled per coarser level, capped at 320); default: the
            preset's ``seg_channels`` (16, UNETR's feature size; 8 for ``tiny`` so CPU tests and demos stay fast).
        fused_tokens: the channel-fused baseline: one token per patch carrying all series as channels (one
            projection ``[1, D, S*t^3]``), everything else identical. It cannot drop an absent series (its channels
            are zeros inside the token, the paper's zero-padding); it exists so the series tokens are compared
            against fused tokens with the same encoder width/depth, fusion and decoder.
    """

    def __init__(self, num_series: int, num_classes: int, patch_size: Sequence[int], preset: str | ViTPreset = "B16",
                 token_size: int | None = None, fusion: str = "attention", deep_supervision: bool = False,
                 series_names: Sequence[str] | None = None, base_channels: int | None = None,
                 fused_tokens: bool = False, fusion_norm: str = "layer", same_position_bias: bool = False):
        super().__init__(num_series, patch_size, preset, token_size, series_names, fused_tokens,
                         power_of_two_tokens=True, same_position_bias=same_position_bias)
        self.num_classes = int(num_classes)
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.fusion_mode = fusion
        p = self.preset
        D, S, G = p.embed_dim, self.num_series, self.num_groups
        self.num_levels = int(math.log2(self.token_size))  # upsampling stages grid -> full resolution
        if p.depth < self.num_levels:
            raise ValueError(f"preset {p.name!r} has depth {p.depth} < {self.num_levels} decoder taps")
        # evenly spaced taps (block counts), e.g. depth 12 / token 16: 3, 6, 9, 12; token 8: 4, 8, 12
        self.tap_depths = tuple(round(k * p.depth / self.num_levels) for k in range(1, self.num_levels + 1))

        # fusion over the G token groups of a region (G = 1 for fused tokens: a learned projection of the one token)
        self.fusion_norm = fusion_norm  # checked by make_fusion_norm
        if fusion == "attention":
            self.fusions = nn.ModuleList(AttentionSeriesFusion(G, D, p.num_heads, D, fusion_norm)
                                         for _ in self.tap_depths)
        else:
            self.fusions = nn.ModuleList(ConcatSeriesFusion(G, D, D, fusion_norm) for _ in self.tap_depths)
        # the image branch sees the (absent-zeroed) series plus one presence indicator channel per series
        self.decoder = UNETRDecoder(D, 2 * S, self.num_classes, self.num_levels,
                                    base_channels or self.preset.seg_channels, deep_supervision)
        self._graphs = CudaGraphCache()

    #: replay CUDA graphs in eval forwards on a GPU (see :meth:`forward`); set False on an instance or subclass
    #: to run eagerly (the outputs are the same to floating-point rounding)
    cuda_graphs: bool = True

    def train(self, mode: bool = True) -> CSMSegmentationNetwork:
        if mode and hasattr(self, "_graphs"):  # free the graphs' activation memory for training
            self._graphs.clear()
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        """``.to()``/``.cuda()``/``.half()``: drop the graphs if a parameter or buffer moved (the graphs read them by
        address). A move to where they already are keeps them: nnU-Net's predictor calls ``network.to(device)``
        before every case, and re-capturing per case cost about as much as the case itself."""
        before = self._tensor_addresses()
        out = super()._apply(fn, recurse)
        if hasattr(self, "_graphs") and self._tensor_addresses() != before:
            self._graphs.clear()
        return out

    def _tensor_addresses(self) -> tuple[tuple[str, int, torch.dtype], ...]:
        return tuple((str(t.device), t.data_ptr(), t.dtype)
                     for t in itertools.chain(self.parameters(), self.buffers()))

    # ---------------------------------------------------------------- helpers
    @property
    def deep_supervision(self) -> bool:
        return self.decoder.deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, enabled: bool) -> None:
        self.decoder.deep_supervision = bool(enabled)

    def deep_supervision_scales(self) -> list[list[float]]:
        """Per-axis scale of each deep-supervision output relative to the patch (for nnU-Net's target
        downsampling), highest resolution first: ``[[1, 1, 1], [0.5, 0.5, 0.5], ...]``."""
        return [[0.5 ** i] * 3 for i in range(self.num_levels)]

    def forward(self, x: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
        """``x [B, S, X, Y, Z]``, ``present [B, S]`` bool (default: inferred from the input, see
        :func:`infer_present`) -> logits ``[B, K, X, Y, Z]``, or with deep supervision a list of logits at full,
        1/2, 1/4, ... resolution. Absent series' voxels are ignored (zeroed before any use), so they may hold
        anything.

        On a CUDA device, in eval mode and without autograd (nnU-Net's predictor and its validation steps), the
        forward pass is captured once per input shape and autocast setting as a CUDA graph and replayed
        (:attr:`cuda_graphs`; see :class:`CudaGraphCache` for why and what it costs)."""
        if present is None and self.cuda_graphs and self._graphs.usable(x, self.training):
            return self._graphs.run(lambda t: self.forward_eager(t, None, compact=False), x,
                                    key=(self.deep_supervision,))
        return self.forward_eager(x, present)

    def forward_eager(self, x: torch.Tensor, present: torch.Tensor | None = None, compact: bool = True
                      ) -> torch.Tensor | list[torch.Tensor]:
        """:meth:`forward` without CUDA graphs. ``compact``: see :meth:`forward_encoder` (the graphs use
        ``compact=False``)."""
        x, present, groups = self._prepare_inputs(x, present)
        taps = self.forward_encoder(x, groups, self.tap_depths, compact=compact)
        B = x.shape[0]
        maps = [fuse(tap, groups).transpose(1, 2).reshape(B, -1, *self.grid)
                for fuse, tap in zip(self.fusions, taps)]
        # shallowest tap feeds the finest intermediate level: skips ordered by level 1 .. u-1
        skips = maps[:-1][::-1]
        indicator = present.to(x.dtype)[:, :, None, None, None].expand_as(x)
        image = torch.cat([x, indicator], 1)
        return self.decoder(maps[-1], skips, image)
