"""``CSMPlanner``: nnU-Net experiment planning for ViT-based Cross-Series Masking.

Use: ``nnUNetv2_plan_and_preprocess -d ID -pl CSMPlanner`` (plans file ``nnUNetCSMPlans.json``; ``-overwrite_plans_name
NAME`` still renames it). It is nnU-Net's default ``ExperimentPlanner`` with four changes, each kept as small as
nnU-Net's hooks allow:

1. **Patch size**: a ViT cuts the patch into cubes of ``token_size`` (16) voxels, so every axis of the 3D patch must
   be a multiple of 16 - and the same plans must still drive nnU-Net's own U-Net (baselines, fine-tuning with
   ``nnUNetTrainer``), whose patch must be divisible by its pooling factors. We take nnU-Net's patch, round each axis
   *down* to a multiple of ``lcm(token_size, shape_must_be_divisible_by)`` (never below one token) and recompute the
   U-Net topology for the new patch with nnU-Net's own ``get_pool_and_conv_props`` until both hold. Rounding down
   keeps the U-Net's patch within nnU-Net's VRAM estimate (only an axis shorter than one token grows, to 16).
2. **Batch size** from a token budget instead of the U-Net VRAM estimate: a ViT's cost scales with the number of
   tokens, which for CSM is series x tokens per series. ``batch = tokens_per_batch // (n_series * tokens_per_series)``
   with ``tokens_per_batch = 4096`` (a moderate budget for a ViT-B-sized encoder with mixed precision on one GPU;
   subclass to change it), then capped exactly like nnU-Net caps it (at most ``max_dataset_covered`` = 5 % of the
   dataset's voxels per step, never below ``UNet_min_batch_size`` = 2). For small patches this batch can exceed what
   nnU-Net would give its U-Net; ``csm.nnunet_batch_size`` (below) is nnU-Net's own choice for its (never smaller)
   patch and hence a safe U-Net batch size for these plans.
3. **Target spacing**: a token is a cube in voxels, so strongly anisotropic spacing makes tokens thin slabs in mm. The
   3d_fullres target spacing is nnU-Net's, with every axis coarser than ``max_spacing_anisotropy`` (2.0) x the finest
   axis lowered to that bound (through-plane upsampling; in-plane resolution is never reduced, because that is where
   small lesions live). This grows the data by up to (nnU-Net spacing / capped spacing) along the coarse axis; pass
   ``-overwrite_target_spacing`` to choose another trade-off (it is then used exactly as given, uncapped).
4. Extra, informational keys per 3D configuration under ``"csm"``: token size, tokens per sample, the budget, and the
   patch/batch size nnU-Net itself would have used (nnU-Net ignores unknown keys).

Before planning, every training case is checked (:func:`csm_nnunet.validate.check_raw_dataset`: all channel files
present, 3D, one voxel grid per case, finite voxels, a known ``missing_series``), so a malformed case is refused with
its file named before plans or preprocessed data are written. nnU-Net's fingerprinting runs before any planner; pass
``-fpe CSMFingerprintExtractor`` to run the same check before it, too (docs/reliability.md).

Unchanged: the 2d configuration (planned from nnU-Net's own, uncapped spacing, so it equals what the default planner
writes apart from the data identifier; the CSM ViT trainers are 3D-only), ``transpose_forward`` (from nnU-Net's
spacing), normalisation schemes, resampling functions, the U-Net architecture family and the 3d_lowres logic.
"""

from __future__ import annotations

from contextlib import contextmanager
from math import lcm

import numpy as np
from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

__all__ = ["CSMPlanner", "CSMFingerprintExtractor", "CSM_PLANS_NAME", "cap_spacing_anisotropy",
           "token_compatible_topology"]

CSM_PLANS_NAME = "nnUNetCSMPlans"


def cap_spacing_anisotropy(spacing, max_ratio: float) -> np.ndarray:
    """Lower every axis coarser than ``max_ratio`` x the finest axis to exactly that bound (finest axis unchanged)."""
    spacing = np.asarray(spacing, dtype=np.float64).copy()
    bound = float(spacing.min()) * max_ratio
    spacing[spacing > bound] = bound
    return spacing


def token_compatible_topology(spacing, patch_size, token_size: int, min_feature_map_edge_length: int,
                              max_iterations: int = 64):
    """Largest patch <= ``patch_size`` valid for both a ViT with ``token_size`` and nnU-Net's U-Net topology.

    Returns ``(patch_size, pool_op_kernel_sizes, conv_kernel_sizes, shape_must_be_divisible_by)`` as computed by
    nnU-Net's ``get_pool_and_conv_props`` for the returned patch, where every axis of the patch is a multiple of
    ``lcm(token_size, shape_must_be_divisible_by[axis])`` and at least one token. Iterates because the topology
    depends on the patch: rounding an axis down can remove a pooling stage (smaller divisor, fine) and raising a
    sub-token axis to one token can add one (the divisor grows, so we round again).
    """
    patch = [int(p) for p in patch_size]
    for _ in range(max_iterations):
        _, pool_kernels, conv_kernels, padded, divisible_by = get_pool_and_conv_props(
            spacing, patch, min_feature_map_edge_length, 999999)
        steps = [lcm(int(token_size), int(d)) for d in divisible_by]
        if [int(p) for p in padded] == patch and all(p % s == 0 for p, s in zip(patch, steps)):
            return tuple(patch), pool_kernels, conv_kernels, tuple(int(d) for d in divisible_by)
        patch = [max(s, (p // s) * s) for p, s in zip(patch, steps)]
    raise RuntimeError(f"no patch size compatible with token size {token_size} and the U-Net topology found for "
                       f"spacing {list(spacing)} starting from {list(patch_size)}")


def _check_raw_inputs(raw_folder: str, dataset_json: dict) -> list[str]:
    """:func:`csm_nnunet.validate.check_raw_dataset` with the dataset's own nnU-Net reader (voxels as nnU-Net will
    see them); returns the case ids."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    from csm_nnunet.validate import check_raw_dataset, raw_training_cases

    example = next(iter(raw_training_cases(raw_folder, dataset_json).values()))[0][0]
    reader = determine_reader_writer_from_dataset_json(dataset_json, example)
    cases = check_raw_dataset(raw_folder, dataset_json, reader_class=reader)
    print(f"csm-nnunet: {len(cases)} training case(s) checked (channel files, 3D, one grid per case, finite voxels)")
    return cases


class CSMFingerprintExtractor(DatasetFingerprintExtractor):
    """nnU-Net's fingerprint extractor preceded by csm-nnunet's input checks (``-fpe CSMFingerprintExtractor``), and
    with a smaller sample for the foreground intensity statistics.

    Checks: nnU-Net fingerprints before any planner runs, and some malformed inputs crash it far from the cause (a
    missing channel file: an ``IndexError`` after every case was read; an empty imagesTr: ``StopIteration``). This
    names the file before nnU-Net reads or writes anything.

    Sample: nnU-Net draws 10^8 foreground voxels per series whatever the dataset's size (10^8 / n per case, with
    replacement) and takes percentiles over all of them, which costs ~50 s and 5.5 GB peak memory even for a 3-case,
    4-series dataset. Those statistics (mean, sd, 0.5/50/99.5 percentiles) feed only nnU-Net's ``CTNormalization``; MRI
    series get ``ZScoreNormalization``, which computes its statistics per case at preprocessing time. We draw
    ``intensity_samples`` = 10^6 instead: the standard error of a 0.5 % percentile from 10^6 draws is ~0.007
    percentile points, far below what a clipping bound needs. Everything else in the fingerprint (spacings, shapes,
    cropping) is nnU-Net's, computed as it computes them. Measured (time, memory, agreement) in docs/benchmarks.md,
    "Dataset fingerprint"."""

    #: foreground voxels drawn per series over the whole dataset for the intensity statistics (nnU-Net: 10^8)
    intensity_samples: float = 1e6

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.num_foreground_voxels_for_intensitystats = self.intensity_samples

    def run(self, overwrite_existing: bool = False) -> dict:
        _check_raw_inputs(self.input_folder, self.dataset_json)
        return super().run(overwrite_existing)


class CSMPlanner(ExperimentPlanner):
    """nnU-Net ExperimentPlanner for CSM ViT pretraining/fine-tuning; default plans name ``nnUNetCSMPlans``.

    See the module docstring for what differs from nnU-Net's default planner and why.
    """

    token_size: int = 16
    tokens_per_batch: int = 4096
    max_spacing_anisotropy: float = 2.0
    _cap_spacing: bool = True  # switched off by _nnunet_spacing()

    def __init__(self, dataset_name_or_id: str | int, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = CSM_PLANS_NAME,
                 overwrite_target_spacing: list[float] | tuple[float, ...] | None = None,
                 suppress_transpose: bool = False) -> None:
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        self._cap_spacing = True
        _check_raw_inputs(self.raw_dataset_folder, self.dataset_json)  # before any plans/preprocessed data exist

    @contextmanager
    def _nnunet_spacing(self):
        """Temporarily plan with nnU-Net's uncapped fullres spacing (for the transpose and the 2d configuration)."""
        previous, self._cap_spacing = self._cap_spacing, False
        try:
            yield
        finally:
            self._cap_spacing = previous

    @staticmethod
    def static_estimate_VRAM_usage(patch_size, input_channels: int, output_channels: int, arch_class_name: str,
                                   arch_kwargs: dict, arch_kwargs_req_import) -> int:
        """nnU-Net's estimate, minus its crash under ``nnUNet_n_proc_DA=0``.

        nnU-Net limits torch to ``nnUNet_n_proc_DA`` threads while it instantiates the network, and
        ``torch.set_num_threads(0)`` raises; 0 is the natural setting on small CPU machines and in our tests.
        """
        import torch
        from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

        previous = torch.get_num_threads()
        torch.set_num_threads(max(1, get_allowed_n_proc_DA()))
        try:
            net = get_network_from_plans(arch_class_name, arch_kwargs, arch_kwargs_req_import, input_channels,
                                         output_channels, allow_init=False)
            return net.compute_conv_feature_map_size(patch_size)
        finally:
            torch.set_num_threads(previous)

    def determine_fullres_target_spacing(self) -> np.ndarray:
        spacing = super().determine_fullres_target_spacing()
        if self.overwrite_target_spacing is not None or not self._cap_spacing:
            return spacing
        return cap_spacing_anisotropy(spacing, self.max_spacing_anisotropy)

    def determine_transpose(self):
        # nnU-Net puts its coarsest axis first; capping could create ties or reorder axes, and the transpose is shared
        # with the 2d configuration, which must stay as nnU-Net plans it.
        with self._nnunet_spacing():
            return super().determine_transpose()

    def _nnunet_2d_inputs(self) -> tuple[np.ndarray, np.ndarray, float]:
        """(spacing, median shape, approx. dataset voxels) that nnU-Net's plan_experiment passes for 2d."""
        with self._nnunet_spacing():
            fullres_spacing = self.determine_fullres_target_spacing()
            transpose_forward, _ = self.determine_transpose()
        new_shapes = [compute_new_shape(shape, spacing, fullres_spacing) for spacing, shape in
                      zip(self.dataset_fingerprint["spacings"], self.dataset_fingerprint["shapes_after_crop"])]
        median_shape = np.median(new_shapes, 0)[transpose_forward]
        n_voxels = float(np.prod(median_shape, dtype=np.float64) * self.dataset_json["numTraining"])
        return fullres_spacing[transpose_forward][1:], median_shape[1:], n_voxels

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier: str,
                                    approximate_n_voxels_dataset: float, _cache: dict) -> dict:
        if len(spacing) != 3:
            spacing, median_shape, approximate_n_voxels_dataset = self._nnunet_2d_inputs()
            return super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                       approximate_n_voxels_dataset, _cache)

        plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                   approximate_n_voxels_dataset, _cache)
        patch_size, pool_kernels, conv_kernels, _ = token_compatible_topology(
            spacing, plan["patch_size"], self.token_size, self.UNet_featuremap_min_edge_length)
        n_stages = len(pool_kernels)
        plan["architecture"]["arch_kwargs"].update({
            "n_stages": n_stages,
            "features_per_stage": tuple(min(self.UNet_max_features_3d, self.UNet_base_num_features * 2 ** i)
                                        for i in range(n_stages)),
            "kernel_sizes": conv_kernels,
            "strides": pool_kernels,
            "n_conv_per_stage": self.UNet_blocks_per_stage_encoder[:n_stages],
            "n_conv_per_stage_decoder": self.UNet_blocks_per_stage_decoder[:n_stages - 1],
        })

        n_series = len(self.dataset_json["channel_names"] if "channel_names" in self.dataset_json
                       else self.dataset_json["modality"])
        tokens_per_sample = n_series * int(np.prod([p // self.token_size for p in patch_size]))
        batch_size = max(self.tokens_per_batch // tokens_per_sample, self.UNet_min_batch_size)
        # nnU-Net's overfitting cap: one step sees at most max_dataset_covered of the dataset, but never < min bs
        bs_dataset_cap = round(approximate_n_voxels_dataset * self.max_dataset_covered /
                               np.prod(patch_size, dtype=np.float64))
        batch_size = max(min(batch_size, bs_dataset_cap), self.UNet_min_batch_size)

        plan["csm"] = {
            "token_size": self.token_size,
            "tokens_per_sample": tokens_per_sample,
            "tokens_per_batch_budget": self.tokens_per_batch,
            "nnunet_patch_size": [int(i) for i in plan["patch_size"]],
            "nnunet_batch_size": int(plan["batch_size"]),
        }
        plan["patch_size"] = tuple(int(i) for i in patch_size)
        plan["batch_size"] = int(batch_size)
        return plan
