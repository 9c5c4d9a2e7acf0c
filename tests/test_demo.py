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
