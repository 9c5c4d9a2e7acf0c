"""Learning-rate schedule for ViT training: linear warm-up, then cosine decay (paper IV.A: "cosine decay learning
rate starting at 1e-3"; warm-up is the standard MAE practice that keeps early ViT updates stable).

Stepped once per epoch with the epoch index, like nnU-Net's own schedulers (``lr_scheduler.step(current_epoch)``),
so resuming from a checkpoint lands on the same learning rate.

Fine-tuning can also hold the pretrained encoder still for the first epochs (``frozen_steps``) while the fresh
decoder/head learns on top of it, then bring the encoder in with its own linear warm-up: the "train the head first,
then everything" recipe of linear-probe-then-fine-tune (Kumar et al., ICLR 2022), which keeps the large early
gradients of a randomly initialised head from rewriting pretrained features.
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from csm_nnunet.segmentation import is_encoder_key


class WarmupCosineLR(LRScheduler):
    """Linear warm-up then cosine decay; parameter groups marked ``"encoder": True`` get learning rate 0 for the first
    ``frozen_steps`` steps, then a linear ramp over ``warmup_steps`` into the same cosine (AdamW with lr 0 leaves a
    parameter exactly unchanged, weight decay included, while its moment estimates already follow the gradients)."""

    def __init__(self, optimizer: Optimizer, initial_lr: float, max_steps: int, warmup_steps: int,
                 min_lr: float = 0.0, frozen_steps: int = 0):
        self.initial_lr = float(initial_lr)
        self.max_steps = max(1, int(max_steps))
        self.warmup_steps = max(0, min(int(warmup_steps), self.max_steps - 1))
        self.min_lr = float(min_lr)
        self.frozen_steps = max(0, min(int(frozen_steps), self.max_steps - 1))
        self.ctr = 0
        super().__init__(optimizer, -1)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.initial_lr * (step + 1) / (self.warmup_steps + 1)
        span = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.initial_lr - self.min_lr) * (1 + math.cos(math.pi * progress))

    def encoder_factor(self, step: int) -> float:
        """Multiplier of the encoder groups' learning rate: 0 while frozen, then rising linearly to 1."""
        if step < self.frozen_steps:
            return 0.0
        return min(1.0, (step - self.frozen_steps + 1) / (self.warmup_steps + 1))

    def step(self, current_step: int | None = None) -> None:
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        lr = self.lr_at(current_step)
        frozen = self.encoder_factor(current_step) if self.frozen_steps else 1.0
        for group in self.optimizer.param_groups:  # "lr_scale": layer-wise learning-rate decay
            group["lr"] = lr * group.get("lr_scale", 1.0) * (frozen if group.get("encoder") else 1.0)
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]


def adamw(param_groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW with the fused kernel where torch has one for the parameters' device (CUDA, and the CPU since torch
    2.4: about 5x faster than the default loop on 2 CPU cores for a ViT-B, where the optimizer step is otherwise a
    large share of a sparse MAE step); the plain implementation elsewhere."""
    try:
        return torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(param_groups, lr=lr, betas=betas)


def finetune_param_groups(network: torch.nn.Module, weight_decay: float, layer_decay: float | None = None
                          ) -> list[dict]:
    """Parameter groups for fine-tuning a :class:`~csm_nnunet.segmentation.SeriesTokenEncoder` network with AdamW.

    No weight decay on norms, biases, embeddings and tokens (MAE practice). With ``layer_decay`` (MAE fine-tuning
    practice: the stem moves least, the head most) block ``i`` of a depth-``L`` encoder gets an ``lr_scale`` of
    ``layer_decay ** (L - i)``, the patch/series/position embeddings ``layer_decay ** (L + 1)`` and every head
    (fusion, decoder, classifier) 1; :class:`WarmupCosineLR` applies the scale. Groups of encoder parameters (what
    ``-pretrained_weights`` loads: embeddings and the ViT) are marked ``"encoder": True`` so the schedule can hold
    them still at the start.
    """
    depth = len(network.eva.blocks)
    groups: dict[tuple[float, float, bool], list[torch.nn.Parameter]] = {}
    for name, p in network.named_parameters():
        if not p.requires_grad:
            continue
        # no decay on 1-D tensors, embeddings, mask tokens, and the same-position attention bias (a decay would pull
        # its log(N) start towards plain attention); the series fusion's 2-D key/value biases keep theirs
        last = name.split(".")[-1]
        no_decay = p.ndim < 2 or "embed" in last or "token" in name or name == "same_position_bias"
        wd = 0.0 if no_decay else weight_decay
        scale = 1.0
        if layer_decay is not None:
            if name.startswith("eva.blocks."):
                scale = layer_decay ** (depth - int(name.split(".")[2]))
            elif name.startswith(("patch_embed", "series_embed", "eva.pos_embed")):
                scale = layer_decay ** (depth + 1)
        encoder = is_encoder_key(name)
        groups.setdefault((wd, scale, encoder), []).append(p)
    return [{"params": ps, "weight_decay": wd, "lr_scale": scale, "encoder": encoder}
            for (wd, scale, encoder), ps in groups.items()]
