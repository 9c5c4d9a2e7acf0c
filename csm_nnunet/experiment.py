"""``csm_nnunet experiment seg``: segmentation quality of the fine-tuning networks, through nnU-Net's console scripts.

One command runs the comparison the issues ask for, on one split and one training budget for every arm:

* ``nnunet``   nnU-Net's default U-Net (``nnUNetTrainer``, only shortened: ``nnUNetTrainer_CSMBudget``);
* ``fused``    a channel-fused-token ViT of the same width/depth with our fusion and decoder
  (``CSMSegTrainer_FusedTokens``), from scratch;
* ``scratch``  ``CSMSegTrainer`` (series tokens) from scratch;
* ``csm``      ``CSMSegTrainer`` from a ``CSMPretrainer`` encoder (pretrained on every non-validation case);
* ``mae``      ``CSMSegTrainer_FusedTokens`` from a ``MAEPretrainer`` encoder (channel-fused pretraining);
* ``primus-scratch`` / ``primus-csm``  nnU-Net's own ``nnUNet_Primus_S_Trainer`` (shortened) from scratch and from a
  ``CSM_PRESET=PrimusS`` CSM encoder folded in by ``csm_nnunet export-primus``.

Every step is a real entry point in a subprocess (``nnUNetv2_plan_and_preprocess``, ``nnUNetv2_train``,
``nnUNetv2_predict``, ``csm_nnunet export-primus``); Dice comes from nnU-Net's ``compute_metrics_on_folder`` on the
predictions of the held-out cases, for each label and for the label regions of the dataset (brain: whole tumour,
tumour core, enhancing). With ``--missing`` every arm also predicts the held-out cases once per series with that
series replaced by an all-zero image (the package's missing-series convention) and reports the Dice drop.

Split (written to ``splits_final.json`` before training): ``--val`` held-out cases; fold 0 trains on ``--labelled``
of the others (fine-tuning), fold 1 on all of the others (pretraining: unlabelled images may include cases without
labels, never the held-out ones). Results: ``<out>/results.json`` and ``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from os.path import isdir, isfile, join

import numpy as np

PLANS = "nnUNetCSMPlans"
CONFIG = "3d_fullres"
#: arm name -> (trainer, pretraining arm it loads or None, preset override or None)
ARMS: dict[str, tuple[str, str | None, str | None]] = {
    "nnunet": ("nnUNetTrainer_CSMBudget", None, None),
    "fused": ("CSMSegTrainer_FusedTokens", None, None),
    "scratch": ("CSMSegTrainer", None, None),
    "csm": ("CSMSegTrainer", "CSMPretrainer", None),
    "mae": ("CSMSegTrainer_FusedTokens", "MAEPretrainer", None),
    "concat": ("CSMSegTrainer_ConcatFusion", None, None),
    "csm-layerdecay": ("CSMSegTrainer_LayerDecay", "CSMPretrainer", None),
    "primus-scratch": ("nnUNet_Primus_S_Trainer_CSMBudget", None, "PrimusS"),
    "primus-csm": ("nnUNet_Primus_S_Trainer_CSMBudget", "CSMPretrainer", "PrimusS"),
}
#: label regions reported besides the single labels (BraTS-style for the synthetic brain data)
REGIONS: dict[str, dict[str, tuple[int, ...]]] = {
    "brain": {"whole tumour": (1, 2, 3), "tumour core": (2, 3), "enhancing": (2,)},
    "prostate": {"gland+lesion": (1, 2), "lesion": (2,)},
}


def arm_spec(arm: str) -> tuple[str, str | None, str | None] | None:
    """``ARMS[name]`` for ``name`` or ``name@k`` (the k-th independent repeat: its own results folder, same
    pretrained encoder); None if unknown."""
    name, _, repeat = arm.partition("@")
    if repeat and not (repeat.isdigit() and int(repeat) >= 2):
        return None
    return ARMS.get(name)


@dataclass
class Runner:
    """Runs console scripts with the experiment's nnU-Net folders; logs every command and its wall time."""

    out: str
    threads: int
    log_lines: list[str] = field(default_factory=list)

    def env(self, results: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"nnUNet_raw": join(self.out, "raw"), "nnUNet_preprocessed": join(self.out, "preprocessed"),
                    "nnUNet_results": results, "nnUNet_compile": "f", "nnUNet_n_proc_DA": "0",
                    "nnUNet_def_n_proc": "1", "OMP_NUM_THREADS": str(self.threads)})
        env.update(extra or {})
        return env

    def __call__(self, cmd: list[str], results: str, extra: dict[str, str] | None = None, log_name: str = "") -> float:
        t0 = time.time()
        log_path = join(self.out, "logs", (log_name or cmd[0]) + ".log")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd)}", flush=True)
        with open(log_path, "a") as log:
            log.write(f"$ {' '.join(cmd)}\n  env: {extra or {}}\n")
            log.flush()
            proc = subprocess.run(cmd, env=self.env(results, extra), stdout=log, stderr=subprocess.STDOUT)
        seconds = time.time() - t0
        self.log_lines.append(f"{seconds:8.1f} s  {' '.join(cmd)}")
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}; see {log_path}")
        return seconds


def _find_dataset(raw: str, dataset_id: int) -> str:
    names = [d for d in os.listdir(raw) if d.startswith(f"Dataset{dataset_id:03d}_")]
    if len(names) != 1:
        raise FileNotFoundError(f"expected one Dataset{dataset_id:03d}_* in {raw}, found {names}")
    return names[0]


def write_splits(preprocessed_dataset: str, cases: list[str], n_val: int, n_labelled: int, seed: int
                 ) -> dict[str, list[str]]:
    """Held-out cases and the labelled subset, chosen by a seeded permutation (stated in the results)."""
    if n_val < 1 or n_labelled < 1 or n_val + n_labelled > len(cases):
        raise ValueError(f"--val {n_val} + --labelled {n_labelled} must fit the {len(cases)} cases (each >= 1)")
    order = [cases[i] for i in np.random.default_rng(seed).permutation(len(cases))]
    val, pool = sorted(order[:n_val]), order[n_val:]
    labelled = sorted(pool[:n_labelled])
    splits = [{"train": labelled, "val": val}, {"train": sorted(pool), "val": val}]
    with open(join(preprocessed_dataset, "splits_final.json"), "w") as f:
        json.dump(splits, f, indent=1)
    return {"val": val, "labelled": labelled, "pretraining": sorted(pool)}


def zero_series_copy(images_dir: str, out_dir: str, cases: list[str], channel: int | None, file_ending: str) -> None:
    """Copy the cases' images, replacing channel ``channel`` by an all-zero image with the same geometry."""
    import SimpleITK as sitk

    os.makedirs(out_dir, exist_ok=True)
    for case in cases:
        for f in sorted(os.listdir(images_dir)):
            if not (f.startswith(case + "_") and f.endswith(file_ending)) or len(f) != len(case) + 5 + len(file_ending):
                continue
            ch = int(f[len(case) + 1: len(case) + 5])
            if ch == channel:
                img = sitk.ReadImage(join(images_dir, f))
                zero = sitk.Image(img.GetSize(), img.GetPixelID())
                zero.CopyInformation(img)
                sitk.WriteImage(zero, join(out_dir, f))
            else:
                shutil.copy(join(images_dir, f), join(out_dir, f))


def region_dice(labels_dir: str, pred_dir: str, labels: dict[str, int], regions: dict[str, tuple[int, ...]],
                file_ending: str) -> dict[str, float]:
    """Mean Dice over the cases of ``pred_dir`` per label and per region (nnU-Net's compute_metrics_on_folder;
    a case where reference and prediction are both empty counts as NaN there and is skipped in the mean)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    fg = {name: v for name, v in labels.items() if int(v) > 0}
    keys: list[int | tuple[int, ...]] = [int(v) for v in fg.values()] + [tuple(r) for r in regions.values()]
    res = compute_metrics_on_folder(labels_dir, pred_dir, None, SimpleITKIO(), file_ending, keys, num_processes=1)
    names = list(fg) + list(regions)
    out = {}
    for name, key in zip(names, keys):
        per_case = [c["metrics"][key]["Dice"] for c in res["metric_per_case"]]
        out[name] = float(np.nanmean(per_case)) if not all(np.isnan(per_case)) else float("nan")
    return out


def run_experiment(args: argparse.Namespace) -> dict:
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    raw, pre = join(out, "raw"), join(out, "preprocessed")
    run = Runner(out, args.threads)
    t_start = time.time()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if arm_spec(a) is None]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; choose from {sorted(ARMS)} (append @2, @3, ... to repeat an "
                         f"arm as an independent run)")

    # ---- data
    if args.dataset:
        src = os.path.abspath(args.dataset)
        name = os.path.basename(src)
        if not isdir(src) or not name.startswith("Dataset"):
            raise FileNotFoundError(f"--dataset {args.dataset!r} must be a raw nnU-Net dataset folder DatasetXXX_Name")
        dataset_id = int(name[7:10])
        if not isdir(join(raw, name)):
            shutil.copytree(src, join(raw, name))
    else:
        from csm_nnunet.synthetic import make_synthetic_dataset

        dataset_id, name = 901, f"Dataset901_CSMExp{args.kind.capitalize()}"
        if not isdir(join(raw, name)):
            make_synthetic_dataset(join(raw, name), num_cases=args.cases, kind=args.kind, shape=(args.shape,) * 3,
                                   seed=args.data_seed)
    with open(join(raw, name, "dataset.json")) as f:
        ds = json.load(f)
    kind = args.kind if not args.dataset else ("brain" if {"1", "2", "3"} <= {str(v) for v in ds["labels"].values()}
                                               and len(ds["labels"]) == 4 else "")
    regions = REGIONS.get(kind, {})
    file_ending = ds["file_ending"]
    cases = sorted({f[: -len(file_ending)] for f in os.listdir(join(raw, name, "labelsTr"))
                    if f.endswith(file_ending)})

    # ---- plan + preprocess (once)
    timings: dict[str, float] = {}
    if not isfile(join(pre, name, f"{PLANS}.json")):
        timings["plan_and_preprocess"] = run(
            ["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-pl", "CSMPlanner", "-c", CONFIG,
             "-np", "1", "-npfp", "1"], join(out, "results", "_plan"), {"nnUNet_n_proc_DA": "1"}, "plan")
    split = write_splits(join(pre, name), cases, args.val, args.labelled, args.split_seed)

    steps = {"pretrain": args.pretrain_epochs * args.iters, "finetune": args.epochs * args.iters}

    def length(epochs: int) -> dict[str, str]:
        return {"CSM_NUM_EPOCHS": str(epochs), "CSM_ITERS_PER_EPOCH": str(args.iters), "CSM_VAL_ITERS": "2"}

    # ---- pretraining runs needed by the arms (fold 1: every non-held-out case)
    checkpoints: dict[tuple[str, str], str] = {}
    for arm in arms:
        trainer, pretrainer, preset = arm_spec(arm)
        if pretrainer is None:
            continue
        preset = preset or args.preset
        key = (pretrainer, preset)
        if key in checkpoints:
            continue
        results = join(out, "results", f"pretrain_{pretrainer}_{preset}")
        ckpt = join(results, name, f"{pretrainer}__{PLANS}__{CONFIG}", "fold_1", "checkpoint_final.pth")
        if not isfile(ckpt):
            timings[f"pretrain {pretrainer} {preset}"] = run(
                ["nnUNetv2_train", str(dataset_id), CONFIG, "1", "-tr", pretrainer, "-p", PLANS, "-device", "cpu"],
                results, {**length(args.pretrain_epochs), "CSM_PRESET": preset}, f"pretrain_{pretrainer}_{preset}")
            _write_atomically(join(os.path.dirname(ckpt), "csm_experiment_steps.json"),
                              json.dumps({"steps": steps["pretrain"]}))
        checkpoints[key] = ckpt

    # ---- fine-tuning arms (fold 0), prediction of the held-out cases, Dice
    labels_dir = join(raw, name, "labelsTr")
    val_images = {}
    variants: list[tuple[str, int | None]] = [("complete", None)]
    if args.missing:
        variants += [(f"without {ds['channel_names'][str(c)]}", c) for c in range(len(ds["channel_names"]))]
    for label, channel in variants:
        folder = join(out, "inputs", label.replace(" ", "_"))
        if not isdir(folder):
            zero_series_copy(join(raw, name, "imagesTr"), folder + ".tmp", split["val"], channel, file_ending)
            os.replace(folder + ".tmp", folder)
        val_images[label] = folder

    results_json = join(out, "results.json")
    summary: dict = json.load(open(results_json)) if isfile(results_json) and args.resume else {}
    summary.update({"dataset": name, "split": split, "steps": steps, "batch": "from the plans",
                    "preset": args.preset, "regions": {k: list(v) for k, v in regions.items()},
                    "machine": machine_description(args.threads)})
    summary.setdefault("arms", {})
    for arm in arms:
        trainer, pretrainer, preset = arm_spec(arm)
        preset = preset or args.preset
        results = join(out, "results", arm)
        extra = {**length(args.epochs), "CSM_PRESET": preset}
        fold_dir = join(results, name, f"{trainer}__{PLANS}__{CONFIG}", "fold_0")
        if not isfile(join(fold_dir, "checkpoint_final.pth")):
            cmd = ["nnUNetv2_train", str(dataset_id), CONFIG, "0", "-tr", trainer, "-p", PLANS, "-device", "cpu"]
            if pretrainer is not None:
                weights = checkpoints[(pretrainer, preset)]
                if trainer.startswith("nnUNet_Primus"):
                    exported = join(out, "results", f"export_{arm}.pth")
                    run(["csm_nnunet", "export-primus", weights, "--trainer", trainer, "-d", str(dataset_id),
                         "-c", CONFIG, "-p", PLANS, "-o", exported], results, extra, f"export_{arm}")
                    weights = exported
                cmd += ["-pretrained_weights", weights]
            timings[f"train {arm}"] = run(cmd, results, extra, f"train_{arm}")
        arm_res: dict = {"trainer": trainer, "pretrained": pretrainer, "preset": preset if trainer.startswith(
            ("CSM", "nnUNet_Primus")) else None, "finetune_steps": steps["finetune"], "dice": {}}
        if pretrainer is not None:
            record = join(os.path.dirname(checkpoints[(pretrainer, preset)]), "csm_experiment_steps.json")
            arm_res["pretrain_steps"] = json.load(open(record))["steps"] if isfile(record) else None
        for label, folder in val_images.items():
            pred = join(out, "predictions", arm, label.replace(" ", "_"))
            if not isdir(pred) or not any(f.endswith(file_ending) for f in os.listdir(pred)):
                timings[f"predict {arm} {label}"] = run(
                    ["nnUNetv2_predict", "-d", str(dataset_id), "-c", CONFIG, "-f", "0", "-tr", trainer, "-p", PLANS,
                     "-i", folder, "-o", pred, "--disable_tta", "-device", "cpu", "-npp", "1", "-nps", "1"],
                    results, extra, f"predict_{arm}")
            arm_res["dice"][label] = region_dice(labels_dir, pred, ds["labels"], regions, file_ending)
        summary["arms"][arm] = arm_res
        _write_atomically(results_json, json.dumps(summary, indent=1))
    summary["timings_s"] = {**summary.get("timings_s", {}), **{k: round(v, 1) for k, v in timings.items()}}
    summary["wall_s"] = round(time.time() - t_start, 1)
    _write_atomically(results_json, json.dumps(summary, indent=1))
    _write_atomically(join(out, "results.md"), markdown(summary))
    return summary


def machine_description(threads: int) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads,
            "torch": torch.__version__, "python": platform.python_version(), "device": "cpu"}


def markdown(summary: dict) -> str:
    arms = summary["arms"]
    if not arms:
        return "no arm finished\n"
    first = next(iter(arms.values()))["dice"]["complete"]
    cols = list(first)
    lines = [f"Dataset {summary['dataset']}: {len(summary['split']['labelled'])} labelled training cases, "
             f"{len(summary['split']['val'])} held-out cases, {summary['steps']['finetune']} fine-tuning steps per "
             f"arm, mean Dice over the held-out cases (nnUNetv2_predict without TTA).", "",
             "| arm | trainer | pretrained (steps) | " + " | ".join(cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for arm, r in arms.items():
        d = r["dice"]["complete"]
        pre = "-" if not r["pretrained"] else f"{r['pretrained']} ({r.get('pretrain_steps') or '?'})"
        lines.append(f"| {arm} | {r['trainer']} | {pre} | " + " | ".join(f"{d[c]:.3f}" for c in cols) + " |")
    missing = [k for k in next(iter(arms.values()))["dice"] if k != "complete"]
    if missing:
        key = next((c for c in ("whole tumour", "gland+lesion") if c in cols), cols[0])
        lines += ["", f"Missing series at inference ({key} Dice; the series replaced by an all-zero image):", "",
                  "| arm | complete | " + " | ".join(missing) + " |", "|---|---|" + "---|" * len(missing)]
        for arm, r in arms.items():
            if not all(m in r["dice"] for m in missing):
                continue
            lines.append(f"| {arm} | {r['dice']['complete'][key]:.3f} | "
                         + " | ".join(f"{r['dice'][m][key]:.3f}" for m in missing) + " |")
    m = summary.get("machine", {})
    lines += ["", f"Machine: {m.get('cpu')} ({m.get('cores')} cores, {m.get('torch_threads')} torch threads), torch "
              f"{m.get('torch')}; wall time {summary.get('wall_s', 0) / 60:.0f} min."]
    return "\n".join(lines) + "\n"


def _write_atomically(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", choices=["seg"], help="seg: segmentation quality and missing-series robustness")
    parser.add_argument("--out", required=True, help="work folder (nnU-Net raw/preprocessed/results live inside)")
    parser.add_argument("--arms", default="nnunet,fused,scratch,csm",
                        help=f"comma-separated arms from {', '.join(ARMS)} (default: nnunet,fused,scratch,csm)")
    parser.add_argument("--dataset", help="a raw nnU-Net dataset folder to use instead of synthetic data")
    parser.add_argument("--kind", default="brain", choices=sorted(REGIONS), help="synthetic data kind")
    parser.add_argument("--cases", type=int, default=24, help="synthetic cases (default 24)")
    parser.add_argument("--shape", type=int, default=48, help="synthetic image edge in voxels (default 48)")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--val", type=int, default=8, help="held-out cases (default 8)")
    parser.add_argument("--labelled", type=int, default=8, help="labelled fine-tuning cases (default 8)")
    parser.add_argument("--preset", default="small8", help="ViT preset of the CSM arms (default small8)")
    parser.add_argument("--epochs", type=int, default=15, help="fine-tuning epochs (default 15)")
    parser.add_argument("--pretrain-epochs", type=int, default=50, help="pretraining epochs (default 50)")
    parser.add_argument("--iters", type=int, default=20, help="iterations per epoch (default 20)")
    parser.add_argument("--missing", action="store_true", help="also predict with each single series missing")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2)), help="torch threads")
    parser.add_argument("--resume", action="store_true", help="keep arms already in results.json")


def run(args: argparse.Namespace) -> int:
    try:
        summary = run_experiment(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"csm_nnunet experiment: error: {e}", file=sys.stderr)
        return 1
    print(markdown(summary))
    print(f"results: {join(os.path.abspath(args.out), 'results.json')}")
    return 0
