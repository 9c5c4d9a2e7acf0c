"""``CSMClassifierTrainer``: per-case classification (benign/malignant, paper Tables III, IV) inside nnU-Net.

nnU-Net has no classification trainer; this one keeps everything a user knows: ``nnUNetv2_plan_and_preprocess``,
``nnUNetv2_train D 3d_fullres FOLD -tr CSMClassifierTrainer [-pretrained_weights ...]``, the folds of
``splits_final.json``, the training log, ``progress.png``, checkpoints and ``--c``/``--val``. Class labels live in
dataset.json (``class_names``, ``classification_labels``; see :mod:`csm_nnunet.class_labels`) and are validated
before nnU-Net writes anything.

What differs from segmentation:

* crops: nnU-Net's loader and training augmentation, with every crop centred on the region of interest (the lesion;
  dataset.json ``classification_roi_labels``, default every foreground label): the centre of the ROI's bounding box,
  moved by up to ``crop_jitter`` voxels, so the classifier sees the lesion and its surroundings. Validation and
  ``csm_nnunet classify`` take the same crop without the jitter (the image centre when there is no mask). The crop
  edge is the plans' patch size or ``CSM_CROP`` (a lesion crop is usually much smaller than a segmentation patch).
* loss: cross-entropy (``class_balanced``: weights inversely proportional to the class counts of the training fold).
* validation: every validation case once per epoch (not nnU-Net's random patches), AUC / accuracy / sensitivity /
  specificity in the log; ``checkpoint_best`` is the epoch with the highest validation AUC (lowest validation loss
  where the AUC is undefined because the fold holds one class).
* end of training: ``validation/summary.json``, ``validation/predictions.csv``, ``validation/roc.png``.

Missing series are handled as in segmentation: an all-zero series is absent and its tokens are dropped; training
applies random series dropout.
"""

from __future__ import annotations

import json
import os
from os.path import join
from time import time

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from csm_nnunet.trainers.finetune import CSMFineTuningMixin
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import autocast, nn

from csm_nnunet.class_labels import read_class_labels
from csm_nnunet.classification import (
    CSMClassificationNetwork,
    classification_metrics,
    crop_around,
    predictions_csv,
    resolve_roi_labels,
    roi_centre,
    save_roc_png,
)
from csm_nnunet.fileio import write_text_atomically
from csm_nnunet.network import get_preset
from csm_nnunet.overrides import apply_env_overrides, read_env_overrides
from csm_nnunet.trainer_utils import (
    backward_and_step,
    channel_names_of,
    configure_amp_dtype,
    drop_random_series,
    fit_patch_to_tokens,
    predict_sharded,
    unwrap_network,
)
from csm_nnunet.validate import check_finite_batch, check_training_setup

#: plans.json key (written into the results folder's copy) from which the static builder rebuilds the classifier
PLANS_KEY = "csm_classifier"
_METRIC_KEYS = ("val_auc", "val_accuracy", "val_sensitivity", "val_specificity")


class ROIDataLoader(nnUNetDataLoader):
    """nnU-Net's loader whose crops are centred on the bounding-box centre of the region-of-interest labels (the
    lesion), moved by up to ``jitter`` voxels per axis, the crop validation and ``classify`` take. Centring on a random
    lesion voxel instead (nnU-Net's foreground sampling) moved small lesions across token boundaries so much that the
    classifier did not learn at all within the CPU experiment's budget (docs/experiments.md); nnU-Net's spatial
    augmentation still varies the crop. Cases without ROI voxels fall back to nnU-Net's sampling."""

    def __init__(self, *args, roi_labels: tuple[int, ...] = (), jitter: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.roi_labels = tuple(roi_labels)
        self.jitter = int(jitter)

    def get_bbox(self, data_shape, force_fg, class_locations, overwrite_class=None, verbose=False):
        points = [np.asarray(class_locations[c]) for c in self.roi_labels
                  if class_locations is not None and c in class_locations and len(class_locations[c]) > 0]
        if not force_fg or not points:
            return super().get_bbox(data_shape, force_fg, class_locations, overwrite_class, verbose)
        coords = np.concatenate(points)[:, 1:]  # class_locations rows are (channel, x, y, z)
        centre = (coords.min(0) + coords.max(0) + 1) // 2
        if self.jitter:
            centre = centre + np.random.randint(-self.jitter, self.jitter + 1, size=len(centre))
        # the window may leave the image by up to what nnU-Net's loader pads (as in nnUNetDataLoader.get_bbox)
        need_to_pad = [max(int(n), int(p) - int(s)) for n, p, s in zip(self.need_to_pad, self.patch_size, data_shape)]
        lbs = [-n // 2 for n in need_to_pad]
        ubs = [int(s) + n // 2 + n % 2 - int(p) for s, n, p in zip(data_shape, need_to_pad, self.patch_size)]
        bbox_lbs = [int(np.clip(c - p // 2, lb, ub)) for c, p, lb, ub in zip(centre, self.patch_size, lbs, ubs)]
        return bbox_lbs, [lb + p for lb, p in zip(bbox_lbs, self.patch_size)]


class CSMClassifierTrainer(CSMFineTuningMixin, nnUNetTrainer):
    """Series-tokenized ViT encoder (scratch or ``-pretrained_weights``) + pooling + linear head.

    Class attributes: ``preset`` (CSM_PRESET), ``class_balanced`` (class-weighted cross-entropy), ``series_dropout``,
    ``layer_decay`` (None = off), ``head_dropout``, ``warmup_fraction``, ``fused_tokens`` (the channel-fused-token
    baseline of :class:`csm_nnunet.segmentation.SeriesTokenEncoder`), ``pooling`` (``"centre"`` or ``"mean"``, see
    :mod:`csm_nnunet.classification`), ``same_position_bias`` (a learned attention bias between one position's series
    tokens, see :class:`csm_nnunet.segmentation.SeriesTokenEncoder`).
    """

    preset: str = "B16"
    amp_dtype: str = "auto"  # CUDA autocast: bfloat16 where supported, else float16 ("float16" forces it)
    class_balanced: bool = False
    series_dropout: float = 0.2
    head_dropout: float = 0.0
    fused_tokens: bool = False
    same_position_bias: bool = False
    pooling: str = "centre"  # the tokens around the ROI-centred crop's centre, per series ("mean": every token)
    crop_size: int | None = None  # CSM_CROP; None = the plans' patch size
    crop_jitter: int = 0  # voxels the training crop centre may move around the ROI centre, per axis
    # "light": mirroring only; "nnunet": nnU-Net's full training augmentation (per-channel intensity transforms,
    # rotation, scaling), with which the CPU experiment's classifiers did not learn at all (docs/experiments.md)
    augmentation: str = "light"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # everything that can be wrong with the labels is found before nnU-Net creates the output folder
        env = read_env_overrides()
        preset = env.get("preset", self.preset)
        crop = env.get("crop_size", self.crop_size)
        self.series_names = channel_names_of(dataset_json)
        # refuses an empty preprocessed folder; returns the case ids the labels are checked against
        cases = check_training_setup(plans, configuration, fold, dataset_json, self.series_names)
        pm = PlansManager(plans)
        cm = pm.get_configuration(configuration)
        if not cases:  # only when nnUNet_preprocessed is unset
            raise FileNotFoundError("no preprocessed cases: nnUNet_preprocessed is not set; run "
                                    "nnUNetv2_plan_and_preprocess for this dataset and configuration first")
        source = join(nnUNet_preprocessed or "$nnUNet_preprocessed", pm.dataset_name, "dataset.json")
        self.class_labels, self.class_names = read_class_labels(dataset_json, cases, source=source)
        self.roi_labels = resolve_roi_labels(dataset_json)
        token = get_preset(preset).token_size
        if crop is not None and (crop < token or crop % token):
            raise ValueError(f"crop size {crop} (CSM_CROP / crop_size) must be a positive multiple of the token size "
                             f"{token} of preset {preset!r}")
        # a lesion crop (paper: lesion plus surroundings) can be much smaller than nnU-Net's segmentation patch
        fitted = fit_patch_to_tokens([crop] * 3 if crop else list(cm.patch_size), token, configuration)
        plans["configurations"][configuration]["patch_size"] = list(fitted)
        plans["configurations"][configuration][PLANS_KEY] = {
            "preset": preset, "series_names": self.series_names, "class_names": self.class_names,
            "roi_labels": self.roi_labels, "head_dropout": self.head_dropout, "fused_tokens": self.fused_tokens,
            "pooling": self.pooling, "same_position_bias": self.same_position_bias}
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._finetuning_defaults()  # AdamW lr 5e-3, wd 0.01 (paper IV.A); checkpoint_latest every epoch
        self.enable_deep_supervision = False
        self.oversample_foreground_percent = 1.0  # every crop on the ROI
        apply_env_overrides(self, self.print_to_log_file, skip=("num_val_iterations_per_epoch", "mask_seed"))
        configure_amp_dtype(self)  # bfloat16 autocast on GPUs that have it (see the function)
        self.crop_size = crop
        self.num_val_iterations_per_epoch = 0  # validation is per case, see on_validation_epoch_end
        counts = {n: sum(v == i for v in self.class_labels.values()) for i, n in enumerate(self.class_names)}
        self.print_to_log_file(f"csm-nnunet: {self.__class__.__name__} preset={self.preset} series="
                               f"{self.series_names} classes={counts} roi_labels={self.roi_labels} crop={list(fitted)}"
                               f" class_balanced={self.class_balanced} series_dropout={self.series_dropout} "
                               f"fused_tokens={self.fused_tokens} same_position_bias={self.same_position_bias} "
                               f"pooling={self.pooling} "
                               f"augmentation={self.augmentation}")
        self._val_keys: list[str] | None = None

    # ---------------------------------------------------------------- network, loss, optimiser
    @staticmethod
    def build_network_architecture(plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """Static, as nnU-Net's predictor machinery needs; the class count comes from the plans (``csm_classifier``),
        not from the segmentation labels (``num_output_channels`` is ignored)."""
        cfg = configuration_manager.configuration.get(PLANS_KEY)
        if cfg is None:
            raise ValueError(f"the plans have no {PLANS_KEY!r} entry: this model folder was not trained with "
                             f"CSMClassifierTrainer (use the results folder's own plans.json)")
        return CSMClassificationNetwork(num_input_channels, len(cfg["class_names"]), configuration_manager.patch_size,
                                        preset=cfg["preset"], series_names=cfg["series_names"],
                                        fused_tokens=bool(cfg.get("fused_tokens", False)),
                                        dropout=float(cfg.get("head_dropout", 0.0)),
                                        pooling=cfg.get("pooling", "mean"),  # models from before pooling existed
                                        same_position_bias=bool(cfg.get("same_position_bias", False)))

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        pass  # one logit vector per case

    def _build_loss(self):
        weight = None
        if self.class_balanced:
            train_keys, _ = self.do_split()
            counts = np.bincount([self.class_labels[k] for k in train_keys], minlength=len(self.class_names))
            weight = torch.tensor(len(train_keys) / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32)
            self.print_to_log_file(f"csm-nnunet: class weights {np.round(weight.numpy(), 3).tolist()} "
                                   f"(training fold counts {counts.tolist()})")
        return nn.CrossEntropyLoss(weight=weight)

    def initialize(self):
        super().initialize()  # the mixin hands the series names and the log to the network
        logged = getattr(self.logger, "local_logger", self.logger).my_fantastic_logging
        for key in _METRIC_KEYS:
            logged.setdefault(key, [])

    # ---------------------------------------------------------------- data
    def get_dataloaders(self):
        """Training: nnU-Net's loader (:class:`ROIDataLoader`) and nnU-Net's training augmentation. No patch
        validation loader: validation evaluates every validation case (see :meth:`on_validation_epoch_end`)."""
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        patch_size = self.configuration_manager.patch_size
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        regions = self.label_manager.foreground_regions if self.label_manager.has_regions else None
        if self.augmentation == "nnunet":
            transforms = self.get_training_transforms(
                patch_size, rotation, None, mirror_axes, dummy_2d,
                use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=False,
                foreground_labels=self.label_manager.foreground_labels, regions=regions,
                ignore_label=self.label_manager.ignore_label)
        elif self.augmentation == "light":
            from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
            from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms

            initial_patch_size = patch_size  # no spatial transform: the loader crops the final size
            base = self.get_validation_transforms(None, is_cascaded=False,
                                                  foreground_labels=self.label_manager.foreground_labels,
                                                  regions=regions, ignore_label=self.label_manager.ignore_label)
            transforms = ComposeTransforms([MirrorTransform(allowed_axes=mirror_axes), base]) if mirror_axes \
                else base
        else:
            raise ValueError(f"{type(self).__name__}.augmentation must be 'light' or 'nnunet', got "
                             f"{self.augmentation!r}")
        dataset_tr, _ = self.get_tr_and_val_datasets()
        loader = ROIDataLoader(dataset_tr, self.batch_size, initial_patch_size, patch_size, self.label_manager,
                               oversample_foreground_percent=self.oversample_foreground_percent,
                               sampling_probabilities=None, pad_sides=None, transforms=transforms,
                               roi_labels=tuple(self.roi_labels), jitter=self.crop_jitter)
        n = get_allowed_n_proc_DA()
        gen = SingleThreadedAugmenter(loader, None) if n == 0 else NonDetMultiThreadedAugmenter(
            data_loader=loader, transform=None, num_processes=n, num_cached=max(6, n // 2), seeds=None,
            pin_memory=self.device.type == "cuda", wait_time=0.002)
        _ = next(gen)
        return gen, None

    def on_train_start(self):
        train_keys, val_keys = self.do_split()
        self._val_keys = sorted(val_keys)
        for name, keys in (("training", train_keys), ("validation", val_keys)):
            classes = sorted({self.class_labels[k] for k in keys})
            if name == "training" and len(classes) < 2:
                raise ValueError(f"fold {self.fold}: every training case has class "
                                 f"{self.class_names[classes[0]]!r}; a classifier needs two classes to learn from. "
                                 f"Write a splits_final.json whose training folds hold every class")
            if name == "validation" and len(classes) < 2:
                self.print_to_log_file(f"csm-nnunet WARNING: fold {self.fold}'s validation cases all have class "
                                       f"{[self.class_names[c] for c in classes]}: the validation AUC is undefined; "
                                       "checkpoint_best follows the validation loss instead")
        super().on_train_start()

    def _target(self, keys) -> torch.Tensor:
        return torch.tensor([self.class_labels[str(k)] for k in keys], dtype=torch.long, device=self.device)

    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def train_step(self, batch: dict) -> dict:
        check_finite_batch(batch["data"], batch.get("keys"), self.preprocessed_dataset_folder)
        data = drop_random_series(batch["data"], self.series_dropout).to(self.device, non_blocking=True)
        target = self._target(batch["keys"])
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.loss(self.network(data), target)
        backward_and_step(self, loss, max_norm=12)
        return {"loss": loss.detach().cpu().numpy()}

    # ---------------------------------------------------------------- validation
    def validation_keys(self) -> list[str]:
        if self._val_keys is None:
            self._val_keys = sorted(self.do_split()[1])
        return self._val_keys

    @torch.no_grad()
    def predict_preprocessed(self, keys: list[str]) -> np.ndarray:
        """Class probabilities ``[len(keys), K]`` of preprocessed cases: one ROI-centred crop each (the same crop
        ``csm_nnunet classify`` takes), absent series dropped by the network."""
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        dataset = self.dataset_class(self.preprocessed_dataset_folder, keys)
        patch = self.configuration_manager.patch_size
        net = unwrap_network(self)  # no DDP forward: ranks predict different numbers of cases (predict_sharded)
        was_training = net.training
        net.eval()
        out = []
        for start in range(0, len(keys), self.batch_size):
            crops = []
            for key in keys[start:start + self.batch_size]:
                data, seg, _, _ = dataset.load_case(key)
                centre = roi_centre(data.shape[1:], seg[:] if seg is not None else None, self.roi_labels)
                crops.append(crop_around(data, centre, patch))
            x = torch.from_numpy(np.stack(crops))
            check_finite_batch(x, keys[start:start + self.batch_size], self.preprocessed_dataset_folder)
            x = x.to(self.device)
            with self._autocast():
                logits = net(x)
            out.append(torch.softmax(logits.float(), 1).cpu().numpy())
        net.train(was_training)
        return np.concatenate(out) if out else np.zeros((0, len(self.class_names)))

    def on_validation_epoch_end(self, val_outputs: list[dict]):
        keys = self.validation_keys()
        labels = np.array([self.class_labels[k] for k in keys])
        probs = predict_sharded(keys, self.predict_preprocessed)  # each DDP rank a share, every rank all results
        weight = self.loss.weight.cpu().numpy() if self.loss.weight is not None else np.ones(len(self.class_names))
        nll = -np.log(np.clip(probs[np.arange(len(keys)), labels], 1e-12, 1.0))
        loss = float((weight[labels] * nll).sum() / weight[labels].sum())
        m = classification_metrics(labels, probs, self.class_names)
        self._last_metrics = m
        epoch = self.current_epoch
        self.logger.log("val_losses", loss, epoch)
        self.logger.log("mean_fg_dice", float("nan"), epoch)  # nnU-Net's logger wants a value per key and epoch
        self.logger.log("dice_per_class_or_region", [], epoch)
        for key, value in zip(_METRIC_KEYS, (m["auc"], m["accuracy"], m["sensitivity"], m["specificity"])):
            self.logger.log(key, float("nan") if value is None else float(value), epoch)

    def on_epoch_end(self):
        self.logger.log("epoch_end_timestamps", time(), self.current_epoch)
        get = self.logger.get_value
        self.print_to_log_file("train_loss", np.round(get("train_losses", step=-1), decimals=4))
        self.print_to_log_file("val_loss", np.round(get("val_losses", step=-1), decimals=4))
        m = self._last_metrics
        fmt = lambda v: "undefined" if v is None else f"{v:.4f}"  # noqa: E731
        self.print_to_log_file(f"val AUC {fmt(m['auc'])}, accuracy {fmt(m['accuracy'])}, sensitivity "
                               f"{fmt(m['sensitivity'])}, specificity {fmt(m['specificity'])} (n={m['n']})")
        self.print_to_log_file(f"Epoch time: {np.round(get('epoch_end_timestamps', step=-1) - get('epoch_start_timestamps', step=-1), decimals=2)} s")  # noqa: E501
        epoch = self.current_epoch
        if (epoch + 1) % self.save_every == 0 and epoch != self.num_epochs - 1:
            self.save_checkpoint(join(self.output_folder, "checkpoint_latest.pth"))
        # _best_ema holds the best score: the AUC, or minus the validation loss where the AUC is undefined
        score = m["auc"] if m["auc"] is not None else -float(get("val_losses", step=-1))
        if self._best_ema is None or score > self._best_ema:
            self._best_ema = float(score)
            what = f"validation AUC {m['auc']:.4f}" if m["auc"] is not None else \
                f"validation loss {-score:.4f} (AUC undefined)"
            self.print_to_log_file(f"New best {what}")
            self.save_checkpoint(join(self.output_folder, "checkpoint_best.pth"))
        if self.local_rank == 0:
            self.logger.plot_progress_png(self.output_folder)
        self.current_epoch += 1

    def perform_actual_validation(self, save_probabilities: bool = False):
        """Every validation case with the current weights (final, or best with ``--val_best``):
        ``validation/summary.json``, ``predictions.csv`` and ``roc.png``, each written atomically."""
        if self.local_rank != 0:
            return
        keys = self.validation_keys()
        labels = [self.class_labels[k] for k in keys]
        probs = self.predict_preprocessed(keys)
        m = classification_metrics(labels, probs, self.class_names)
        folder = join(self.output_folder, "validation")
        os.makedirs(folder, exist_ok=True)
        write_text_atomically(join(folder, "predictions.csv"), predictions_csv(keys, probs, self.class_names, labels))
        save_roc_png(join(folder, "roc.png"), labels, probs, self.class_names, m,
                     title=f"{self.__class__.__name__} fold {self.fold}")
        summary = {**m, "fold": self.fold, "cases": keys}
        write_text_atomically(join(folder, "summary.json"), json.dumps(summary, indent=2))
        auc = "undefined (" + m["auc_note"] + ")" if m["auc"] is None else f"{m['auc']:.4f}"
        self.print_to_log_file(f"csm-nnunet: validation of {len(keys)} cases: AUC {auc}, accuracy "
                               f"{m['accuracy']:.4f}; written to {folder}")


class CSMClassifierTrainer_Balanced(CSMClassifierTrainer):
    """Class-weighted cross-entropy (weights inversely proportional to the training fold's class counts)."""

    class_balanced = True


class CSMClassifierTrainer_FusedTokens(CSMClassifierTrainer):
    """The same classifier on channel-fused tokens (one token per patch, all series as channels): the baseline for
    per-series tokens; from pretrained weights it loads only ``MAEPretrainer`` checkpoints."""

    fused_tokens = True


class CSMClassifierTrainer_LayerDecay(CSMClassifierTrainer):
    """Layer-wise lr decay 0.75 (MAE fine-tuning practice)."""

    layer_decay = 0.75


class CSMClassifierTrainer_SamePositionBias(CSMClassifierTrainer):
    """A learned attention bias between the series tokens of one position (beyond the paper, see
    :class:`csm_nnunet.segmentation.SeriesTokenEncoder`): lets the encoder combine T1ce with T1 at the same voxels,
    which the classifier's per-series pooling and linear head cannot."""

    same_position_bias = True


class CSMClassifierTrainer_HeadFirst(CSMClassifierTrainer):
    """The encoder stays frozen for the first 20 % of the epochs while the fresh head learns on the pretrained
    features, then everything trains (linear-probe-then-fine-tune; the classification twin of
    ``CSMSegTrainer_DecoderFirst``, which kept CSM's features at 10 % labels in segmentation)."""

    encoder_freeze_fraction = 0.2
