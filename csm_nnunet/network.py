"""Series-tokenized 3D ViT masked autoencoder for Cross-Series Masking (paper section III.B, eq. 1-2).

A token is one ``t^3`` patch of one series: a case of ``S`` series on a ``gx x gy x gz`` token grid gives
``S x N`` tokens (``N = gx*gy*gz``). Reading order, as in the reference MAE:

* :meth:`CSMMaskedAutoencoder.patchify`       ``x [B, C, X, Y, Z] -> patches [B, G, N, P]``
* :meth:`CSMMaskedAutoencoder.forward_encoder` visible tokens only -> ``latent [B, L, D]`` (L = most visible tokens
  of any case in the batch; shorter cases are padded and masked out of attention)
* :meth:`CSMMaskedAutoencoder.forward_decoder` latent + mask tokens for every token -> ``pred [B, G, N, P]``
* :meth:`CSMMaskedAutoencoder.forward_loss`    MSE over the ``scored`` tokens only

``G`` (token groups) is ``S`` for the series-tokenized CSM network and ``1`` for the channel-fused baseline
(``fused=True``: one token per patch carrying all series as channels, the MONAI/nnssl-style MAE), so both share
one implementation; ``P = (C / G) * t^3`` voxels per token.

Transformer blocks are dynamic-network-architectures' ``Eva`` (timm ``EvaBlock``, attention through
``F.scaled_dot_product_attention``). The ``Primus*`` presets use the exact widths, depths, heads, token size and
block options of nnU-Net's Primus networks (SwiGLU, rotary position embedding, layer scale), and the encoder is
stored under the same ``eva.*`` keys, so a pretrained encoder can be exported into nnU-Net's Primus trainers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.eva import Eva
from torch import nn

from csm_nnunet.masking import SeriesMask


@dataclass(frozen=True)
class ViTPreset:
    """Named encoder/decoder size. ``primus_blocks`` selects Primus' block options (SwiGLU MLP, rotary position
    embedding, layer scale 0.1, inner attention norm) instead of a plain pre-norm ViT block."""

    name: str
    token_size: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int
    primus_blocks: bool = False
    # full-resolution width of the segmentation decoder (doubles per coarser level). 16 is UNETR's feature size; at 32
    # (nnU-Net's U-Net width) the full-resolution stage alone took 43 % of a B16 window and inference ran 1.25x the
    # U-Net's time (docs/benchmarks.md); at 16 the whole network runs below the U-Net's time.
    seg_channels: int = 16


PRESETS: dict[str, ViTPreset] = {
    # CPU tests and demos.
    "tiny": ViTPreset("tiny", 16, 96, 4, 4, 64, 2, 4, seg_channels=8),
    # tiny's width/depth with 8^3 tokens: a 6^3 token grid on 48^3 patches, so the CPU experiment grid can resolve the
    # small series-specific compartments (16^3 tokens leave 3^3 regions); a fine-tuning step costs about 1.2x tiny's.
    "tiny8": ViTPreset("tiny8", 8, 96, 4, 4, 64, 2, 4, seg_channels=8),
    "small": ViTPreset("small", 16, 384, 8, 6, 256, 2, 8, seg_channels=16),
    # CPU experiments on ~48^3 patches: 8^3 tokens give a 6^3 grid (16^3 tokens would leave only 3^3 regions).
    "small8": ViTPreset("small8", 8, 192, 6, 6, 128, 2, 4, seg_channels=16),
    # ViT-B/16 as in the paper (IV.A), with a light 384-wide, 4-deep decoder.
    "B16": ViTPreset("B16", 16, 768, 12, 12, 384, 4, 12),
    # nnU-Net's Primus S/B/M/L (dynamic_network_architectures.architectures.primus): width/depth/heads, 8^3 tokens.
    "PrimusS": ViTPreset("PrimusS", 8, 396, 12, 6, 384, 4, 8, primus_blocks=True),
    "PrimusB": ViTPreset("PrimusB", 8, 792, 12, 12, 384, 4, 8, primus_blocks=True),
    "PrimusM": ViTPreset("PrimusM", 8, 864, 16, 12, 384, 4, 8, primus_blocks=True),
    "PrimusL": ViTPreset("PrimusL", 8, 1056, 24, 16, 384, 4, 8, primus_blocks=True),
}


def get_preset(preset: str | ViTPreset) -> ViTPreset:
    """Look a preset up by name; the error lists the valid names."""
    if isinstance(preset, ViTPreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown ViT preset {preset!r}; choose one of {sorted(PRESETS)} (CSM_PRESET / preset=)")
    return PRESETS[preset]


def sincos_pos_embed_3d(grid: Sequence[int], dim: int) -> torch.Tensor:
    """Fixed 3D sine-cosine position code ``[N, dim]`` (x-major token order, as :meth:`patchify`).

    Each axis gets ``2 * (dim // 6)`` channels (sin and cos of geometric frequencies); left-over channels are zero.
    """
    per_axis = dim // 6
    out = torch.zeros(int(math.prod(grid)), dim)
    if per_axis == 0:
        return out
    omega = 1.0 / (10000 ** (torch.arange(per_axis, dtype=torch.float64) / per_axis))
    coords = torch.meshgrid(*[torch.arange(g, dtype=torch.float64) for g in grid], indexing="ij")
    for axis, c in enumerate(coords):
        angle = c.reshape(-1, 1) * omega[None]
        out[:, 2 * per_axis * axis: 2 * per_axis * (axis + 1)] = torch.cat([angle.sin(), angle.cos()], 1).float()
    return out


def _padding_mask(valid: torch.Tensor, dtype: torch.dtype, always: bool = False) -> torch.Tensor | None:
    """Additive attention mask ``[B, 1, 1, L]`` hiding padded keys; ``None`` when nothing is padded, so SDPA can
    use its fastest (flash) kernel. ``always``: build the mask without looking (that check waits on the GPU, which a
    CUDA graph capture cannot)."""
    if not always and bool(valid.all()):
        return None
    mask = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
    return mask.masked_fill(~valid, float("-inf"))[:, None, None, :]


def gather_kept(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the kept tokens of ``keep [B, T]``, first in token order, padded to the longest case.

    Returns ``token_ids [B, L]`` and ``valid [B, L]`` (False for padding slots, whose ids point at dropped tokens).
    A stable sort keeps the order, so a case's tokens do not depend on the rest of the batch.
    """
    counts = keep.sum(1)
    L = int(counts.max())
    token_ids = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :L]
    valid = torch.arange(L, device=keep.device)[None] < counts[:, None]
    return token_ids, valid


def rope_for(module: Eva, patch_index: torch.Tensor) -> torch.Tensor | None:
    """Rotary codes for tokens at grid positions ``patch_index [B, L]`` -> ``[B, 1, L, E]`` (one per head), or
    ``None`` for blocks without rotary embedding."""
    if module.rope is None:
        return None
    return module.rope.get_embed().to(patch_index.device)[patch_index][:, None]


def _build_eva(preset: ViTPreset, dim: int, depth: int, heads: int, grid: Sequence[int], abs_pos: bool) -> Eva:
    if preset.primus_blocks:
        return Eva(embed_dim=dim, depth=depth, num_heads=heads, ref_feat_shape=tuple(grid), use_abs_pos_emb=abs_pos,
                   use_rot_pos_emb=True, mlp_ratio=4 * 2 / 3, init_values=0.1, scale_attn_inner=True)
    return Eva(embed_dim=dim, depth=depth, num_heads=heads, ref_feat_shape=tuple(grid), use_abs_pos_emb=abs_pos,
               use_rot_pos_emb=False, mlp_ratio=4.0, swiglu_mlp=False, scale_mlp=False)


@dataclass
class MAEOutput:
    """``loss`` scalar; ``pred`` and ``target`` ``[B, G, N, P]`` (target normalised per patch when
    ``norm_pix_loss``); ``num_visible`` ``[B]`` tokens the encoder saw per case."""

    loss: torch.Tensor
    pred: torch.Tensor
    target: torch.Tensor
    num_visible: torch.Tensor


def patchify_groups(x: torch.Tensor, num_groups: int, token_size: int, grid: Sequence[int]) -> torch.Tensor:
    """Cut ``x [B, C, X, Y, Z]`` into tokens ``[B, G, N, P]`` (``G = num_groups`` token groups of ``C / G`` channels
    each; ``P = (C / G) * t^3``, channel-major within a token; tokens in x-major grid order).

    ``G = C`` is the series-tokenized layout (one token per series and patch), ``G = 1`` the channel-fused one. Every
    network of the package cuts volumes with this one function, so pretrained patch projections mean the same voxels
    in the fine-tuning network.
    """
    B, C = x.shape[:2]
    t, (gx, gy, gz) = int(token_size), (int(g) for g in grid)
    x = x.reshape(B, num_groups, C // num_groups, gx, t, gy, t, gz, t).permute(0, 1, 3, 5, 7, 2, 4, 6, 8)
    return x.reshape(B, num_groups, gx * gy * gz, (C // num_groups) * t ** 3)


def init_token_embedding(patch_embed_weight: torch.Tensor, series_embed: torch.Tensor, pos_embed: torch.Tensor,
                         grid: Sequence[int]) -> None:
    """The encoder stem's initialisation, shared by the pretraining and the fine-tuning networks: Xavier-uniform
    per-group patch projections (MAE initialises its patch projection like a linear layer), a small random series
    embedding, and the learned positional table started at 3D sin-cos."""
    with torch.no_grad():
        for g in range(patch_embed_weight.shape[0]):
            nn.init.xavier_uniform_(patch_embed_weight[g])
        nn.init.normal_(series_embed, std=0.02)
        pos_embed.copy_(sincos_pos_embed_3d(tuple(grid), pos_embed.shape[-1])[None])


class CSMMaskedAutoencoder(nn.Module):
    """Masked autoencoder over (series, patch) tokens.

    Args:
        series_names: the dataset's channel names in channel order; the series embedding is keyed by them.
        patch_size: spatial input size; every axis must be a multiple of the token size.
        preset: a name in :data:`PRESETS` or a :class:`ViTPreset`.
        token_size: overrides the preset's token edge (>= 8).
        fused: one token per patch with all series as channels (the MAE baseline) instead of one per series.
        norm_pix_loss: normalise each target patch to zero mean / unit variance (MAE's per-patch targets).
        sparse_encoder: run the encoder on visible tokens only (the method); ``False`` feeds every present token,
            masked ones replaced by a learned mask token (kept for the speed benchmark and as an ablation).
    """

    def __init__(self, series_names: Sequence[str], patch_size: Sequence[int], preset: str | ViTPreset = "B16",
                 token_size: int | None = None, fused: bool = False, norm_pix_loss: bool = False,
                 sparse_encoder: bool = True):
        super().__init__()
        self.preset = get_preset(preset)
        self.series_names = [str(s) for s in series_names]
        if not self.series_names:
            raise ValueError("series_names is empty: the dataset.json 'channel_names' must list the series")
        if len(set(self.series_names)) != len(self.series_names):
            raise ValueError(f"series names must be unique to key the series embedding, got {self.series_names}")
        self.token_size = int(token_size or self.preset.token_size)
        if self.token_size < 8:
            raise ValueError(f"token_size must be >= 8, got {self.token_size}")
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) != 3:
            raise ValueError(f"CSM networks are 3D; got patch size {self.patch_size}. Use a 3d_fullres configuration.")
        bad = [p for p in self.patch_size if p % self.token_size or p < self.token_size]
        if bad:
            raise ValueError(f"patch size {self.patch_size} is not a positive multiple of the token size "
                             f"{self.token_size} on every axis")
        self.grid = tuple(p // self.token_size for p in self.patch_size)
        self.num_patches = int(math.prod(self.grid))
        self.fused = bool(fused)
        self.num_channels = len(self.series_names)
        self.num_groups = 1 if self.fused else self.num_channels
        self.channels_per_group = self.num_channels if self.fused else 1
        self.voxels_per_token = self.channels_per_group * self.token_size ** 3
        self.norm_pix_loss = bool(norm_pix_loss)
        self.sparse_encoder = bool(sparse_encoder)
        p = self.preset
        D, Dd, G = p.embed_dim, p.decoder_dim, self.num_groups

        # One linear patch projection per series (a series' contrast needs its own filters); summed over series
        # this is exactly one convolution over stacked channels, which is how it folds into a fused ViT stem.
        self.patch_embed_weight = nn.Parameter(torch.empty(G, D, self.voxels_per_token))
        self.patch_embed_bias = nn.Parameter(torch.zeros(G, D))
        self.series_embed = nn.Parameter(torch.zeros(G, D))
        self.eva = _build_eva(p, D, p.depth, p.num_heads, self.grid, abs_pos=True)  # encoder; Primus' key names
        # Used only when sparse_encoder=False. Frozen otherwise: DDP (nnU-Net's -num_gpus, find_unused_parameters off)
        # waits for a gradient of every trainable parameter and fails at the next step when one never gets any.
        self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, D), requires_grad=not self.sparse_encoder)

        self.decoder_embed = nn.Linear(D, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_series_embed = nn.Parameter(torch.zeros(G, Dd))
        self.decoder = _build_eva(p, Dd, p.decoder_depth, p.decoder_heads, self.grid, abs_pos=False)
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_3d(self.grid, Dd), persistent=False)
        self.decoder_pred = nn.Linear(Dd, self.voxels_per_token)
        self._init_weights()

    def _init_weights(self) -> None:
        init_token_embedding(self.patch_embed_weight, self.series_embed, self.eva.pos_embed, self.grid)
        for t in (self.encoder_mask_token, self.mask_token, self.decoder_series_embed):
            nn.init.normal_(t, std=0.02)
        nn.init.xavier_uniform_(self.decoder_embed.weight)
        nn.init.zeros_(self.decoder_embed.bias)
        nn.init.xavier_uniform_(self.decoder_pred.weight)
        nn.init.zeros_(self.decoder_pred.bias)

    def config(self) -> dict:
        """Everything needed to rebuild this network (stored in checkpoints for later adaptation/export)."""
        return {"series_names": list(self.series_names), "patch_size": list(self.patch_size),
                "preset": asdict(self.preset), "token_size": self.token_size, "fused": self.fused,
                "norm_pix_loss": self.norm_pix_loss, "sparse_encoder": self.sparse_encoder}

    @classmethod
    def from_config(cls, cfg: dict) -> CSMMaskedAutoencoder:
        """The network :meth:`config` describes (a checkpoint's ``csm_network``), freshly initialised; keys that
        older checkpoints lack take the constructor's defaults."""
        return cls(cfg["series_names"], cfg["patch_size"], ViTPreset(**cfg["preset"]), token_size=cfg["token_size"],
                   fused=cfg.get("fused", False), norm_pix_loss=cfg.get("norm_pix_loss", False),
                   sparse_encoder=cfg.get("sparse_encoder", True))

    # ---------------------------------------------------------------- tokens <-> volumes
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, X, Y, Z] -> [B, G, N, P]``; tokens in x-major grid order, P = channels_per_group * t^3."""
        B, C = x.shape[:2]
        if C != self.num_channels:
            raise ValueError(f"input has {C} channels but the network was built for {self.num_channels} series "
                             f"{self.series_names}; check the dataset's channel_names and files")
        if tuple(x.shape[2:]) != self.patch_size:
            raise ValueError(f"input spatial shape {tuple(x.shape[2:])} differs from the network patch size "
                             f"{self.patch_size}")
        return patchify_groups(x, self.num_groups, self.token_size, self.grid)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`patchify`: ``[B, G, N, P] -> [B, C, X, Y, Z]``."""
        B = patches.shape[0]
        t, (gx, gy, gz) = self.token_size, self.grid
        x = patches.reshape(B, self.num_groups, gx, gy, gz, self.channels_per_group, t, t, t)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4, 8)
        return x.reshape(B, self.num_channels, *self.patch_size)

    def _embed(self, patches: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """Project gathered patches ``[B, L, P]`` with the weights of their series ``group [B, L]`` -> ``[B, L, D]``.
        A loop over the (few) series keeps the cost proportional to the tokens actually embedded. The output takes
        the projection's dtype, not the input's: under CUDA autocast ``F.linear`` returns bfloat16/float16 for float32
        patches, and writing that into a float32 buffer is an error (caught by tests/test_autocast.py on the CPU)."""
        out: torch.Tensor | None = None
        for g in range(self.num_groups):
            sel = group == g
            if bool(sel.any()):
                y = F.linear(patches[sel], self.patch_embed_weight[g], self.patch_embed_bias[g])
                if out is None:
                    out = y.new_zeros(*patches.shape[:2], self.preset.embed_dim)
                out[sel] = y
        if out is None:
            raise ValueError("no token to embed: every token of the batch was dropped")
        return out

    # ---------------------------------------------------------------- encoder / decoder / loss
    def forward_encoder(self, patches: torch.Tensor, mask: SeriesMask
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode the visible tokens of ``patches [B, G, N, P]``.

        Returns ``latent [B, L, D]``, ``token_ids [B, L]`` (flat ``g * N + n`` index of each latent token) and
        ``valid [B, L]`` (False for padding). With ``sparse_encoder=False`` every present token is encoded and
        invisible ones carry the encoder mask token.
        """
        B, G, N, P = patches.shape
        visible = mask.visible.reshape(B, G * N)
        present = mask.present[:, :, None].expand(B, G, N).reshape(B, G * N)
        keep = visible if self.sparse_encoder else present
        if bool((keep.sum(1) == 0).any()):
            raise ValueError("a case in the batch has no visible token (all its series absent?)")
        token_ids, valid = gather_kept(keep)
        L = token_ids.shape[1]
        group, patch_index = token_ids // N, token_ids % N
        tok = patches.reshape(B, G * N, P).gather(1, token_ids[..., None].expand(B, L, P))
        x = self._embed(tok, group)
        if not self.sparse_encoder:
            hidden = ~visible.gather(1, token_ids)
            x = torch.where(hidden[..., None], self.encoder_mask_token.to(x.dtype).expand_as(x), x)
        x = x + self.eva.pos_embed[0, patch_index] + self.series_embed[group]
        rope = rope_for(self.eva, patch_index)
        attn_mask = _padding_mask(valid, x.dtype)
        for blk in self.eva.blocks:
            x = blk(x, rope=rope, attn_mask=attn_mask)
        return self.eva.norm(x), token_ids, valid

    def forward_decoder(self, latent: torch.Tensor, token_ids: torch.Tensor, valid: torch.Tensor,
                        mask: SeriesMask) -> torch.Tensor:
        """Scatter ``latent [B, L, D]`` back among mask tokens, decode every token -> ``pred [B, G, N, P]``.
        Tokens of absent series are excluded from attention (nothing real to reconstruct there)."""
        B, L, _ = latent.shape
        G, N = self.num_groups, self.num_patches
        y = self.decoder_embed(latent)
        full = self.mask_token.to(y.dtype).expand(B, G * N + 1, -1).clone()
        # padded latent slots write into a spare last slot that is dropped afterwards
        dest = torch.where(valid, token_ids, torch.full_like(token_ids, G * N))
        if not self.sparse_encoder:  # invisible tokens keep the decoder's mask token, as in the sparse path
            dest = torch.where(mask.visible.reshape(B, G * N).gather(1, token_ids), dest, G * N)
        full = full.scatter(1, dest[..., None].expand(-1, -1, y.shape[-1]), y)[:, : G * N]
        pos = self.decoder_pos_embed.to(full.dtype).repeat(G, 1)
        full = full + pos[None] + self.decoder_series_embed.repeat_interleave(N, 0)[None]
        all_index = torch.arange(N, device=latent.device).repeat(G)[None]
        rope = rope_for(self.decoder, all_index)
        present = mask.present[:, :, None].expand(B, G, N).reshape(B, G * N)
        attn_mask = _padding_mask(present, full.dtype)
        for blk in self.decoder.blocks:
            full = blk(full, rope=rope, attn_mask=attn_mask)
        full = self.decoder.norm(full)
        return self.decoder_pred(full).reshape(B, G, N, self.voxels_per_token)

    def target_patches(self, patches: torch.Tensor) -> torch.Tensor:
        if not self.norm_pix_loss:
            return patches
        mean = patches.mean(-1, keepdim=True)
        var = patches.var(-1, keepdim=True)
        return (patches - mean) / (var + 1e-6).sqrt()

    def forward_loss(self, target: torch.Tensor, pred: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the voxels of ``scored [B, G, N]`` tokens (eq. 2); 0 if nothing is scored."""
        per_token = ((pred.float() - target.float()) ** 2).mean(-1)
        weight = scored.to(per_token.dtype)
        return (per_token * weight).sum() / weight.sum().clamp(min=1.0)

    def forward(self, x: torch.Tensor, mask: SeriesMask) -> MAEOutput:
        """``x [B, C, X, Y, Z]`` with ``mask`` over ``[B, G, N]`` tokens -> loss, prediction, target."""
        patches = self.patchify(x)
        expected = (x.shape[0], self.num_groups, self.num_patches)
        if tuple(mask.visible.shape) != expected:
            raise ValueError(f"mask shape {tuple(mask.visible.shape)} does not match tokens {expected}")
        latent, token_ids, valid = self.forward_encoder(patches, mask)
        pred = self.forward_decoder(latent, token_ids, valid, mask)
        target = self.target_patches(patches)
        loss = self.forward_loss(target, pred, mask.scored)
        return MAEOutput(loss=loss, pred=pred, target=target, num_visible=valid.sum(1))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, mask: SeriesMask) -> torch.Tensor:
        """Volume ``[B, C, X, Y, Z]``: visible tokens from the input, the rest predicted (de-normalised per patch
        with the visible statistics unknown, so per-patch-normalised predictions are shown as they are)."""
        out = self.forward(x, mask)
        patches = self.patchify(x)
        merged = torch.where(mask.visible[..., None], patches, out.pred.to(patches.dtype))
        return self.unpatchify(merged)
