#!/usr/bin/env python
"""How well does a CSM pretraining model synthesise a hidden series? (``csm_nnunet reconstruct``, measured.)

For each given case and each series: hide it, synthesise it from the others with
:func:`csm_nnunet.reconstruct.reconstruct`, and compare with the real image inside the head (voxels where the sum of
the real series exceeds a tenth of its 99th percentile, i.e. not air): Pearson correlation, and as the baseline the
best absolute correlation of the real image with any *shown* series (what a per-case linear intensity map of one
other series would achieve). Writes a JSON and prints a table.

Usage::

    python benchmarks/eval_reconstruct.py -m <CSMPretrainer model folder> -f 1 --images <raw imagesTr> \
        --cases brain_002 brain_004 --out benchmarks/results/reconstruct_synthetic_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", dest="model", required=True)
    parser.add_argument("-f", dest="fold", default="all")
    parser.add_argument("--images", required=True, help="folder with <case>_XXXX.nii.gz")
    parser.add_argument("--cases", nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import SimpleITK as sitk
    import torch

    from csm_nnunet.reconstruct import _load_model, reconstruct

    torch.set_num_threads(os.cpu_count() or 1)
    names = _load_model(args.model, args.fold, "checkpoint_final.pth")[0].series_names
    rows = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            files = [os.path.join(args.images, f"{case}_{c:04d}.nii.gz") for c in range(len(names))]
            images = [sitk.GetArrayFromImage(sitk.ReadImage(f)).astype(np.float64) for f in files]
            for h, name in enumerate(names):
                truth = images[h]
                if not truth.any():
                    continue  # this case lacks the series (all-zero image): nothing to compare with
                # the head: where the real series are clearly above the air (Rician noise) level
                total = sum(images)
                inside = total > 0.1 * np.percentile(total, 99)
                out = os.path.join(tmp, f"{case}_{name}.nii.gz")
                reconstruct(args.model, files, [name], out, fold=args.fold, log=lambda *a: None)
                synth = sitk.GetArrayFromImage(sitk.ReadImage(out)).astype(np.float64)
                r = float(np.corrcoef(truth[inside], synth[inside])[0, 1])
                base = max(abs(float(np.corrcoef(truth[inside], images[o][inside])[0, 1]))
                           for o in range(len(names)) if o != h and images[o][inside].std() > 0)
                rows.append({"case": case, "hidden": name, "corr_synthesis": r, "best_abs_corr_other_series": base})
    per_series = {}
    for name in names:
        rs = [r for r in rows if r["hidden"] == name]
        if rs:
            per_series[name] = {"median_corr_synthesis": float(np.median([r["corr_synthesis"] for r in rs])),
                                "median_best_other_series": float(np.median(
                                    [r["best_abs_corr_other_series"] for r in rs])), "n": len(rs)}
    import platform

    result = {"model": os.path.abspath(args.model), "fold": args.fold, "cases": args.cases,
              "per_series": per_series, "rows": rows, "wall_s": round(time.time() - t0, 1),
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch": torch.__version__}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(args.out) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.out)
    print("| hidden series | median corr. synthesis vs real | median best abs. corr. with a shown series | n |")
    print("|---|---|---|---|")
    for name, v in per_series.items():
        print(f"| {name} | {v['median_corr_synthesis']:.3f} | {v['median_best_other_series']:.3f} | {v['n']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
