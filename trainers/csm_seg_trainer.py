"""``CSMSegTrainer``: segmentation fine-tuning of the series-tokenized ViT inside nnU-Net (paper III.C).

nnU-Net does the rest: Dice + CE loss with deep supervision, dataloaders and augmentation, sliding-window inference
with ``nnUNetv2_predict`` (through the static :meth:`CSMSegTrainer.build_network_architecture`), the final
validation export, ``nnUNetv2_evaluate_folder`` and ``nnUNetv2_find_best_configuration``. Without
``-pretrained_weights`` the same trainer is the from-scratch baseline (identical architecture).

``-pretrained_weights`` goes through :func:`csm_nnunet.adapt.load_pretrained_checkpoint` (encoder copied, positions
resampled, series matched by channel name, decoder fresh; the log lists what was loaded), because nnU-Net's own loader
demands every key of the new network in the checkpoint. See :func:`_route_pretrained_weights`.
"""

from __future__ import annotations

import torch
from csm_nnunet.trainers.finetune import CSMFineTuningMixin
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn
from torch._dynamo import OptimizedModule

from csm_nnunet.network import get_preset
from csm_nnunet.overrides import apply_env_overrides, read_env_overrides
from csm_nnunet.segmentation import CSMSegmentationNetwork, SeriesTokenEncoder
from csm_nnunet.trainer_utils import (
    channel_names_of,
    configure_amp_dtype,
    drop_random_series,
    fit_patch_to_tokens,
)
from csm_nnunet.validate import check_finite_batch, check_training_setup

# Written into the plans.json copy in the results folder so the static network builder (used by nnUNetv2_predict,
# which knows only plans and configuration) rebuilds exactly the trained network.
PLANS_KEY = "csm_network"


class CSMSegTrainer(CSMFineTuningMixin, nnUNetTrainer):
    """Series-tokenized ViT encoder + series fusion + UNETR-style decoder with a full-resolution conv branch.

    Class attributes: ``preset`` (CSM_PRESET), ``fusion`` ("attention" | "concat"), ``fusion_norm`` ("layer" |
    "instance", how the fusion normalises the encoder taps), ``series_dropout`` (probability
    per training case of dropping 1..s-1 random series, so missing series at inference are expected), ``layer_decay``
    (layer-wise lr decay factor, None = off), ``warmup_fraction``, ``encoder_freeze_fraction`` (frozen-encoder start,
    see :class:`csm_nnunet.trainers.finetune.CSMFineTuningMixin`), ``fused_tokens`` (the channel-fused-token
    baseline, see :class:`csm_nnunet.segmentation.CSMSegmentationNetwork`), ``same_position_bias`` (a learned
    attention bias between one position's series tokens, see :class:`csm_nnunet.segmentation.SeriesTokenEncoder`).
    """

    preset: str = "B16"
    amp_dtype: str = "auto"  # CUDA autocast: bfloat16 where supported, else float16 ("float16" forces it)
    fusion: str = "attention"
    fusion_norm: str = "layer"
    series_dropout: float = 0.2
    fused_tokens: bool = False
    same_position_bias: bool = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        preset = read_env_overrides().get("preset", self.preset)
        self.series_names = channel_names_of(dataset_json)
        check_training_setup(plans, configuration, fold, dataset_json, self.series_names)
        token = get_preset(preset).token_size
        planned = list(PlansManager(plans).get_configuration(configuration).patch_size)
        fitted = fit_patch_to_tokens(planned, token, configuration)
        # the results folder's plans.json must describe the trained network (patch grid, preset) for inference
        plans["configurations"][configuration]["patch_size"] = list(fitted)
        plans["configurations"][configuration][PLANS_KEY] = {"preset": preset, "fusion": self.fusion,
                                                             "fusion_norm": self.fusion_norm,
                                                             "fused_tokens": self.fused_tokens,
                                                             "same_position_bias": self.same_position_bias,
                                                             "series_names": self.series_names,
                                                             "base_channels": get_preset(preset).seg_channels}
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._finetuning_defaults()  # AdamW lr 5e-3, wd 0.01 (paper IV.A); checkpoint_latest every epoch
        apply_env_overrides(self, self.print_to_log_file, skip=("mask_seed", "crop_size"))
        configure_amp_dtype(self)  # bfloat16 autocast on GPUs that have it (see the function)
        if list(fitted) != planned:
            self.print_to_log_file(f"csm-nnunet: patch size {planned} is not a multiple of the token size {token}; "
                                   f"using {list(fitted)} (rounded down per axis) for training and inference.")
        self.print_to_log_file(f"csm-nnunet: {self.__class__.__name__} preset={self.preset} fusion={self.fusion} "
                               f"fusion_norm={self.fusion_norm} "
                               f"series={self.series_names} series_dropout={self.series_dropout} "
                               f"fused_tokens={self.fused_tokens} same_position_bias={self.same_position_bias}")

    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """Static, as nnU-Net's predictor needs: everything comes from the configuration (``csm_network`` key)."""
        cfg = configuration_manager.configuration.get(PLANS_KEY, {})
        return CSMSegmentationNetwork(num_input_channels, num_output_channels, configuration_manager.patch_size,
                                      preset=cfg.get("preset", read_env_overrides().get("preset", "B16")),
                                      fusion=cfg.get("fusion", "attention"),
                                      fusion_norm=cfg.get("fusion_norm", "layer"),
                                      deep_supervision=enable_deep_supervision,
                                      series_names=cfg.get("series_names"),
                                      fused_tokens=bool(cfg.get("fused_tokens", False)),
                                      base_channels=cfg.get("base_channels"),
                                      same_position_bias=bool(cfg.get("same_position_bias", False)))

    def _get_deep_supervision_scales(self):
        """Our decoder's output resolutions (full, 1/2, 1/4, ...), not the U-Net pooling of the plans. nnU-Net calls
        this after building the network (loss) and when building the dataloaders (target downsampling)."""
        return self._unwrapped().deep_supervision_scales() if self.enable_deep_supervision else None

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        self._unwrapped().deep_supervision = enabled

    def train_step(self, batch: dict) -> dict:
        """Random series dropout (:func:`csm_nnunet.trainer_utils.drop_random_series`), then nnU-Net's step. A batch
        with NaN/Inf voxels is refused first (nnU-Net's step would train on it and turn the weights into NaN)."""
        check_finite_batch(batch["data"], batch.get("keys"), self.preprocessed_dataset_folder)
        return super().train_step({**batch, "data": drop_random_series(batch["data"], self.series_dropout)})

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation step, after the same NaN/Inf check (a NaN pseudo-Dice would silently stop
        checkpoint_best from ever improving)."""
        check_finite_batch(batch["data"], batch.get("keys"), self.preprocessed_dataset_folder)
        return super().validation_step(batch)



def _route_pretrained_weights() -> None:
    """Make ``nnUNetv2_train -pretrained_weights`` adapt checkpoints for our trainers.

    nnU-Net 2.8 loads pretrained weights with a module-level function in ``nnunetv2.run.run_training`` that requires
    every key of the new network in the file (so an encoder-only checkpoint into a network with a new decoder is
    rejected) and offers no trainer hook. We wrap that one name: networks of csm-nnunet go through our explicit
    adaptation; every other network keeps nnU-Net's behaviour unchanged.
    """
    try:
        import nnunetv2.run.run_training as run_training
    except Exception:  # nnU-Net missing or broken: nothing to route
        return
    original = run_training.load_pretrained_weights
    if getattr(original, "_csm_routed", False):
        return

    def load_pretrained_weights(network, fname, verbose=False):
        mod = network.module if hasattr(network, "module") else network
        mod = mod._orig_mod if isinstance(mod, OptimizedModule) else mod
        if isinstance(mod, SeriesTokenEncoder):
            from csm_nnunet.adapt import load_pretrained_checkpoint

            return load_pretrained_checkpoint(fname, mod, mod.series_names or [], log=getattr(mod, "csm_log", print))
        return original(network, fname, verbose=verbose)

    load_pretrained_weights._csm_routed = True
    run_training.load_pretrained_weights = load_pretrained_weights


_route_pretrained_weights()
