"""CSMPlanner through nnU-Net's own planning API, on synthetic data and on a copy of the real OpenMS dataset.

nnU-Net reads nnUNet_raw/nnUNet_preprocessed when ``nnunetv2.paths`` is first imported, so fingerprinting and
planning run in one subprocess with the tmp folders in its environment (this file doubles as that subprocess's
script, see ``_plan_all``); the tests compare the plans files it writes. One subprocess for all datasets keeps the
torch import cost to one.

The planner is imported under its installed name ``csm_nnunet.planners``; from a source checkout (PYTHONPATH=repo,
where ``planners/`` is not yet mapped into the package) it is loaded from ``planners/__init__.py`` under that name.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
LESJAK = Path("/work/shared/data/Dataset801_OpenMSLesjak2mm")
NNUNET_ENV = {"nnUNet_compile": "f", "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1"}
# dataset id -> raw folder name
DATASETS = {
    990: "Dataset990_CSMSynthBrain",  # isotropic 1.5 mm, 48^3, 4 series
    991: "Dataset991_CSMSynthAniso",  # prostate 16 x 64 x 64 at 5 x 1 x 1 mm: nnU-Net keeps 5 mm, we cap to 2 mm
    801: LESJAK.name,  # real: 3 MS patients, 4 series, 91 x 109 x 91 at 2 mm
}


def import_csm_planners():
    """``csm_nnunet.planners``, installed or (source checkout) loaded from the repository's planners/ folder."""
    try:
        return importlib.import_module("csm_nnunet.planners")
    except ModuleNotFoundError as e:
        if e.name != "csm_nnunet.planners":
            raise
    spec = importlib.util.spec_from_file_location("csm_nnunet.planners", REPO / "planners" / "__init__.py",
                                                  submodule_search_locations=[str(REPO / "planners")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["csm_nnunet.planners"] = module
    spec.loader.exec_module(module)
    return module


def _plan_all(root: str) -> None:
    """Subprocess body: fingerprint, plan with nnU-Net's default planner and with CSMPlanner, build the U-Net."""
    import torch
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
        preprocess_dataset,
    )
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    class QuickFingerprintExtractor(DatasetFingerprintExtractor):
        """nnU-Net samples 1e8 / n_cases foreground voxels per series and case for its intensity statistics (~40 s
        per tiny dataset on 2 cores); 1e5 changes only those statistics, which neither planner's choices use here."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.num_foreground_voxels_for_intensitystats = 1e5

    planner_cls = import_csm_planners().CSMPlanner
    out = {}
    for dataset_id in DATASETS:
        extract_fingerprint_dataset(dataset_id, QuickFingerprintExtractor, num_processes=1, verbose=False,
                                    show_progress_bar=False)
        # nnU-Net's own planner crashes with nnUNet_n_proc_DA=0 (torch.set_num_threads(0)); CSMPlanner does not
        os.environ["nnUNet_n_proc_DA"] = "1"
        plan_experiment_dataset(dataset_id, ExperimentPlanner)
        os.environ["nnUNet_n_proc_DA"] = "0"
        _, name = plan_experiment_dataset(dataset_id, planner_cls)
        out[dataset_id] = name
    _, out["renamed"] = plan_experiment_dataset(990, planner_cls, overwrite_plans_name="MyCSMPlans")

    class SmallBudgetPlanner(planner_cls):
        """Token budget of 4 samples (4 series x 27 tokens each) with nnU-Net's dataset cap lifted to 100 %."""

        tokens_per_batch = 4 * 4 * 27

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.max_dataset_covered = 1.0

    plan_experiment_dataset(990, SmallBudgetPlanner, overwrite_plans_name="SmallBudgetPlans")

    # nnU-Net's preprocessing runs on the CSM plans
    preprocess_dataset(990, "nnUNetCSMPlans", ("3d_fullres",), [1], show_progress_bar=False)

    # nnU-Net's U-Net built from the CSM plans must accept the CSM patch size
    with open(os.path.join(root, "preprocessed", DATASETS[990], "nnUNetCSMPlans.json")) as f:
        cfg = json.load(f)["configurations"]["3d_fullres"]
    arch = cfg["architecture"]
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                 4, 4, allow_init=True, deep_supervision=False)
    with torch.no_grad():
        y = net(torch.zeros(1, 4, *cfg["patch_size"]))
    out["unet_output_shape"] = list(y.shape)
    with open(os.path.join(root, "result.json"), "w") as f:
        json.dump(out, f)


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> Path:
    from csm_nnunet.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("nnunet")
    raw = root / "raw"
    make_synthetic_dataset(str(raw / DATASETS[990]), num_cases=6, kind="brain", seed=3)
    make_synthetic_dataset(str(raw / DATASETS[991]), num_cases=4, kind="prostate", shape=(16, 64, 64),
                           spacing=(5.0, 1.0, 1.0), seed=4)
    shutil.copytree(LESJAK, raw / LESJAK.name)
    env = dict(os.environ, **NNUNET_ENV, nnUNet_raw=str(raw), nnUNet_preprocessed=str(root / "preprocessed"),
               nnUNet_results=str(root / "results"))
    proc = subprocess.run([sys.executable, __file__, str(root)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return root


def _plans(root: Path, dataset_id: int, name: str) -> dict:
    with open(root / "preprocessed" / DATASETS[dataset_id] / f"{name}.json") as f:
        return json.load(f)


def _assert_token_and_unet_compatible(cfg: dict, token_size: int = 16) -> None:
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    patch = cfg["patch_size"]
    strides = np.array(cfg["architecture"]["arch_kwargs"]["strides"])
    unet_divisor = np.prod(strides, axis=0)
    assert all(p % token_size == 0 and p >= token_size for p in patch), patch
    assert all(p % d == 0 for p, d in zip(patch, unet_divisor)), (patch, unet_divisor)
    # the topology is nnU-Net's own for this patch and spacing
    _, pool, conv, padded, _ = get_pool_and_conv_props(cfg["spacing"], patch, 4, 999999)
    assert list(padded) == list(patch)
    assert [list(s) for s in pool] == cfg["architecture"]["arch_kwargs"]["strides"]
    assert [list(k) for k in conv] == cfg["architecture"]["arch_kwargs"]["kernel_sizes"]
    assert cfg["architecture"]["arch_kwargs"]["n_stages"] == len(pool)


@pytest.mark.parametrize("dataset_id", sorted(DATASETS))
def test_csm_plans_vs_default(planned: Path, dataset_id: int) -> None:
    default = _plans(planned, dataset_id, "nnUNetPlans")
    csm = _plans(planned, dataset_id, "nnUNetCSMPlans")
    assert csm["plans_name"] == "nnUNetCSMPlans" and csm["experiment_planner_used"] == "CSMPlanner"
    assert csm["transpose_forward"] == default["transpose_forward"]
    with open(planned / "raw" / DATASETS[dataset_id] / "dataset.json") as f:
        n_series = len(json.load(f)["channel_names"])

    for name, cfg in csm["configurations"].items():
        if "patch_size" not in cfg:  # 3d_cascade_fullres only inherits
            continue
        ref = default["configurations"]["3d_fullres" if name == "3d_lowres" else name]
        assert cfg["normalization_schemes"] == ref["normalization_schemes"]
        assert cfg["use_mask_for_norm"] == ref["use_mask_for_norm"]
        if name == "2d":  # exactly nnU-Net's
            assert {k: v for k, v in cfg.items() if k != "data_identifier"} == \
                   {k: v for k, v in ref.items() if k != "data_identifier"}
            continue
        _assert_token_and_unet_compatible(cfg)
        assert max(cfg["spacing"]) <= 2.0 * min(cfg["spacing"]) + 1e-6
        assert cfg["batch_size"] >= 2
        tokens = n_series * int(np.prod([p // 16 for p in cfg["patch_size"]]))
        assert cfg["csm"]["tokens_per_sample"] == tokens
        assert cfg["batch_size"] == 2 or cfg["batch_size"] <= 4096 // tokens
        assert cfg["data_identifier"] == f"nnUNetCSMPlans_{name}"


def test_batch_size_from_token_budget(planned: Path) -> None:
    # 4 series x (48/16)^3 tokens = 108 tokens per sample; budget 432 -> 4 samples (dataset cap lifted)
    cfg = _plans(planned, 990, "SmallBudgetPlans")["configurations"]["3d_fullres"]
    assert cfg["csm"]["tokens_per_sample"] == 108
    assert cfg["batch_size"] == 4
    # with nnU-Net's 5 % dataset cap (6 cases of 48^3, patch 48^3 -> 0.3 samples) the minimum of 2 wins
    assert _plans(planned, 990, "nnUNetCSMPlans")["configurations"]["3d_fullres"]["batch_size"] == 2


def test_preprocessing_runs_on_csm_plans(planned: Path) -> None:
    folder = planned / "preprocessed" / DATASETS[990] / "nnUNetCSMPlans_3d_fullres"
    cases = {p.name.split(".")[0] for p in folder.iterdir() if p.suffix == ".pkl"}
    assert cases == {f"brain_{i:03d}" for i in range(6)}


def test_spacing_cap_on_anisotropic_data(planned: Path) -> None:
    default = _plans(planned, 991, "nnUNetPlans")["configurations"]["3d_fullres"]
    csm = _plans(planned, 991, "nnUNetCSMPlans")["configurations"]["3d_fullres"]
    assert default["spacing"] == pytest.approx([5.0, 1.0, 1.0])  # nnU-Net keeps the thick slices
    assert csm["spacing"] == pytest.approx([2.0, 1.0, 1.0])
    assert csm["median_image_size_in_voxels"][0] == pytest.approx(40, abs=1)  # 16 slices x 5 mm / 2 mm


def test_isotropic_data_keeps_nnunet_spacing(planned: Path) -> None:
    for dataset_id, spacing in ((990, [1.5] * 3), (801, [2.0] * 3)):
        cfg = _plans(planned, dataset_id, "nnUNetCSMPlans")["configurations"]["3d_fullres"]
        assert cfg["spacing"] == pytest.approx(spacing)
        assert cfg["spacing"] == _plans(planned, dataset_id, "nnUNetPlans")["configurations"]["3d_fullres"]["spacing"]


def test_overwrite_plans_name_and_unet_forward(planned: Path) -> None:
    with open(planned / "result.json") as f:
        result = json.load(f)
    assert result["990"] == result["801"] == "nnUNetCSMPlans"
    assert result["renamed"] == "MyCSMPlans"
    renamed = _plans(planned, 990, "MyCSMPlans")
    assert renamed["plans_name"] == "MyCSMPlans"
    assert renamed["configurations"]["3d_fullres"]["data_identifier"] == "MyCSMPlans_3d_fullres"
    patch = _plans(planned, 990, "nnUNetCSMPlans")["configurations"]["3d_fullres"]["patch_size"]
    assert result["unet_output_shape"] == [1, 4, *patch]


@pytest.mark.parametrize("spacing, patch", [
    ((1.0, 1.0, 1.0), (176, 176, 176)),  # 176 -> 5 poolings (divisor 32) -> must drop to 160
    ((1.0, 1.0, 1.0), (40, 56, 72)),
    ((2.0, 1.0, 1.0), (24, 192, 160)),
    ((3.0, 0.7, 0.7), (8, 320, 256)),  # a sub-token axis is raised to one token
    ((1.5, 1.5, 1.5), (48, 48, 48)),
])
def test_token_compatible_topology(spacing, patch) -> None:
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    topo = import_csm_planners().csm_planner.token_compatible_topology
    new_patch, pool, _, divisor = topo(spacing, patch, 16, 4)
    for p, old, d in zip(new_patch, patch, divisor):
        assert p % 16 == 0 and p % d == 0 and p >= 16
        assert p <= max(old, 16)
    assert np.array_equal(np.prod(np.array(pool), axis=0), divisor)
    assert tuple(get_pool_and_conv_props(spacing, new_patch, 4, 999999)[3]) == new_patch


def test_cap_spacing_anisotropy() -> None:
    cap = import_csm_planners().csm_planner.cap_spacing_anisotropy
    assert cap([5.0, 1.0, 1.0], 2.0) == pytest.approx([2.0, 1.0, 1.0])
    assert cap([3.0, 0.5, 0.8], 2.0) == pytest.approx([1.0, 0.5, 0.8])
    assert cap([1.5, 1.5, 1.5], 2.0) == pytest.approx([1.5, 1.5, 1.5])


def test_default_plans_name() -> None:
    planners = import_csm_planners()
    assert "CSMPlanner" in planners.__all__
    assert planners.CSM_PLANS_NAME == "nnUNetCSMPlans"
    assert planners.CSMPlanner.token_size == 16
    assert inspect.signature(planners.CSMPlanner.__init__).parameters["plans_name"].default == "nnUNetCSMPlans"


if __name__ == "__main__":
    _plan_all(sys.argv[1])
