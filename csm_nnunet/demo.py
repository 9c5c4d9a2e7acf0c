"""``csm_nnunet demo``: the whole workflow in one command, through nnU-Net's real entry points.

Synthetic 4-series brain phantoms (``make-dataset``: segmentation labels and a benign/malignant label that only the
T1ce-vs-T1 relation reveals) -> ``nnUNetv2_plan_and_preprocess -pl CSMPlanner -fpe CSMFingerprintExtractor`` ->
``CSMPretrainer`` -> segmentation
fine-tuning (``CSMSegTrainer``) from the CSM encoder and from scratch -> ``nnUNetv2_predict`` on held-out cases and
Dice -> classification (``CSMClassifierTrainer``) from CSM and from scratch -> ``csm_nnunet classify`` and AUC ->
a results table and where the pictures are. It is the experiment runner (:mod:`csm_nnunet.experiment`) with two arms
per task and a budget sized to ``--minutes``; every step is a console script in a subprocess.

The default fits about 15 minutes on 2 CPU cores (measured, see README); on a CUDA machine the same command trains a
larger setting on the GPU, with nnU-Net's augmentation workers (predicted ~15 minutes on one H200 from the measured
rates of a run at a tenth of its budget; docs/benchmarks.md). ``--tiny`` is a 3-minute check that everything runs
(its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import os
import sys
from os.path import join

#: budgets per setting: steps are split into epochs of ``iters`` iterations; ``minutes`` scales the steps
SETTINGS: dict[str, dict] = {
    "cpu": {"preset": "small8", "cases": 24, "val": 8, "labelled": 8, "shape": 48, "iters": 10,
            "pretrain_steps": 240, "seg_steps": 90, "cls_steps": 100, "minutes": 15.0},
    # iters: nnU-Net's 250, since each epoch costs ~1.1 s between epochs (log, progress plot); at 50 that was a third
    # of a pretraining epoch on an H200 (docs/benchmarks.md, "Trainers on a GPU")
    "gpu": {"preset": "small8", "cases": 64, "val": 16, "labelled": 16, "shape": 64, "iters": 250,
            "pretrain_steps": 5000, "seg_steps": 1500, "cls_steps": 1500, "minutes": 15.0},
    "tiny": {"preset": "tiny", "cases": 6, "val": 2, "labelled": 3, "shape": 48, "iters": 2,
             "pretrain_steps": 2, "seg_steps": 2, "cls_steps": 2, "minutes": 3.0},
}


def _namespace(study: str, out: str, s: dict, steps: int, pretrain_steps: int, device: str, threads: int
               ) -> argparse.Namespace:
    iters = s["iters"]
    return argparse.Namespace(
        study=study, out=out, arms="scratch,csm", dataset=None, kind="brain", cases=s["cases"], shape=s["shape"],
        data_seed=0, split_seed=0, val=s["val"], labelled=s["labelled"], preset=s["preset"],
        epochs=max(1, round(steps / iters)), pretrain_epochs=max(1, round(pretrain_steps / iters)), iters=iters,
        missing=False, threads=threads, resume=True, device=device, pretrain_per_repeat=False, fractions=None, seeds=1,
        crop=None)


def run_demo(out: str, minutes: float | None = None, tiny: bool = False, device: str | None = None) -> str:
    import torch

    from csm_nnunet.experiment import prepare, run_classification, run_segmentation
    from csm_nnunet.fileio import write_text_atomically

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    s = dict(SETTINGS["tiny" if tiny else ("gpu" if device == "cuda" else "cpu")])
    scale = 1.0 if minutes is None else max(0.05, minutes / s["minutes"])
    pretrain = max(2, round(s["pretrain_steps"] * scale))
    threads = max(1, os.cpu_count() or 1)
    out = os.path.abspath(out)
    print(f"csm_nnunet demo: {s['cases']} synthetic brain cases ({s['shape']}^3, T1/T1ce/T2/FLAIR) in {out}; "
          f"{device}, preset {s['preset']}, {pretrain} pretraining steps, "
          f"{max(2, round(s['seg_steps'] * scale))} segmentation and {max(2, round(s['cls_steps'] * scale))} "
          f"classification fine-tuning steps per arm", flush=True)
    seg_args = _namespace("seg", out, s, max(2, round(s["seg_steps"] * scale)), pretrain, device, threads)
    seg = run_segmentation(prepare(seg_args))
    cls_args = _namespace("cls", out, s, max(2, round(s["cls_steps"] * scale)), pretrain, device, threads)
    cls = run_classification(prepare(cls_args))
    text = _report(out, seg, cls)
    write_text_atomically(join(out, "demo_results.md"), text)
    return text


def _report(out: str, seg: dict, cls: dict) -> str:
    def f(v) -> str:
        return "n/a" if v is None or v != v else f"{v:.3f}"

    lines = ["# csm-nnunet demo", "",
             f"Held-out cases: {len(seg['split']['val'])}; labelled training cases: {len(seg['split']['labelled'])}; "
             f"pretraining on {len(seg['split']['pretraining'])} cases (images only).", "",
             "| task | metric | from scratch | from CSM pretraining |", "|---|---|---|---|"]
    sd = {arm: seg["arms"][arm]["dice"]["complete"] for arm in ("scratch", "csm")}
    for region in ("whole tumour", "tumour core", "enhancing"):
        lines.append(f"| segmentation | Dice {region} | {f(sd['scratch'].get(region))} | {f(sd['csm'].get(region))} |")
    cm = {arm: cls["arms"][arm]["metrics"]["complete"] for arm in ("scratch", "csm")}
    for key in ("auc", "accuracy"):
        lines.append(f"| benign/malignant | {key.upper() if key == 'auc' else key} | {f(cm['scratch'][key])} | "
                     f"{f(cm['csm'][key])} |")
    res = join(out, "results")
    lines += ["", "One run of each arm at a small budget: differences of a few hundredths are noise, not evidence "
              "(docs/experiments.md has repeated, longer runs).", "", "Pictures and files:",
              f"- pretraining reconstructions (original / visible / reconstructed per series): "
              f"{res}/pretrain_CSMPretrainer_*/*/CSMPretrainer__*/fold_1/snapshots/",
              f"- training curves: progress.png in every {res}/*/*/*/fold_0/",
              f"- ROC curves of the classifiers: {res}/cls_*/*/CSMClassifierTrainer__*/fold_0/validation/roc.png",
              f"- segmentations of the held-out cases: {join(out, 'predictions')}/<arm>/complete/",
              f"- tables: {join(out, 'results.md')}, {join(out, 'results_cls.md')}; commands and logs: "
              f"{join(out, 'logs')}/"]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="csm_demo", help="work folder (default ./csm_demo); a rerun reuses it")
    parser.add_argument("--minutes", type=float, default=None,
                        help="scale the training budget to about this many minutes (default 15)")
    parser.add_argument("--tiny", action="store_true", help="a 3-minute check that everything runs")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")


def run(args: argparse.Namespace) -> int:
    try:
        text = run_demo(args.out, args.minutes, args.tiny, args.device)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"csm_nnunet demo: error: {e}", file=sys.stderr)
        return 1
    print()
    print(text)
    return 0
