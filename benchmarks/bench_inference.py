#!/usr/bin/env python
"""Benchmark of segmentation inference: ``CSMSegTrainer``'s network vs nnU-Net's default U-Net (CPU or CUDA).

Both networks are built by their trainers' static ``build_network_architecture`` from the *same* plans (the
3d_fullres plan nnU-Net makes for a 4-series synthetic dataset of 96^3 images, so the patch is 96^3) and run through
nnU-Net's own ``nnUNetPredictor.predict_sliding_window_return_logits`` (Gaussian weighting, tile step 0.5, no
mirroring unless ``--mirroring``) on the same 4-series case of ``--case-size``^3 voxels. Each network runs in its own
interpreter under a small wrapper that reads the children's peak RSS (``getrusage``), so one network's memory never
counts for the other. Weights are random: the time of a forward pass does not depend on their values.

With ``--device cuda`` the predictor keeps everything on the GPU (``perform_everything_on_device``, its default)
under its own fp16 autocast, each case is ended by a device sync, peak GPU memory is recorded, and
``CSMSegTrainer`` is measured twice: as shipped (eval forwards replayed as CUDA graphs, ``csm_nnunet/cuda_graphs.py``)
and with ``cuda_graphs = False`` (every kernel launched from Python).

Usage::

    python benchmarks/bench_inference.py [--quick] [--out benchmarks/results/cpu_inference.json]
    python benchmarks/bench_inference.py --device cuda --mirroring --out benchmarks/results/gpu_inference.json

Writes seconds per case (median of the timed repeats), the ratio CSM / nnU-Net from the same run, and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_pretrain as bp  # noqa: E402  (shared machine description, dataset, planning and RSS wrapper)

TRAINERS = ("nnUNetTrainer", "CSMSegTrainer")
TARGET_RATIO_MAX = 1.0  # issue #3: CSMSegTrainer inference <= 1x the default's time

# Runs in a fresh interpreter: build the trainer's network from the plans, time sliding-window inference.
_CHILD = r"""
import json, statistics, sys, time
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
import nnunetv2, os

plans_file, dataset_json_file, trainer_name, size, warmup, timed, threads, preset, out, device, mirroring, graphs = \
    sys.argv[1:13]
device = torch.device(device)
if device.type == "cpu":
    torch.set_num_threads(int(threads))
plans = json.load(open(plans_file))
if trainer_name.startswith("CSM"):
    plans["configurations"]["3d_fullres"]["csm_network"] = {"preset": preset, "fusion": "attention"}
pm = PlansManager(plans)
cm = pm.get_configuration("3d_fullres")
dataset_json = json.load(open(dataset_json_file))
cls = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer"), trainer_name,
                                  "nnunetv2.training.nnUNetTrainer")
num_in = len(dataset_json["channel_names"])
num_out = pm.get_label_manager(dataset_json).num_segmentation_heads
torch.manual_seed(0)
net = cls.build_network_architecture(pm, cm, num_in, num_out, enable_deep_supervision=False).eval()
if hasattr(net, "cuda_graphs"):
    net.cuda_graphs = graphs == "1"
params = sum(p.numel() for p in net.parameters())
predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring == "1",
                            perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                            allow_tqdm=False)
# mirroring needs the axes (the trainer's inference_allowed_mirroring_axes; all three for 3D): without them the
# predictor silently skips it
predictor.manual_initialization(net, pm, cm, None, dataset_json, trainer_name,
                                (0, 1, 2) if mirroring == "1" else None)
g = torch.Generator().manual_seed(1)
data = torch.randn(num_in, int(size), int(size), int(size), generator=g)
times = []
for i in range(int(warmup) + int(timed)):
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = predictor.predict_sliding_window_return_logits(data)
    if device.type == "cuda":
        torch.cuda.synchronize()
    if i >= int(warmup):
        times.append(time.perf_counter() - t0)
res = {"trainer": trainer_name, "patch_size": list(cm.patch_size), "parameters": params,
       "cuda_graphs": getattr(net, "cuda_graphs", None), "logits_shape": list(logits.shape), "seconds": times,
       "median_s": statistics.median(times)}
if device.type == "cuda":
    res["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    res["gpu"] = torch.cuda.get_device_name(0)
    res["graphs_captured"] = len(getattr(net, "_graphs", ()))
json.dump(res, open(out, "w"))
"""


def bench_inference(work: Path, dataset_id: int, case_size: int, warmup: int, timed: int, preset: str,
                    device: str = "cpu", mirroring: bool = False) -> dict[str, Any]:
    folder = work / "nnUNet_preprocessed" / f"Dataset{dataset_id:03d}_{bp.DATASET_NAME}"
    out: dict[str, Any] = {"case_shape": [4, case_size, case_size, case_size], "warmup": warmup, "timed": timed,
                           "tile_step_size": 0.5, "mirroring": mirroring, "csm_preset": preset, "device": device}
    # (row name, trainer, CUDA graphs on); graphs only exist on a GPU, so the eager row only there
    rows = [("nnUNetTrainer", "nnUNetTrainer", True), ("CSMSegTrainer", "CSMSegTrainer", True)]
    if device != "cpu":
        rows.append(("CSMSegTrainer_eager", "CSMSegTrainer", False))
    for row, trainer, graphs in rows:
        result_path, usage_path = work / f"infer_{row}.json", work / f"infer_{row}_rusage.json"
        cmd = [sys.executable, "-c", _CHILD, str(folder / "nnUNetPlans.json"), str(folder / "dataset.json"), trainer,
               str(case_size), str(warmup), str(timed), str(bp.THREADS), preset, str(result_path), device,
               str(int(mirroring)), str(int(graphs))]
        env = bp.nnunet_env(work, work / "nnUNet_results_infer", n_proc_da=0)
        t0 = time.perf_counter()
        log_path = work / f"infer_{row}.log"
        with open(log_path, "w") as fh:
            rc = subprocess.call([sys.executable, "-c", bp._RUSAGE_WRAPPER, str(usage_path), *cmd], env=env,
                                 stdout=fh, stderr=subprocess.STDOUT)
        usage = json.loads(usage_path.read_text()) if usage_path.exists() else {"rc": rc}
        if rc or usage.get("rc"):
            raise RuntimeError(f"inference of {row} failed; see {log_path}:\n{log_path.read_text()[-3000:]}")
        r = json.loads(result_path.read_text())
        r["peak_rss_gb"] = usage["maxrss_kib"] * 1024 / 1e9
        r["process_wall_s"] = time.perf_counter() - t0
        out[row] = r
        bp.log(f"{row}: {r['median_s']:.2f} s per case, peak RSS {r['peak_rss_gb']:.2f} GB")
    out["csm_over_nnunet"] = out["CSMSegTrainer"]["median_s"] / out["nnUNetTrainer"]["median_s"]
    out["csm_over_nnunet_rss"] = out["CSMSegTrainer"]["peak_rss_gb"] / out["nnUNetTrainer"]["peak_rss_gb"]
    if "CSMSegTrainer_eager" in out:
        out["csm_eager_over_nnunet"] = out["CSMSegTrainer_eager"]["median_s"] / out["nnUNetTrainer"]["median_s"]
        out["graphs_speedup"] = out["CSMSegTrainer_eager"]["median_s"] / out["CSMSegTrainer"]["median_s"]
    return out


def markdown_table(res: dict[str, Any]) -> str:
    inf = res["inference"]
    rows = ["| measurement | nnUNetTrainer | CSMSegTrainer | CSM / nnU-Net | target |", "|---|---|---|---|---|"]
    a, b = inf["nnUNetTrainer"], inf["CSMSegTrainer"]
    ok = "met" if inf["csm_over_nnunet"] <= TARGET_RATIO_MAX else "**not met**"
    rows.append(f"| seconds per case (median of {inf['timed']}) | {a['median_s']:.2f} | {b['median_s']:.2f} | "
                f"{inf['csm_over_nnunet']:.2f} | <= {TARGET_RATIO_MAX:g} ({ok}) |")
    rows.append(f"| peak RSS (GB) | {a['peak_rss_gb']:.2f} | {b['peak_rss_gb']:.2f} | "
                f"{inf['csm_over_nnunet_rss']:.2f} | |")
    if "peak_gpu_memory_gb" in b:
        rows.append(f"| peak GPU memory (GB) | {a['peak_gpu_memory_gb']:.2f} | {b['peak_gpu_memory_gb']:.2f} | "
                    f"{b['peak_gpu_memory_gb'] / a['peak_gpu_memory_gb']:.2f} | |")
    rows.append(f"| parameters (M) | {a['parameters'] / 1e6:.1f} | {b['parameters'] / 1e6:.1f} | | |")
    if "CSMSegTrainer_eager" in inf:
        e = inf["CSMSegTrainer_eager"]
        rows.append(f"| CSMSegTrainer without CUDA graphs: seconds per case | | {e['median_s']:.2f} | "
                    f"{inf['csm_eager_over_nnunet']:.2f} | |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one timed repeat instead of three")
    parser.add_argument("--case-size", type=int, default=160, help="edge of the cubic 4-series case (default 160)")
    parser.add_argument("--preset", default="B16", help="CSMSegTrainer preset (default B16, the trainer default)")
    parser.add_argument("--out", type=Path, default=bp.REPO_ROOT / "benchmarks" / "results" / "cpu_inference.json")
    parser.add_argument("--dataset-id", type=int, default=987)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--mirroring", action="store_true", help="test-time mirroring, nnUNetv2_predict's default")
    parser.add_argument("--timed", type=int, default=3, help="timed cases after one warm-up case (default 3)")
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    res: dict[str, Any] = {"schema": 1, "quick": args.quick, "machine": bp.machine_info(),
                           "loadavg_start": bp.loadavg()}
    if os.environ.get("CSM_BENCH_COMMIT"):  # a copy of the tree without .git (the lent GPU machine)
        res["machine"]["git"] = {"commit": os.environ["CSM_BENCH_COMMIT"], "dirty": None}
    work = args.workdir or Path(tempfile.mkdtemp(prefix="csm_bench_inf_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if not (work / "nnUNet_preprocessed").exists():
            bp.write_synthetic_dataset(work / "nnUNet_raw", args.dataset_id, num_cases=6, shape=bp.PATCH)
            res["plan"] = bp.plan_and_preprocess(work, args.dataset_id)
        res["inference"] = bp.run_section("inference", lambda: bench_inference(
            work, args.dataset_id, args.case_size, 1, 1 if args.quick else args.timed, args.preset, args.device,
            args.mirroring))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    sec = res["inference"]
    res["contended"] = bool(sec["others_cpu_share"] > bp.CONTENDED_OTHERS_SHARE
                            or max(sec["small_op_ms_before"], sec["small_op_ms_after"]) > bp.CONTENDED_OP_MS)
    res["total_wall_s"] = time.perf_counter() - t_start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown_table(res))
    if res["contended"]:
        print("\nWARNING: other processes competed for the CPU during this run; re-run on an idle machine.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
