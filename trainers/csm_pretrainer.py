"""``CSMPretrainer``: Cross-Series Masking pretraining inside nnU-Net's own training loop.

Everything nnU-Net already does is reused: plans and preprocessed data, ``nnUNetDataLoader`` with the default
batchgeneratorsv2 spatial + intensity augmentation (labels are loaded by the loader but unused), the logger and
``progress.png``, checkpoints and ``--c``. What changes is only what a step computes: masks from
:class:`~csm_nnunet.masking.CrossSeriesMasker`, the reconstruction loss of
:class:`~csm_nnunet.network.CSMMaskedAutoencoder`, and "best" meaning the lowest moving average of the validation
reconstruction loss. Ablations are subclasses that flip the class attributes below.
"""

from __future__ import annotations

import os
from os.path import isfile, join
from time import time

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import autocast, nn
from torch import distributed as dist

from csm_nnunet.masking import TRAIN_STREAM, VALIDATION_STREAM, CrossSeriesMasker, SeriesMask, mask_seed
from csm_nnunet.network import CSMMaskedAutoencoder, get_preset
from csm_nnunet.optim import WarmupCosineLR, adamw
from csm_nnunet.overrides import apply_env_overrides, read_env_overrides
from csm_nnunet.trainer_utils import (
    backward_and_step,
    channel_names_of,
    configure_amp_dtype,
    fit_patch_to_tokens,
    save_trainer_checkpoint,
    unwrap_network,
)
from csm_nnunet.validate import check_finite_batch, check_training_setup


class CSMPretrainer(nnUNetTrainer):
    """Pretrain the series-tokenized ViT by cross-series masking. Switches (class attributes):

    ``mask_ratio`` intra-series ratio; ``series_masking`` "reconstruct" | "no_reconstruct" | "off";
    ``same_position`` one patch mask for all series; ``fused_tokens`` one token per patch with all series as
    channels (MAE baseline); ``norm_pix_loss`` per-patch normalised targets; ``preset`` ViT size (CSM_PRESET).
    """

    mask_ratio: float = 0.875
    series_masking: str = "reconstruct"
    same_position: bool = False
    fused_tokens: bool = False
    norm_pix_loss: bool = False
    preset: str = "B16"
    amp_dtype: str = "auto"  # CUDA autocast: bfloat16 where supported, else float16 ("float16" forces it)
    warmup_fraction: float = 0.05
    peak_lr: float = 1e-3  # paper IV.A; CSM_LR overrides it
    snapshot_every: int = 50
    mask_seed: int = 12345

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # Validate before nnU-Net creates the output folder and log, so a bad setup leaves nothing behind.
        preset = read_env_overrides().get("preset", self.preset)
        self.series_names = channel_names_of(dataset_json)
        check_training_setup(plans, configuration, fold, dataset_json, self.series_names)
        self.token_size = get_preset(preset).token_size
        planned = list(PlansManager(plans).get_configuration(configuration).patch_size)
        fitted = fit_patch_to_tokens(planned, self.token_size, configuration)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = self.peak_lr
        self.weight_decay = 0.05
        self.enable_deep_supervision = False
        # checkpoint_latest after every epoch (nnU-Net: every 50), so a crash or kill -9 loses at most the epoch in
        # progress; docs/reliability.md has the cost (about 1.3 GB and a few seconds per write for B16)
        self.save_every = 1
        apply_env_overrides(self, self.print_to_log_file, skip=("crop_size",))
        configure_amp_dtype(self)  # bfloat16 autocast on GPUs that have it (see the function)
        if list(fitted) != planned:
            self.print_to_log_file(f"csm-nnunet: patch size {planned} is not a multiple of the token size "
                                   f"{self.token_size}; sampling {list(fitted)} instead (rounded down per axis).")
            self.configuration_manager.configuration["patch_size"] = list(fitted)
        if len(self.series_names) == 1 and self.series_masking != "off":
            self.print_to_log_file(f"csm-nnunet WARNING: the dataset has a single series {self.series_names}; "
                                   "inter-series masking needs two or more, so only intra-series masking is applied "
                                   "(this is plain MAE pretraining).")
        self.masker = CrossSeriesMasker(self.mask_ratio, self.series_masking, self.same_position)
        self._mask_generator = torch.Generator()
        self.print_to_log_file(f"csm-nnunet: {self.__class__.__name__} preset={self.preset} token={self.token_size} "
                               f"series={self.series_names} {self.masker} fused_tokens={self.fused_tokens} "
                               f"norm_pix_loss={self.norm_pix_loss}")

    def on_train_start(self):
        super().on_train_start()
        # the preprocessed data must have one channel per dataset.json series (a stale preprocessing after an edit
        # of channel_names would otherwise fail deep inside the network)
        data = next(self.dataloader_train)["data"]
        if data.shape[1] != len(self.series_names):
            raise ValueError(f"preprocessed data in {self.preprocessed_dataset_folder} has {data.shape[1]} channels "
                             f"but dataset.json channel_names lists {len(self.series_names)} {self.series_names}; "
                             f"re-run nnUNetv2_plan_and_preprocess after fixing dataset.json")

    # ---------------------------------------------------------------- network, loss, optimiser
    def build_network_architecture(self, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        """Instance method (not static like nnU-Net's): the network is keyed by the dataset's channel names, which
        only the trainer knows. Pretrainers are never used by ``nnUNetv2_predict``, so nothing needs the static
        form here."""
        if num_input_channels != len(self.series_names):
            raise ValueError(f"the plans/data give {num_input_channels} input channels but dataset.json "
                             f"'channel_names' lists {len(self.series_names)} ({self.series_names}); make them agree "
                             f"and re-run nnUNetv2_plan_and_preprocess")
        return CSMMaskedAutoencoder(self.series_names, configuration_manager.patch_size, self.preset,
                                    fused=self.fused_tokens, norm_pix_loss=self.norm_pix_loss)

    def _build_loss(self):
        return None  # the reconstruction loss is part of the network (CSMMaskedAutoencoder.forward_loss)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.network.named_parameters():
            if not p.requires_grad:
                continue
            # MAE practice: no weight decay on norms, biases, position/series embeddings and mask tokens
            (no_decay if p.ndim < 2 or "embed" in name.split(".")[-1] or "token" in name else decay).append(p)
        optimizer = adamw([{"params": decay, "weight_decay": self.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=self.initial_lr, betas=(0.9, 0.95))
        warmup = int(round(self.warmup_fraction * self.num_epochs))
        return optimizer, WarmupCosineLR(optimizer, self.initial_lr, self.num_epochs, warmup)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        pass  # a reconstruction network has no deep supervision outputs

    def _unwrapped(self) -> CSMMaskedAutoencoder:
        return unwrap_network(self)

    # ---------------------------------------------------------------- masks
    def _present(self, keys) -> torch.Tensor:
        """``[B, S]`` presence from dataset.json ``missing_series`` ({case: [series names]}); absent series are
        stored as all-zero images and must be neither shown to the encoder nor scored."""
        missing = self.dataset_json.get("missing_series") or {}
        present = torch.ones(len(keys), len(self.series_names), dtype=torch.bool)
        for b, key in enumerate(keys):
            for name in missing.get(str(key), []):
                if name in self.series_names:
                    present[b, self.series_names.index(name)] = False
        return present

    def draw_mask(self, batch: dict, generator: torch.Generator) -> SeriesMask:
        net = self._unwrapped()
        B = batch["data"].shape[0]
        present = self._present(batch.get("keys", [""] * B))
        if net.fused:
            present = present.any(1, keepdim=True)
        return self.masker(B, net.num_groups, net.num_patches, present=present, generator=generator,
                           device=self.device)

    def _reseed(self, stream: int, epoch: int | None = None) -> None:
        """Masks are a function of (seed, epoch, stream, rank) (:func:`~csm_nnunet.masking.mask_seed`): reproducible
        after ``--c`` and different per DDP rank. ``epoch`` defaults to the current one."""
        rank = dist.get_rank() if self.is_ddp else 0
        epoch = self.current_epoch if epoch is None else epoch
        self._mask_generator.manual_seed(mask_seed(self.mask_seed, epoch, stream, rank))

    # ---------------------------------------------------------------- steps
    def _loss(self, batch: dict) -> torch.Tensor:
        check_finite_batch(batch["data"], batch.get("keys"), self.preprocessed_dataset_folder)
        data = batch["data"].to(self.device, non_blocking=True)
        mask = self.draw_mask(batch, self._mask_generator)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            return self.network(data, mask).loss

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._reseed(TRAIN_STREAM)

    def train_step(self, batch: dict) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite reconstruction loss {loss.item()} at epoch {self.current_epoch}; "
                                     f"check the data for NaN/Inf voxels (keys {batch.get('keys')})")
        backward_and_step(self, loss, max_norm=1.0)
        return {"loss": loss.detach().cpu().numpy()}

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        # the same masks every epoch (epoch fixed at 0), so validation losses of different epochs are comparable
        self._reseed(VALIDATION_STREAM, epoch=0)

    def validation_step(self, batch: dict) -> dict:
        return {"loss": self._loss(batch).detach().cpu().numpy()}

    def on_validation_epoch_end(self, val_outputs: list[dict]):
        loss_here = np.mean(collate_outputs(val_outputs)["loss"])
        if self.is_ddp:
            losses = [None] * dist.get_world_size()
            dist.all_gather_object(losses, loss_here)
            loss_here = float(np.mean(losses))
        self.logger.log("val_losses", loss_here, self.current_epoch)
        # nnU-Net's logger keeps one value per epoch for every key; pretraining has no Dice, so NaN (plots empty)
        self.logger.log("mean_fg_dice", float("nan"), self.current_epoch)
        self.logger.log("dice_per_class_or_region", [], self.current_epoch)

    def on_epoch_end(self):
        self.logger.log("epoch_end_timestamps", time(), self.current_epoch)
        val_losses = self.logger.get_value("val_losses", step=None)
        ema = val_losses[0]
        for v in val_losses[1:]:
            ema = 0.9 * ema + 0.1 * v
        self.print_to_log_file("train_loss (reconstruction)",
                               np.round(self.logger.get_value("train_losses", step=-1), decimals=5))
        self.print_to_log_file("val_loss (reconstruction)", np.round(val_losses[-1], decimals=5))
        self.print_to_log_file(f"Epoch time: {np.round(self.logger.get_value('epoch_end_timestamps', step=-1) - self.logger.get_value('epoch_start_timestamps', step=-1), decimals=2)} s")  # noqa: E501
        epoch = self.current_epoch
        if (epoch + 1) % self.save_every == 0 and epoch != self.num_epochs - 1:
            self.save_checkpoint(join(self.output_folder, "checkpoint_latest.pth"))
        # for pretrainers _best_ema holds the lowest moving average of the validation reconstruction loss
        if self._best_ema is None or ema < self._best_ema:
            self._best_ema = float(ema)
            self.print_to_log_file(f"New best EMA validation reconstruction loss: {np.round(ema, decimals=5)}")
            self.save_checkpoint(join(self.output_folder, "checkpoint_best.pth"))
        if self.local_rank == 0:
            self.logger.plot_progress_png(self.output_folder)
            if (epoch + 1) % self.snapshot_every == 0 or epoch == self.num_epochs - 1:
                self.save_reconstruction_snapshot()
        self.current_epoch += 1

    @torch.no_grad()
    def save_reconstruction_snapshot(self) -> None:
        """PNG of one validation case: per series original, visible input, reconstruction; hidden series marked."""
        from csm_nnunet.visualize import save_reconstruction_png

        net = self._unwrapped()
        was_training = net.training
        net.eval()
        batch = next(self.dataloader_val)
        gen = torch.Generator().manual_seed(self.mask_seed)
        mask = self.draw_mask(batch, gen)
        x = batch["data"].to(self.device)
        recon = net.reconstruct(x, mask)
        visible = net.unpatchify(net.patchify(x) * mask.visible[..., None].to(x.dtype))
        hidden = mask.hidden_series[0].tolist() if not net.fused else [False] * net.num_channels
        absent = (~self._present(batch.get("keys", [""]))[0]).tolist()
        folder = join(self.output_folder, "snapshots")
        os.makedirs(folder, exist_ok=True)
        save_reconstruction_png(join(folder, f"reconstruction_epoch_{self.current_epoch:04d}.png"),
                                x[0].float().cpu().numpy(), visible[0].float().cpu().numpy(),
                                recon[0].float().cpu().numpy(), self.series_names, hidden, absent,
                                title=f"{self.__class__.__name__} epoch {self.current_epoch} case "
                                      f"{batch.get('keys', ['?'])[0]}")
        net.train(was_training)

    # ---------------------------------------------------------------- checkpoints and the end of training
    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint dict plus ``csm_network`` (the network config needed to adapt/export the encoder),
        written atomically with CPU tensors (see :func:`save_trainer_checkpoint`)."""
        net = self._unwrapped()
        save_trainer_checkpoint(self, net, filename, csm_network=net.config(),
                                csm_masking={"mask_ratio": self.mask_ratio, "series_masking": self.series_masking,
                                             "same_position": self.same_position})

    def perform_actual_validation(self, save_probabilities: bool = False):
        """Pretraining has no segmentation to export; the encoder is judged by fine-tuning."""
        self.print_to_log_file("csm-nnunet: pretraining finished; no segmentation validation for a pretrainer. "
                               f"Fine-tune with -pretrained_weights {join(self.output_folder, 'checkpoint_final.pth')}"
                               if isfile(join(self.output_folder, "checkpoint_final.pth")) else
                               "csm-nnunet: no segmentation validation for a pretrainer.")
