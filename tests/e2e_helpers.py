"""Shared pieces of the end-to-end tests: run nnU-Net's and our console scripts in subprocesses, as a user does.

Fixtures that build datasets and models live in ``conftest.py`` (session scope, so every test file reuses one
synthetic dataset, one planned real-MRI dataset and one pretrained encoder).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "Dataset801_OpenMSLesjak2mm"
SHORT = {"CSM_PRESET": "tiny", "CSM_NUM_EPOCHS": "2", "CSM_ITERS_PER_EPOCH": "2", "CSM_VAL_ITERS": "1"}


def run(cmd: list[str], env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    exe = shutil.which(cmd[0], path=str(BIN)) or cmd[0]
    proc = subprocess.run([exe, *cmd[1:]], env=env, capture_output=True, text=True, timeout=900,
                          cwd=env["nnUNet_results"])  # a user's folder, not the checkout
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def plan(env: dict[str, str], dataset_id: int, planner: str | None = "CSMPlanner",
         configurations: tuple[str, ...] = ("3d_fullres",), fpe: str | None = "CSMFingerprintExtractor") -> None:
    """``nnUNetv2_plan_and_preprocess``; ``fpe=None`` is nnU-Net's own fingerprint extractor (its 10^8-voxel intensity
    sample took ~50 s for Dataset801 here, docs/benchmarks.md; the fixtures use ours and one test keeps the plain
    command)."""
    # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which must be >= 1 there
    cmd = ["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", *configurations, "-np", "1"]
    cmd += (["-pl", planner] if planner else []) + (["-fpe", fpe] if fpe else [])
    run(cmd, {**env, "nnUNet_n_proc_DA": "1"})


def fold_dir(env: dict[str, str], dataset: str, trainer: str, plans: str, fold: str = "all") -> Path:
    return Path(env["nnUNet_results"]) / dataset / f"{trainer}__{plans}__3d_fullres" / f"fold_{fold}"


def train(env: dict[str, str], dataset_id: int, trainer: str, plans: str, extra: dict[str, str] | None = None,
          args: tuple[str, ...] = (), check: bool = True, fold: str = "all") -> subprocess.CompletedProcess:
    cmd = ["nnUNetv2_train", str(dataset_id), "3d_fullres", fold, "-tr", trainer, "-p", plans, "-device", "cpu"]
    return run(cmd + list(args), {**env, **SHORT, **(extra or {})}, check=check)


def log_text(folder: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(folder.glob("training_log_*.txt")))


SEG = {"CSM_NUM_EPOCHS": "1", "CSM_ITERS_PER_EPOCH": "2", "CSM_VAL_ITERS": "1"}


def predict(env: dict[str, str], dataset_id: int, inp: Path, out: Path, fold: str = "all") -> None:
    run(["nnUNetv2_predict", "-i", str(inp), "-o", str(out), "-d", str(dataset_id), "-c", "3d_fullres", "-f", fold,
         "-tr", "CSMSegTrainer", "-p", "nnUNetCSMPlans", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"],
        {**env, **SEG})


# fold 0: a one-class validation fold (brain_002 only); fold 1: both classes on each side (classes alternate by case);
# fold 2: a one-class training fold (an error for the classifier)
SPLITS = [{"train": ["brain_000", "brain_001", "brain_003"], "val": ["brain_002"]},
          {"train": ["brain_000", "brain_001"], "val": ["brain_002", "brain_003"]},
          {"train": ["brain_000"], "val": ["brain_001", "brain_002", "brain_003"]}]


def write_splits(env: dict[str, str]) -> None:
    (Path(env["nnUNet_preprocessed"]) / "Dataset990_CSMSynth" / "splits_final.json").write_text(json.dumps(SPLITS))
