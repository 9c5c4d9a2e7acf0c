"""Test settings and session fixtures shared by every test file.

nnU-Net must not compile or spawn workers on a 2-core CI machine; the datasets and the pretrained encoder below are
built once per test session, so every test file can reuse them.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
from e2e_helpers import REAL, fold_dir, plan, run, train

os.environ.setdefault("nnUNet_compile", "f")
os.environ.setdefault("nnUNet_def_n_proc", "1")
os.environ.setdefault("nnUNet_n_proc_DA", "0")


@pytest.fixture(scope="session")
def nnunet_env(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("nnunet")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CSM_")}
    for name in ("raw", "preprocessed", "results"):
        (root / name).mkdir()
        env[f"nnUNet_{name}"] = str(root / name)
    # OMP_WAIT_POLICY=PASSIVE: OpenMP threads sleep instead of spinning between ops; on 2 shared cores the spinning
    # threads of one nnU-Net process otherwise starve the other (epochs several times slower, results unchanged)
    env.update(nnUNet_compile="f", nnUNet_def_n_proc="1", nnUNet_n_proc_DA="0", PYTHONWARNINGS="ignore",
               OMP_WAIT_POLICY="PASSIVE")
    return env


@pytest.fixture(scope="session")
def synthetic(nnunet_env) -> dict[str, str]:
    out = Path(nnunet_env["nnUNet_raw"]) / "Dataset990_CSMSynth"
    run(["csm_nnunet", "make-dataset", "--kind", "brain", "--cases", "4", "--out", str(out), "--shape", "48", "48",
         "48", "--seed", "0", "--missing-prob", "0.25"], nnunet_env)
    missing = json.loads((out / "dataset.json").read_text()).get("missing_series", {})
    assert any(missing.values()), "the synthetic set must exercise missing series"
    plan(nnunet_env, 990)
    return nnunet_env


@pytest.fixture(scope="session")
def real(nnunet_env) -> dict[str, str]:
    if not REAL.is_dir():
        pytest.fail(f"real test data missing at {REAL}; the shared/ folder must sit beside the checkout")
    shutil.copytree(REAL, Path(nnunet_env["nnUNet_raw"]) / REAL.name)
    plan(nnunet_env, 801)  # CSMPlanner
    # nnU-Net's default plans (2d included, not preprocessed: the 2d test is refused before data is read)
    plan(nnunet_env, 801, planner=None)
    return nnunet_env


@pytest.fixture(scope="session")
def pretrained(synthetic) -> Path:
    train(synthetic, 990, "CSMPretrainer_Mask50", "nnUNetCSMPlans", {"CSM_NUM_EPOCHS": "1"})
    return fold_dir(synthetic, "Dataset990_CSMSynth", "CSMPretrainer_Mask50", "nnUNetCSMPlans") / "checkpoint_final.pth"
