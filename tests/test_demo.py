"""``csm_nnunet demo --tiny``: the one-command workflow runs end to end through the console scripts (its numbers are
meaningless at this budget; the full demo is not a CI test)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def test_tiny_demo_runs_every_step_and_reports(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CSM_", "nnUNet_"))}
    env.update(PYTHONWARNINGS="ignore", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    out = tmp_path / "demo"
    exe = shutil.which("csm_nnunet", path=str(BIN))
    proc = subprocess.run([exe, "demo", "--tiny", "--out", str(out), "--device", "cpu"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "demo_results.md").read_text()
    assert "| segmentation | Dice whole tumour |" in report and "| benign/malignant | AUC |" in report
    assert report in proc.stdout
    for arm in ("scratch", "csm"):
        assert list((out / "predictions" / arm / "complete").glob("*.nii.gz"))
        assert (out / "predictions" / f"cls_{arm}" / "complete.csv").is_file()
    assert list((out / "results").glob("pretrain_CSMPretrainer_tiny/*/CSMPretrainer__*/fold_1/snapshots/*.png"))
    assert list((out / "results").glob("cls_csm/*/CSMClassifierTrainer__*/fold_0/validation/roc.png"))


def test_experiment_grid_fine_tunes_one_fold_per_label_fraction(tmp_path):
    """``experiment seg --fractions``: a pretraining ablation row fine-tuned on two nested label fractions (folds 2
    and 3 of splits_final.json) through nnUNetv2_train/predict, with the grid table, JSON and plot."""
    import json

    env = {k: v for k, v in os.environ.items() if not k.startswith(("CSM_", "nnUNet_"))}
    env.update(PYTHONWARNINGS="ignore", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    out = tmp_path / "grid"
    exe = shutil.which("csm_nnunet", path=str(BIN))
    proc = subprocess.run([exe, "experiment", "seg", "--out", str(out), "--arms", "csm-noseriesmask", "--fractions",
                           "50,100", "--cases", "6", "--val", "2", "--labelled", "1", "--preset", "tiny", "--epochs",
                           "1", "--iters", "2", "--pretrain-epochs", "1", "--threads", "2"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folds = json.loads(next((out / "preprocessed").glob("Dataset901_*/splits_final.json")).read_text())
    assert [len(f["train"]) for f in folds] == [1, 4, 2, 4]
    grid = json.loads((out / "results_grid.json").read_text())
    assert list(grid["fractions"]) == ["50", "100"] and grid["fractions"]["50"]["labelled"] == 2
    for pct, fold in (("50", 2), ("100", 3)):
        arm = grid["fractions"][pct]["arms"]["csm-noseriesmask"]
        assert arm["pretrained"] == "CSMPretrainer_NoSeriesMask"
        assert 0.0 <= arm["dice"]["complete"]["whole tumour"] <= 1.0
        assert list((out / "results" / f"csm-noseriesmask_f{pct}").glob(f"*/CSMSegTrainer__*/fold_{fold}/"
                                                                          "checkpoint_final.pth"))
        assert list((out / "predictions" / f"csm-noseriesmask_f{pct}" / "complete").glob("*.nii.gz"))
    table = (out / "results_grid.md").read_text()
    assert "| arm | 50 % (2 cases) | 100 % (4 cases) |" in table and table in proc.stdout
    assert "(this invocation)" in table  # the grid is timed from planning on, each fraction from its own start
    assert "(this label fraction in this invocation)" in (out / "results_f50.md").read_text()
    f50 = json.loads((out / "results_f50.json").read_text())  # per-case Dice and the held-out cases' classes
    assert sorted(f50["case_classes"]) == sorted(f50["split"]["val"])
    assert sorted(f50["arms"]["csm-noseriesmask"]["cases"]["complete"]) == sorted(f50["split"]["val"])
    assert "By the held-out cases' class" in (out / "results_f50.md").read_text()
    assert (out / "results_grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # provenance: one invocation, which ran planning, the pretraining and both fractions; each fraction's file lists
    # only its own runs
    (call,) = grid["invocations"]
    assert {"plan_and_preprocess", "pretrain CSMPretrainer_NoSeriesMask_tiny", "train csm-noseriesmask_f50",
            "train csm-noseriesmask_f100"} <= set(call["ran"]) and call["options"]["arms"] == "csm-noseriesmask"
    (own,) = f50["invocations"]
    assert own["ran"] and all(k.endswith("_f50 complete") or k.endswith("_f50") for k in own["ran"]), own["ran"]
