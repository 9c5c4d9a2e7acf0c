#!/usr/bin/env python
"""Benchmark of dataset fingerprinting: nnU-Net's ``DatasetFingerprintExtractor`` vs ``CSMFingerprintExtractor``.

Both run through nnU-Net's own console script, as ``nnUNetv2_plan_and_preprocess`` runs them
(``nnUNetv2_extract_fingerprint -d ID -fpe NAME -np 1 --clean``), alternately, ``--repeats`` times each, on

* the real OpenMS dataset (../shared/data/Dataset801_OpenMSLesjak2mm: 3 patients, 4 series, 91 x 109 x 91 at 2 mm);
* a synthetic 6-case brain set from ``csm_nnunet make-dataset`` (48^3, 4 series: the demo's and the tests' size).

It reports the median wall time of the command (interpreter start-up included, as a user waits for it), the peak
RSS of the command's processes (``getrusage`` of a small wrapper's children), and how far our fingerprint is from
nnU-Net's: every key but the foreground intensity statistics must be equal, and for those the largest difference is
given in units of the series' standard deviation. The ratio nnU-Net / ours is from the same run.

Usage::

    python benchmarks/bench_fingerprint.py [--repeats 3] [--out benchmarks/results/cpu_fingerprint.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_pretrain as bp  # noqa: E402  (machine description, console scripts, RSS wrapper)

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "Dataset801_OpenMSLesjak2mm"
EXTRACTORS = ("DatasetFingerprintExtractor", "CSMFingerprintExtractor")
STATS = ("mean", "median", "std", "min", "max", "percentile_99_5", "percentile_00_5")


def extract(root: Path, dataset_id: int, extractor: str, tag: str) -> tuple[float, int, dict]:
    """One ``nnUNetv2_extract_fingerprint`` run in a fresh interpreter: (wall s, peak RSS bytes, fingerprint)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CSM_")}
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / f"pre_{tag}"),
               nnUNet_results=str(root / "results"), nnUNet_compile="f", nnUNet_def_n_proc="1",
               nnUNet_n_proc_DA="1", PYTHONWARNINGS="ignore")
    cmd = [bp.console_script("nnUNetv2_extract_fingerprint"), "-d", str(dataset_id), "-fpe", extractor, "-np", "1",
           "--clean"]
    usage_path = root / f"rusage_{tag}.json"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", bp._RUSAGE_WRAPPER, str(usage_path), *cmd], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    usage = json.loads(usage_path.read_text()) if usage_path.exists() else {"rc": proc.returncode}
    if proc.returncode != 0 or usage["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    fingerprint = json.loads(next((root / f"pre_{tag}").glob("Dataset*/dataset_fingerprint.json")).read_text())
    return wall, usage["maxrss_kib"] * 1024, fingerprint


def compare(ours: dict, nnunet: dict) -> dict[str, Any]:
    """Non-intensity keys must match exactly; intensity statistics: largest |ours - nnU-Net| / nnU-Net's sd."""
    key = "foreground_intensity_properties_per_channel"
    other_keys_equal = {k: v for k, v in ours.items() if k != key} == {k: v for k, v in nnunet.items() if k != key}
    worst: dict[str, float] = {}
    for ch, ref in nnunet[key].items():
        for stat in STATS:
            diff = abs(ours[key][ch][stat] - ref[stat]) / ref["std"]
            worst[stat] = max(worst.get(stat, 0.0), diff)
    return {"other_keys_equal": other_keys_equal, "max_abs_diff_in_sd_units": worst}


def bench_dataset(name: str, raw_source: Path | None, repeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="csm_fp_") as tmp:
        root = Path(tmp)
        (root / "raw").mkdir()
        if raw_source is not None:
            os.symlink(raw_source, root / "raw" / raw_source.name)
            folder = raw_source
        else:
            from csm_nnunet.synthetic import make_synthetic_dataset

            folder = root / "raw" / "Dataset990_CSMFingerprintBench"
            make_synthetic_dataset(str(folder), num_cases=6, kind="brain", shape=(48, 48, 48), seed=0)
        dataset_id = int(folder.name[7:10])
        walls: dict[str, list[float]] = {e: [] for e in EXTRACTORS}
        rss: dict[str, list[int]] = {e: [] for e in EXTRACTORS}
        prints: dict[str, dict] = {}
        for r in range(repeats):  # alternate, so a slow phase of the machine hits both
            for e in EXTRACTORS:
                wall, peak, fingerprint = extract(root, dataset_id, e, f"{e}_{r}")
                walls[e].append(wall)
                rss[e].append(peak)
                prints.setdefault(e, fingerprint)
                bp.log(f"{name}: {e} run {r + 1}/{repeats}: {wall:.1f} s, peak RSS {peak / 1e9:.2f} GB")
        meta = json.loads((folder / "dataset.json").read_text())
        cases = len(list((folder / "labelsTr").glob(f"*{meta['file_ending']}")))
        out = {"dataset": folder.name, "cases": cases, "series": len(meta["channel_names"])}
        for e in EXTRACTORS:
            out[e] = {"wall_s": walls[e], "median_wall_s": statistics.median(walls[e]),
                      "peak_rss_gb": [p / 1e9 for p in rss[e]], "median_peak_rss_gb": statistics.median(rss[e]) / 1e9}
        out["ratio_nnunet_over_csm_wall"] = (out[EXTRACTORS[0]]["median_wall_s"]
                                             / out[EXTRACTORS[1]]["median_wall_s"])
        out["fingerprint_agreement"] = compare(prints[EXTRACTORS[1]], prints[EXTRACTORS[0]])
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/cpu_fingerprint.json")
    args = parser.parse_args(argv)
    if not REAL.is_dir():
        raise SystemExit(f"{REAL} is missing: the shared/ folder must sit beside the checkout")
    res = {"benchmark": "fingerprint extraction, nnU-Net's extractor vs CSMFingerprintExtractor",
           "command": "nnUNetv2_extract_fingerprint -d ID -fpe NAME -np 1 --clean", "repeats": args.repeats,
           "machine": bp.machine_info(),
           "datasets": [bench_dataset("real", REAL, args.repeats), bench_dataset("synthetic", None, args.repeats)]}
    tmp = Path(args.out).with_suffix(".json.tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(args.out)
    for d in res["datasets"]:
        a, b = (d[e] for e in EXTRACTORS)
        print(f"{d['dataset']} ({d['cases']} cases x {d['series']} series): nnU-Net {a['median_wall_s']:.1f} s, "
              f"{a['median_peak_rss_gb']:.2f} GB; CSM {b['median_wall_s']:.1f} s, {b['median_peak_rss_gb']:.2f} GB; "
              f"ratio {d['ratio_nnunet_over_csm_wall']:.1f}x; other keys equal: "
              f"{d['fingerprint_agreement']['other_keys_equal']}; worst intensity difference (sd units): "
              f"{max(d['fingerprint_agreement']['max_abs_diff_in_sd_units'].values()):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
