"""Helpers shared by every csm-nnunet trainer (the glue between nnU-Net's trainer and the method)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

from csm_nnunet.validate import check_3d_configuration


def channel_names_of(dataset_json: dict) -> list[str]:
    """Series names in channel order from dataset.json (``channel_names``, or the older ``modality``)."""
    names = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not names:
        raise ValueError("dataset.json has no 'channel_names': csm-nnunet keys its series embedding by them; add "
                         "e.g. \"channel_names\": {\"0\": \"T1\", \"1\": \"T2\"}")
    return [str(names[k]) for k in sorted(names, key=int)]


def fit_patch_to_tokens(patch_size: Sequence[int], token_size: int,
                        configuration: str = "3d_fullres") -> tuple[int, ...]:
    """Largest multiple of ``token_size`` not above each patch axis (nnU-Net's loader then samples that size).

    Rounding down keeps the cost bounded and never pads with empty tokens; an axis below one token is an error.
    """
    check_3d_configuration(patch_size, configuration)
    small = [i for i, p in enumerate(patch_size) if p < token_size]
    if small:
        raise ValueError(f"patch size {list(patch_size)} of configuration {configuration!r} is smaller than one "
                         f"token ({token_size}^3) on axis {small}. Plan with `-pl CSMPlanner`, or use a preset with "
                         f"smaller tokens (CSM_PRESET=PrimusS uses 8^3).")
    return tuple(p // token_size * token_size for p in patch_size)


def to_cpu(obj):
    """Copy of a (nested) checkpoint with every tensor moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def unwrap_network(trainer) -> torch.nn.Module:
    """The trainer's network without nnU-Net's DDP and ``torch.compile`` wrappers (what checkpoints, the
    optimiser's parameter groups and the weight adaptation need)."""
    from torch._dynamo import OptimizedModule

    mod = trainer.network.module if trainer.is_ddp else trainer.network
    return mod._orig_mod if isinstance(mod, OptimizedModule) else mod


def predict_sharded(keys: Sequence[str], predict: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """``predict(keys)`` split over the ranks of a DDP run: each rank predicts every ``world_size``-th key and all
    ranks receive the whole result in the order of ``keys``. Without an initialised process group it is
    ``predict(keys)``.

    Why: nnU-Net calls ``on_validation_epoch_end`` on every rank, so a per-epoch validation that predicts all cases
    itself did the same work ``world_size`` times. Every rank must call this (it gathers)."""
    import torch.distributed as dist

    keys = list(keys)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return predict(keys)
    rank, world = dist.get_rank(), dist.get_world_size()
    parts: list = [None] * world
    dist.all_gather_object(parts, np.asarray(predict(keys[rank::world])))
    out = np.empty((len(keys), *parts[0].shape[1:]), dtype=parts[0].dtype)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def save_checkpoint_atomically(checkpoint: dict, filename: str) -> None:
    """Write ``checkpoint`` with all tensors on the CPU to a temporary file, then rename it over ``filename``.

    CPU tensors: nnU-Net's ``load_pretrained_weights`` calls ``torch.load`` without ``map_location``, so a checkpoint
    holding CUDA tensors could not be used on a CPU-only machine (resuming still works: the optimizer and the network
    move loaded state to their device). Rename: an exception, a full disk or ``kill -9`` never leaves a half-written
    ``filename``; the old file stays until the new one is complete. fsync before the rename (and of the folder after
    it): without it a power loss or node crash shortly after the rename can leave an empty file on some file systems
    (it costs well under a second next to the few seconds of writing a B16 checkpoint). A ``kill -9`` during the write
    leaves ``filename + ".tmp"`` behind; the next save of the same file overwrites it.
    """
    tmp = filename + ".tmp"
    try:
        torch.save(to_cpu(checkpoint), tmp)
        fd = os.open(tmp, os.O_WRONLY)  # fsync flushes the file, whichever descriptor wrote it
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, filename)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_folder(os.path.dirname(os.path.abspath(filename)))


def _fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened or synced (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_trainer_checkpoint(trainer, network: torch.nn.Module, filename: str, **extra) -> None:
    """nnU-Net's own checkpoint dict for ``trainer`` (same keys, so ``--c``, ``nnUNetv2_predict`` and
    ``load_checkpoint`` work unchanged) plus ``extra`` keys, written by :func:`save_checkpoint_atomically`.
    ``network`` is the unwrapped module (no DDP / torch.compile prefixes in the keys)."""
    if trainer.local_rank != 0:
        return
    if trainer.disable_checkpointing:
        trainer.print_to_log_file("No checkpoint written, checkpointing is disabled")
        return
    checkpoint = {
        "network_weights": network.state_dict(),
        "optimizer_state": trainer.optimizer.state_dict(),
        "grad_scaler_state": trainer.grad_scaler.state_dict() if trainer.grad_scaler is not None else None,
        "logging": trainer.logger.get_checkpoint(),
        "_best_ema": trainer._best_ema,
        "current_epoch": trainer.current_epoch + 1,
        "init_args": trainer.my_init_kwargs,
        "trainer_name": trainer.__class__.__name__,
        "inference_allowed_mirroring_axes": trainer.inference_allowed_mirroring_axes,
        **extra,
    }
    save_checkpoint_atomically(checkpoint, filename)


def drop_random_series(data: torch.Tensor, probability: float) -> torch.Tensor:
    """Random series dropout for fine-tuning: each case of the batch, with ``probability``, gets 1..s-1 random
    series set to zero. The fine-tuning networks treat an all-zero series as absent and drop its tokens, exactly as
    they do for a missing series at inference, so training sees the missing-series cases it will meet. Returns a new
    tensor (or ``data`` itself when nothing is dropped)."""
    if probability <= 0 or data.shape[1] < 2:
        return data
    out = data
    for b in range(data.shape[0]):
        if torch.rand(()) < probability:
            if out is data:
                out = data.clone()
            k = int(torch.randint(1, data.shape[1], ()))
            out[b, torch.randperm(data.shape[1])[:k]] = 0
    return out


AMP_DTYPES = ("auto", "float16")


def configure_amp_dtype(trainer) -> str | None:
    """Make CUDA autocast run in bfloat16 where the GPU supports it (``trainer.amp_dtype == "auto"``, the default),
    else keep torch's float16. Returns the dtype name set, or None off CUDA.

    Why the process-wide default (``torch.set_autocast_dtype``) and not a dtype argument: ``CSMSegTrainer`` runs
    nnU-Net's own ``train_step``/``validation_step``, which call ``autocast("cuda", enabled=True)`` without a dtype;
    the default is the one switch that reaches those unchanged and our own steps alike, so all trainers agree.
    bfloat16 has float32's exponent range, so a ViT's attention logits cannot overflow as they can in float16;
    nnU-Net's GradScaler stays in place (harmless with bfloat16, needed with float16). A training process runs one
    trainer, so the process-wide setting is the trainer's setting.
    """
    choice = getattr(trainer, "amp_dtype", "auto")
    if choice not in AMP_DTYPES:
        raise ValueError(f"{type(trainer).__name__}.amp_dtype must be one of {AMP_DTYPES}, got {choice!r}")
    if trainer.device.type != "cuda":
        return None
    dtype = torch.bfloat16 if choice == "auto" and torch.cuda.is_bf16_supported() else torch.float16
    torch.set_autocast_dtype("cuda", dtype)
    name = str(dtype).removeprefix("torch.")
    trainer.print_to_log_file(f"csm-nnunet: CUDA autocast in {name} (amp_dtype={choice!r})")
    return name


def backward_and_step(trainer, loss: torch.Tensor, max_norm: float) -> None:
    """Backward pass, gradient clipping at ``max_norm`` and optimizer step, through the trainer's GradScaler when it
    has one (CUDA AMP, as nnU-Net does it) and plainly otherwise."""
    params = trainer.network.parameters()
    if trainer.grad_scaler is not None:
        trainer.grad_scaler.scale(loss).backward()
        trainer.grad_scaler.unscale_(trainer.optimizer)
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        trainer.grad_scaler.step(trainer.optimizer)
        trainer.grad_scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        trainer.optimizer.step()
