"""What the two fine-tuning trainers (``CSMSegTrainer``, ``CSMClassifierTrainer``) share on top of nnU-Net's
trainer: the paper's fine-tuning optimiser and schedule, per-epoch atomic checkpoints, and handing the dataset's
series names and the training log to the network (``-pretrained_weights`` matches series by name and reports there).

A mixin rather than a common base class so that each trainer still reads as "nnUNetTrainer plus what differs".
"""

from __future__ import annotations

from torch import nn

from csm_nnunet.optim import WarmupCosineLR, adamw, finetune_param_groups
from csm_nnunet.trainer_utils import save_trainer_checkpoint, unwrap_network


class CSMFineTuningMixin:
    """Put before ``nnUNetTrainer`` in the bases; call :meth:`_finetuning_defaults` after nnU-Net's ``__init__``."""

    #: layer-wise lr decay factor (None = off; see :func:`csm_nnunet.optim.finetune_param_groups`)
    layer_decay: float | None = None
    #: fraction of the epochs spent on the linear lr warm-up
    warmup_fraction: float = 0.05
    #: fraction of the epochs at the start during which the encoder's learning rate is 0 and only the fresh
    #: fusion/decoder/head train (then the encoder warms up over ``warmup_fraction``); 0 = train everything from the
    #: first step. Meant for fine-tuning from ``-pretrained_weights``.
    encoder_freeze_fraction: float = 0.0

    def _finetuning_defaults(self) -> None:
        self.initial_lr = 5e-3  # paper IV.A: fine-tuning for all tasks
        self.weight_decay = 0.01
        # checkpoint_latest after every epoch (nnU-Net: every 50), so a crash or kill -9 loses at most the epoch in
        # progress; docs/reliability.md has the cost (about 1.5 GB and a few seconds per write for B16)
        self.save_every = 1

    def _unwrapped(self) -> nn.Module:
        return unwrap_network(self)

    def configure_optimizers(self):
        """AdamW (paper IV.A: lr 5e-3, weight decay 0.01) with warm-up and cosine decay; optional layer-wise lr
        decay and a frozen-encoder start."""
        groups = finetune_param_groups(self._unwrapped(), self.weight_decay, self.layer_decay)
        optimizer = adamw(groups, lr=self.initial_lr)
        warmup = int(round(self.warmup_fraction * self.num_epochs))
        frozen = int(round(self.encoder_freeze_fraction * self.num_epochs))
        if frozen:
            self.print_to_log_file(f"csm-nnunet: encoder frozen for epochs 0-{frozen - 1}, then warmed up over "
                                   f"{warmup} epochs; fusion/decoder/head train from the start")
        return optimizer, WarmupCosineLR(optimizer, self.initial_lr, self.num_epochs, warmup, frozen_steps=frozen)

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written atomically with CPU tensors (see :func:`save_trainer_checkpoint`)."""
        save_trainer_checkpoint(self, self._unwrapped(), filename)

    def initialize(self):
        super().initialize()
        # -pretrained_weights reaches the network, not the trainer (see csm_seg_trainer._route_pretrained_weights):
        # give the network the dataset's series names and the trainer's log so the adaptation report lands there
        net = self._unwrapped()
        net.series_names = list(self.series_names)
        net.csm_log = self.print_to_log_file
