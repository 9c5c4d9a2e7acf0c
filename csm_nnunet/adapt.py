"""Explicit adaptation of a CSM/MAE pretraining checkpoint to a fine-tuning network (any
:class:`~csm_nnunet.segmentation.SeriesTokenEncoder`: segmentation or classification).

Like timm's ``checkpoint_filter_fn``, every tensor of the target network is accounted for -- copied, resampled,
matched by series name or kept at its fresh initialisation -- and the result loads with ``strict=True``; nothing is
silently skipped through ``strict=False``. The returned :class:`AdaptationReport` lists what happened to each key.

Rules:

* ``eva.*`` tensors are copied when the shapes match; ``eva.pos_embed [1, N, D]`` is resampled (trilinear
  interpolation over the 3D token grid) when the fine-tuning patch gives another grid. Rotary codes (Primus) are
  not stored in the state dict; they are recomputed for the target grid by construction.
* per-series tensors (``patch_embed_weight [S, D, t^3]``, ``patch_embed_bias [S, D]``, ``series_embed [S, D]``)
  are matched by series name: target series ``i`` takes pretrained row ``j`` where the names are equal (or where
  ``series_map`` maps the target name to a pretrained one). Unmatched target series keep their fresh
  initialisation; pretrained series missing from the target are ignored. Both are listed.
* channel-fused checkpoints (``fused=True``, :class:`MAEPretrainer`) have one projection over stacked channels,
  ``patch_embed_weight [1, D, C*t^3]`` (channel-major within a token, see ``CSMMaskedAutoencoder.patchify``).
  A projection of stacked channels is the sum of per-channel projections, so the weight is split into
  ``C`` per-series weights ``[D, t^3]`` by the pretrained channel names. **Bias rule:** each pretrained channel's
  share is ``bias / C`` (an even split), so summing the per-series projections over all ``C`` pretrained
  channels reproduces the fused projection exactly, and no channel is privileged when only some of them exist in
  the target. ``series_embed`` stays fresh (the fused network has a single token group, no per-series embedding).
* a channel-fused *target* (``fused_tokens=True``, the fused-token baseline ``CSMSegTrainer_FusedTokens``) loads
  only a channel-fused checkpoint with the same channels in the same order, tensor for tensor; anything else is an
  error that says so (per-series weights fold into a fused stem only approximately; ``csm_nnunet export-primus``
  does that fold, for nnU-Net's Primus).
* fusion, decoder and segmentation-head tensors are always fresh.
* a different encoder (embed dim, depth, heads, block type, token size) is an error naming the field.
"""

from __future__ import annotations

import math
import os
import pickle
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from csm_nnunet.segmentation import PER_SERIES_ENCODER_KEYS, SeriesTokenEncoder, is_encoder_key

POS_EMBED_KEY = "eva.pos_embed"
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile / DistributedDataParallel


@dataclass
class AdaptationReport:
    """What :func:`adapt_encoder_state` did with every key.

    Attributes:
        state_dict: complete state dict for ``network.load_state_dict(state_dict, strict=True)``.
        loaded: target keys copied from the checkpoint (per-series keys: at least one series row copied).
        resampled: target keys interpolated to the target grid (``eva.pos_embed``).
        fresh: target keys left at the network's initialisation (fusion/decoder/heads, unmatched per-series keys).
        ignored: checkpoint keys not used (the pretraining decoder, mask tokens, ...).
        series_matched: target series name -> pretrained row index it was taken from.
        series_new: target series without a pretrained match (fresh per-series rows).
        series_unused: pretrained series that the target does not have.
        notes: free-text remarks (fused split, bias rule, grid change).
    """

    state_dict: dict[str, torch.Tensor]
    loaded: list[str] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    series_matched: dict[str, int] = field(default_factory=dict)
    series_new: list[str] = field(default_factory=list)
    series_unused: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        """Readable multi-line summary for the training log."""
        def short(keys: list[str]) -> str:
            eva = [k for k in keys if k.startswith("eva.blocks.")]
            rest = [k for k in keys if not k.startswith("eva.blocks.")]
            parts = rest[:12] + ([f"... (+{len(rest) - 12} more)"] if len(rest) > 12 else [])
            if eva:
                parts.append(f"{len(eva)} eva.blocks.* tensors")
            return ", ".join(parts) if parts else "-"

        prefixes = sorted({k.split(".")[0] for k in self.fresh})
        lines = [
            "csm-nnunet: pretrained encoder adaptation",
            f"  loaded    ({len(self.loaded)}): {short(self.loaded)}",
            f"  resampled ({len(self.resampled)}): {short(self.resampled)}",
            f"  fresh     ({len(self.fresh)}): modules {', '.join(prefixes) if prefixes else '-'}",
            f"  ignored   ({len(self.ignored)} checkpoint keys): modules "
            f"{', '.join(sorted({k.split('.')[0] for k in self.ignored})) or '-'}",
            "  series matched by name: " + (", ".join(f"{n} <- pretrained #{j}" for n, j in self.series_matched.items())
                                            or "none"),
            f"  series new (fresh embedding): {', '.join(self.series_new) or 'none'}",
            f"  pretrained series not used: {', '.join(self.series_unused) or 'none'}",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _strip_wrappers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop ``_orig_mod.`` / ``module.`` key prefixes (a compiled or DDP-wrapped network's state dict)."""
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for p in _WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def _unwrap(network: nn.Module) -> SeriesTokenEncoder:
    for attr in ("_orig_mod", "module"):
        while hasattr(network, attr) and isinstance(getattr(network, attr), nn.Module):
            network = getattr(network, attr)
    if not isinstance(network, SeriesTokenEncoder):
        raise TypeError(f"network must be a csm-nnunet fine-tuning network (SeriesTokenEncoder), got "
                        f"{type(network).__name__}")
    return network


def _check_encoder_config(config: Mapping, network: SeriesTokenEncoder) -> None:
    """Raise a ValueError naming the first encoder field where checkpoint and network differ."""
    for required in ("series_names", "patch_size", "preset", "token_size"):
        if required not in config:
            raise ValueError(f"pretrained config lacks {required!r}; it must be the 'csm_network' dict of a "
                             f"csm-nnunet pretraining checkpoint (CSMMaskedAutoencoder.config())")
    pre = config["preset"]
    p = network.preset
    name = pre.get("name", "?")
    fix = (f"build the segmentation network with preset={name!r} (the pretraining preset) or pretrain with "
           f"preset {p.name!r}")
    for key, ours in (("embed_dim", p.embed_dim), ("depth", p.depth), ("num_heads", p.num_heads),
                      ("primus_blocks", p.primus_blocks)):
        theirs = pre.get(key)
        if theirs != ours:
            raise ValueError(f"pretrained encoder has preset.{key}={theirs!r} (preset {name!r}) but the segmentation "
                             f"network has {key}={ours!r} (preset {p.name!r}); {fix}")
    if int(config["token_size"]) != network.token_size:
        raise ValueError(f"pretrained token_size={config['token_size']} differs from the network's "
                         f"{network.token_size}; build the segmentation network with "
                         f"token_size={config['token_size']}")


def _resample_pos_embed(pos: torch.Tensor, src_grid: Sequence[int], dst_grid: Sequence[int]) -> torch.Tensor:
    """``[1, prod(src_grid), D] -> [1, prod(dst_grid), D]`` by trilinear interpolation over the token grid
    (x-major token order, as ``patchify``)."""
    D = pos.shape[-1]
    vol = pos.reshape(1, *src_grid, D).permute(0, 4, 1, 2, 3).float()
    vol = F.interpolate(vol, size=tuple(dst_grid), mode="trilinear", align_corners=False)
    return vol.permute(0, 2, 3, 4, 1).reshape(1, int(math.prod(dst_grid)), D).to(pos.dtype)


def adapt_encoder_state(pretrained_state: Mapping[str, torch.Tensor], pretrained_config: Mapping,
                        network: nn.Module, target_series_names: Sequence[str],
                        series_map: Mapping[str, str] | None = None) -> AdaptationReport:
    """Map a pretraining state dict onto ``network``'s state dict (see the module docstring for the rules).

    Args:
        pretrained_state: ``checkpoint["network_weights"]`` of a CSM/MAE pretraining checkpoint.
        pretrained_config: ``checkpoint["csm_network"]`` (``CSMMaskedAutoencoder.config()``).
        network: the fine-tuning network to initialise (its current tensors are the fresh values).
        target_series_names: the network's input channel names, in channel order.
        series_map: optional renames ``{target name: pretrained name}`` for series whose names differ between the
            datasets (e.g. ``{"T1POST": "T1ce"}``); otherwise names must be equal to match.

    Returns:
        an :class:`AdaptationReport` whose ``state_dict`` loads into ``network`` with ``strict=True``.
    """
    net = _unwrap(network)
    targets = [str(s) for s in target_series_names]
    if len(targets) != net.num_series:
        raise ValueError(f"target_series_names has {len(targets)} names {targets} but the network has "
                         f"{net.num_series} input series")
    if len(set(targets)) != len(targets):
        raise ValueError(f"target_series_names must be unique, got {targets}")
    if net.series_names is not None and net.series_names != targets:
        raise ValueError(f"target_series_names {targets} differ from the network's series_names {net.series_names}")
    _check_encoder_config(pretrained_config, net)
    pre_names = [str(s) for s in pretrained_config["series_names"]]
    fused = bool(pretrained_config.get("fused", False))
    t = net.token_size
    src_grid = tuple(int(p) // t for p in pretrained_config["patch_size"])
    state = _strip_wrappers(pretrained_state)
    direct = net.fused_tokens  # fused target: a fused checkpoint with identical channels, copied tensor for tensor
    if direct and not (fused and pre_names == targets and not series_map):
        raise ValueError(f"the segmentation network uses channel-fused tokens over {targets}; it loads only a "
                         f"channel-fused (MAEPretrainer) checkpoint with the same channels in the same order, but the "
                         f"checkpoint is {'fused' if fused else 'series-tokenized'} over {pre_names}. Fine-tune a "
                         f"series-tokenized checkpoint with CSMSegTrainer, or fold it into nnU-Net's Primus with "
                         f"`csm_nnunet export-primus`")

    fresh_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    report = AdaptationReport(state_dict=fresh_state)
    used: set[str] = set()

    # series matching by name
    rename = dict(series_map or {})
    unknown = [k for k in rename if k not in targets]
    if unknown:
        raise ValueError(f"series_map names target series {unknown} that are not in {targets}")
    for name in targets:
        source = rename.get(name, name)
        if source in pre_names:
            report.series_matched[name] = pre_names.index(source)
        else:
            report.series_new.append(name)
    taken = set(report.series_matched.values())
    report.series_unused = [n for j, n in enumerate(pre_names) if j not in taken]

    for key in net.state_dict():
        if not is_encoder_key(key):
            report.fresh.append(key)
            continue
        if fused and not direct and key == "series_embed":  # one fused token group: no per-series embedding
            report.fresh.append(key)
            continue
        if key not in state:
            raise ValueError(f"pretrained state lacks encoder tensor {key!r}; the checkpoint is incomplete or was "
                             f"written by a different network")
        src, dst = state[key], fresh_state[key]
        used.add(key)
        if key in PER_SERIES_ENCODER_KEYS and not direct:
            if fused:
                src = _split_fused(key, src, len(pre_names), t, report)
            expected = (len(pre_names), *dst.shape[1:])
            if tuple(src.shape) != expected:
                raise ValueError(f"pretrained {key!r} has shape {list(src.shape)}, expected {list(expected)} for "
                                 f"{len(pre_names)} series {pre_names} with this encoder")
            for i, name in enumerate(targets):
                if name in report.series_matched:
                    dst[i] = src[report.series_matched[name]].to(dst.dtype)
            (report.loaded if report.series_matched else report.fresh).append(key)
        elif key == POS_EMBED_KEY and src_grid != net.grid:
            if tuple(src.shape) != (1, int(math.prod(src_grid)), dst.shape[-1]):
                raise ValueError(f"pretrained {key!r} has shape {list(src.shape)}, which does not fit the "
                                 f"pretraining token grid {src_grid} (patch_size {pretrained_config['patch_size']})")
            fresh_state[key] = _resample_pos_embed(src, src_grid, net.grid).to(dst.dtype)
            report.resampled.append(key)
            report.notes.append(f"token grid {src_grid} -> {net.grid}: {key} resampled trilinearly")
        else:
            if src.shape != dst.shape:
                raise ValueError(f"pretrained {key!r} has shape {list(src.shape)} but the network expects "
                                 f"{list(dst.shape)}; the encoders differ (preset/block options)")
            fresh_state[key] = src.detach().to(dst.dtype).clone()
            report.loaded.append(key)
    report.ignored = sorted(k for k in state if k not in used)
    if not report.series_matched:
        report.notes.append(f"no target series {targets} matches a pretrained series {pre_names}: the patch "
                            f"embedding is entirely fresh (pass series_map to pair renamed series)")
    if direct:
        report.notes.append(f"channel-fused checkpoint into a channel-fused network over {targets}: copied as is")
    elif fused:
        report.notes.append(f"fused (channel-stacked) checkpoint: patch embedding split into {len(pre_names)} "
                            f"per-series weights {pre_names}; bias split evenly (bias / {len(pre_names)} per "
                            f"series); series_embed fresh")
    return report


def _split_fused(key: str, src: torch.Tensor, num_channels: int, t: int, report: AdaptationReport) -> torch.Tensor:
    """Per-series view of a fused patch embedding: weight ``[1, D, C*t^3] -> [C, D, t^3]`` (token voxels are
    channel-major), bias ``[1, D] -> [C, D]`` holding ``bias / C`` each (see the module docstring)."""
    if key == "patch_embed_weight":
        if src.ndim != 3 or src.shape[0] != 1 or src.shape[2] != num_channels * t ** 3:
            raise ValueError(f"fused checkpoint's {key!r} has shape {list(src.shape)}, expected "
                             f"[1, D, {num_channels}*{t}^3]")
        return src[0].reshape(src.shape[1], num_channels, t ** 3).permute(1, 0, 2)
    if src.ndim != 2 or src.shape[0] != 1:
        raise ValueError(f"fused checkpoint's {key!r} has shape {list(src.shape)}, expected [1, D]")
    return (src / num_channels).expand(num_channels, -1)


def load_pretrained_checkpoint(path: str | os.PathLike, network: nn.Module, target_series_names: Sequence[str],
                               log: Callable[[str], object] | None = print,
                               series_map: Mapping[str, str] | None = None) -> AdaptationReport:
    """Read a csm-nnunet pretraining checkpoint, or an encoder archive of ``csm_nnunet export-encoder`` (validated by
    :func:`csm_nnunet.share.read_encoder_archive`), adapt it (:func:`adapt_encoder_state`), load it strictly into
    ``network`` and log the report.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file cannot be unpickled (truncated/corrupt) or is not a csm-nnunet pretraining checkpoint,
            or the encoder archive is refused (the message says why).
    """
    from csm_nnunet.share import describe, is_encoder_archive, read_encoder_archive

    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"pretrained checkpoint {path!r} is a folder; pass the checkpoint file in it, e.g. "
                                f"{os.path.join(path, 'checkpoint_final.pth')!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained checkpoint {path!r} does not exist")
    if is_encoder_archive(path):
        archive = read_encoder_archive(path)
        checkpoint = archive.checkpoint()
        if log is not None:
            log(describe(archive.metadata, path))
    else:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
            raise ValueError(f"cannot read pretrained checkpoint {path!r} ({type(e).__name__}: {e}); the file is "
                             f"truncated or corrupt, or not a torch checkpoint at all -- copy it again, or use another "
                             f"checkpoint (checkpoint_final.pth, checkpoint_best.pth, checkpoint_latest.pth)") from e
        if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("csm_encoder"), Mapping) and log is not None:
            log(describe(checkpoint["csm_encoder"], path))  # written by `csm_nnunet import-encoder`
    if not isinstance(checkpoint, Mapping) or "network_weights" not in checkpoint or "csm_network" not in checkpoint:
        found = sorted(checkpoint)[:10] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        trainer = checkpoint.get("trainer_name") if isinstance(checkpoint, Mapping) else None
        raise ValueError(f"{path!r} is not a csm-nnunet pretraining checkpoint: it needs 'network_weights' and "
                         f"'csm_network' (written by CSMPretrainer/MAEPretrainer), found {found}"
                         + (f" from trainer {trainer!r}" if trainer else "")
                         + "; pass a checkpoint of a csm-nnunet pretraining run")
    report = adapt_encoder_state(checkpoint["network_weights"], checkpoint["csm_network"], network,
                                 target_series_names, series_map=series_map)
    _unwrap(network).load_state_dict(report.state_dict, strict=True)
    if log is not None:
        log(report.format())
    return report
