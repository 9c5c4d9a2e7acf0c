"""nnU-Net's own trainers with the training length taken from ``CSM_NUM_EPOCHS`` / ``CSM_ITERS_PER_EPOCH`` /
``CSM_VAL_ITERS``, so the experiments compare every network at the same number of steps.

Only the length changes. nnU-Net's ``nnUNetTrainer`` (U-Net, SGD, poly schedule, 1000 x 250 steps by default) has no
switch for a short run, and its ``nnUNetTrainer_<N>epochs`` variants keep 250 iterations per epoch. The Primus
trainers warm up for 50 epochs; that warm-up is scaled to the same 5 % of the run that our trainers use, or a short
run would never leave it.
"""

from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.primus.primus_trainers import nnUNet_Primus_B_Trainer, nnUNet_Primus_S_Trainer

from csm_nnunet.overrides import apply_env_overrides


def _apply_budget(trainer: nnUNetTrainer) -> None:
    """Apply the length overrides (not CSM_PRESET: these networks have their own architecture)."""
    apply_env_overrides(trainer, trainer.print_to_log_file, skip=("preset", "mask_seed", "crop_size"))
    if hasattr(trainer, "warmup_duration_whole_net"):
        trainer.warmup_duration_whole_net = max(1, round(0.05 * trainer.num_epochs))
        trainer.print_to_log_file(f"csm-nnunet: warm-up {trainer.warmup_duration_whole_net} epochs (5 % of the run)")


class nnUNetTrainer_CSMBudget(nnUNetTrainer):
    """nnU-Net's default trainer and U-Net, shortened by the ``CSM_*`` length variables."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _apply_budget(self)


class nnUNet_Primus_S_Trainer_CSMBudget(nnUNet_Primus_S_Trainer):
    """nnU-Net's Primus-S trainer, shortened (the target of ``csm_nnunet export-primus`` with CSM_PRESET=PrimusS)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _apply_budget(self)


class nnUNet_Primus_B_Trainer_CSMBudget(nnUNet_Primus_B_Trainer):
    """nnU-Net's Primus-B trainer, shortened."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _apply_budget(self)
