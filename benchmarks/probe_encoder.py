#!/usr/bin/env python
"""Linear probes of pretrained encoders: what does a frozen encoder know about the label compartments?

Why: in the CPU experiments (docs/experiments.md) some CSM pretraining runs give encoders from which fine-tuning never
learns tumour core, whatever the learning-rate schedule, while scratch learns it every time. This script separates
the two possible reasons. If the frozen features of such an encoder still tell core tokens from the rest as well as
the good runs' features do, the information is there and fine-tuning fails to use it (an optimisation problem);
if they do not, pretraining did not put it there (a representation problem).

What it does, for every encoder given (``name=checkpoint`` pretraining checkpoints, and ``--random N``
freshly initialised encoders of the same preset as the reference):

* loads it into the fine-tuning encoder exactly as ``-pretrained_weights`` does
  (:class:`csm_nnunet.segmentation.SeriesTokenEncoder` + :func:`csm_nnunet.adapt.load_pretrained_checkpoint`);
* encodes every token of every case of nnU-Net's preprocessed folder (one whole patch per case, all series
  present, eval mode, no masking) and keeps the hidden state after each block;
* fits a linear patch head (ridge regression from a patch position's features to the region masks of its t^3
  voxels, threshold picked on the training cases) on the probe-training cases and reports its voxel Dice per region
  on the held-out cases: where inside a patch is the region, which is what a segmentation decoder asks of the
  encoder. Features per patch position: the series tokens concatenated (``all``), and each series' token alone
  (``<series>``: is enhancement still in the T1ce token?);
* for ``all`` also the ROC AUC of an L2 logistic regression (C by case-grouped cross-validation) for "the patch holds
  at least ``--min-fraction`` of the region" (nearly saturated on the synthetic data: kept as a sanity check);
* repeats the patch-head probe after a plain LayerNorm of each intermediate tap (``layer d LN``): the series
  fusion of the segmentation network LayerNorms every tap, so this is what its decoder sees when fine-tuning starts;
* reports the geometry of the features: mean token norm, effective rank (exp of the entropy of the normalised
  singular values) and the share of variance on the first principal axis.

Raw voxels (each patch's voxels of all series, the same probes) are the reference. Splits: ``splits_final.json`` fold
``--fold`` (the experiment runner's fold 1: its train cases are the pretraining cases, its val cases the held-out
ones), so the probes are fitted on the cases the encoders were pretrained on and scored on cases none of them saw.

Usage (the 8^3-token grid of docs/experiments.md)::

    E=/work/exp_grid8; R=$E/results; F=Dataset901_CSMExpBrain/CSMPretrainer__nnUNetCSMPlans__3d_fullres/fold_1
    python benchmarks/probe_encoder.py --preprocessed $E/preprocessed/Dataset901_CSMExpBrain \\
        --checkpoint csm=$R/pretrain_CSMPretrainer_tiny8/$F/checkpoint_final.pth ... --random 3 \\
        --out benchmarks/results/probe_grid8_synthetic_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_pretrain as bp  # noqa: E402  (machine description, git state)

from csm_nnunet.experiment import REGIONS  # noqa: E402  (the runner's label regions)
from csm_nnunet.fileio import write_json_atomically  # noqa: E402
from csm_nnunet.network import patchify_groups  # noqa: E402

PLANS = "nnUNetCSMPlans"
CONFIG = "3d_fullres"


def load_cases(preprocessed: str, plans: str, cases: list[str], patch: tuple[int, ...]
               ) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[K, S, *patch]`` and segmentations ``[K, *patch]`` of ``cases`` from nnU-Net's preprocessed folder,
    centre-cropped or zero-padded to the network patch (as the training data loader pads: image 0, labels background).
    """
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = os.path.join(preprocessed, f"{plans}_{CONFIG}")
    ds = infer_dataset_class(folder)(folder, cases)
    images, segs = [], []
    for case in cases:
        data, seg, _, _ = ds.load_case(case)
        data, seg = np.asarray(data, dtype=np.float32), np.asarray(seg[0], dtype=np.int16)
        img = np.zeros((data.shape[0], *patch), np.float32)
        lab = np.zeros(patch, np.int16)
        src, dst = [], []
        for n, p in zip(data.shape[1:], patch):
            start = max(0, (n - p) // 2)
            off = max(0, (p - n) // 2)
            length = min(n, p)
            src.append(slice(start, start + length))
            dst.append(slice(off, off + length))
        img[(slice(None), *dst)] = data[(slice(None), *src)]
        lab[tuple(dst)] = np.maximum(seg[tuple(src)], 0)
        images.append(img)
        segs.append(lab)
    return np.stack(images), np.stack(segs)


def voxel_targets(segs: np.ndarray, regions: dict[str, tuple[int, ...]], token: int, grid: tuple[int, ...]
                  ) -> dict[str, np.ndarray]:
    """Per region, ``[K * N, t^3]`` voxel masks in the encoder's token order
    (:func:`csm_nnunet.network.patchify_groups`)."""
    seg = torch.from_numpy(segs.astype(np.int64))[:, None]
    out = {}
    for name, labels in regions.items():
        inside = torch.isin(seg, torch.tensor(labels)).float()
        out[name] = patchify_groups(inside, 1, token, grid)[:, 0].reshape(-1, token ** 3).numpy()
    return out


def token_targets(voxels: dict[str, np.ndarray], min_fraction: float) -> dict[str, np.ndarray]:
    """Per region, ``[K * N]`` booleans: the patch holds at least ``min_fraction`` of its voxels in the region."""
    return {name: v.mean(1) >= min_fraction for name, v in voxels.items()}


def build_encoder(series: list[str], patch: tuple[int, ...], preset: str, token: int, fused: bool):
    from csm_nnunet.segmentation import SeriesTokenEncoder

    return SeriesTokenEncoder(len(series), patch, preset, token_size=token, series_names=series,
                              fused_tokens=fused).eval()


@torch.no_grad()
def encode(net, images: np.ndarray, batch: int = 4) -> list[np.ndarray]:
    """Hidden states after each block, ``depth x [K, G, N, D]`` (all series present)."""
    depth = net.preset.depth
    layers: list[list[np.ndarray]] = [[] for _ in range(depth)]
    for i in range(0, len(images), batch):
        x, _, groups = net._prepare_inputs(torch.from_numpy(images[i: i + batch]), None)
        taps = net.forward_encoder(x, groups, tuple(range(1, depth + 1)))
        for d, t in enumerate(taps):
            layers[d].append(t.float().numpy())
    return [np.concatenate(chunks) for chunks in layers]


def feature_stats(feats: np.ndarray) -> dict[str, float]:
    """Token norm, effective rank and first-axis variance share of ``[K, G, N, D]`` tokens (all series pooled)."""
    tok = feats.reshape(-1, feats.shape[-1]).astype(np.float64)
    norm = float(np.linalg.norm(tok, axis=1).mean())
    centred = tok - tok.mean(0)
    sv = np.linalg.svd(centred, compute_uv=False)
    var = sv ** 2 / max((sv ** 2).sum(), 1e-12)
    p = sv / max(sv.sum(), 1e-12)
    eff_rank = float(math.exp(-(p[p > 0] * np.log(p[p > 0])).sum()))
    return {"token_norm": norm, "effective_rank": eff_rank, "top_axis_variance": float(var[0])}


def probe_auc(x_train: np.ndarray, y_train: np.ndarray, groups: np.ndarray, x_test: np.ndarray,
              y_test: np.ndarray, seed: int = 0) -> float | None:
    """ROC AUC on the test tokens of an L2 logistic regression on standardised features; C from case-grouped CV."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if y_train.all() or not y_train.any() or y_test.all() or not y_test.any():
        return None
    best_c, best = None, -1.0
    folds = GroupKFold(n_splits=min(4, len(np.unique(groups))))
    for c in (0.001, 0.01, 0.1, 1.0):
        scores = []
        for tr, va in folds.split(x_train, y_train, groups):
            if y_train[tr].all() or not y_train[tr].any() or y_train[va].all() or not y_train[va].any():
                continue
            model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
            model.fit(x_train[tr], y_train[tr])
            scores.append(roc_auc_score(y_train[va], model.decision_function(x_train[va])))
        if scores and float(np.mean(scores)) > best:
            best_c, best = c, float(np.mean(scores))
    model = make_pipeline(StandardScaler(), LogisticRegression(C=best_c or 0.1, max_iter=2000, random_state=seed))
    model.fit(x_train, y_train)
    return float(roc_auc_score(y_test, model.decision_function(x_test)))


def probe_dice(x_train: np.ndarray, voxels: dict[str, np.ndarray], split: int, x_test: np.ndarray
               ) -> dict[str, float | None]:
    """Dice on the test voxels of a linear patch head: one ridge regression from a token's features to its t^3 voxel
    masks of every region (alpha by efficient leave-one-out on the training tokens); each region's threshold is the
    one that maximises Dice on the training tokens (the regions are small, so 0.5 would favour background). This is
    the fine-grained question a segmentation decoder asks of the encoder: where inside the patch is the region?"""
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    names = list(voxels)
    y = np.concatenate([voxels[n] for n in names], axis=1) > 0.5
    scaler = StandardScaler().fit(x_train)
    model = RidgeCV(alphas=(1.0, 10.0, 100.0, 1000.0, 10000.0)).fit(scaler.transform(x_train), y[:split])
    fit, pred = model.predict(scaler.transform(x_train)), model.predict(scaler.transform(x_test))
    width = y.shape[1] // len(names)

    def dice(p: np.ndarray, t: np.ndarray) -> float | None:
        denom = p.sum() + t.sum()
        return None if denom == 0 else float(2 * (p & t).sum() / denom)

    out: dict[str, float | None] = {}
    for i, n in enumerate(names):
        cols = slice(i * width, (i + 1) * width)
        scores = {th: dice(fit[:, cols] >= th, y[:split, cols]) or 0.0 for th in np.arange(0.05, 0.96, 0.05)}
        best = max(scores, key=scores.get)
        out[n] = dice(pred[:, cols] >= best, y[split:, cols])
    return out


def probe_features(feats: np.ndarray, series: list[str], fused: bool) -> dict[str, np.ndarray]:
    """``[K, G, N, D]`` -> named ``[K * N, F]`` feature sets: all series concatenated, and each series alone."""
    K, G, N, D = feats.shape
    sets = {"all": feats.transpose(0, 2, 1, 3).reshape(K * N, G * D)}
    if not fused:
        for g, name in enumerate(series):
            sets[name] = feats[:, g].reshape(K * N, D)
    return sets


def run_probes(sets: dict[str, np.ndarray], targets: dict[str, np.ndarray], voxels: dict[str, np.ndarray],
               n_train: int, n_patches: int, auc: bool = True) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per feature set: the voxel Dice of a linear patch head per region, and (all series only, with ``auc``) the
    token AUC."""
    groups = np.repeat(np.arange(n_train), n_patches)
    split = n_train * n_patches
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for fname, x in sets.items():
        out[fname] = {"voxel_dice": probe_dice(x[:split], voxels, split, x[split:])}
        if fname == "all" and auc:  # token presence is nearly saturated (AUC ~0.99 for every encoder), so only once
            out[fname]["auc"] = {region: probe_auc(x[:split], y[:split], groups, x[split:], y[split:])
                                 for region, y in targets.items()}
    return out


def read_split(preprocessed: str, fold: int) -> tuple[list[str], list[str], dict]:
    """Train and val cases of ``splits_final.json`` fold ``fold`` (sorted) and the folder's dataset.json."""
    with open(os.path.join(preprocessed, "splits_final.json")) as f:
        split = json.load(f)[fold]
    with open(os.path.join(preprocessed, "dataset.json")) as f:
        return sorted(split["train"]), sorted(split["val"]), json.load(f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preprocessed", required=True, help="nnU-Net preprocessed dataset folder (DatasetXXX_Name)")
    parser.add_argument("--plans", default=PLANS)
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                        help="a pretraining checkpoint to probe (repeatable)")
    parser.add_argument("--random", type=int, default=0, help="also probe N randomly initialised encoders")
    parser.add_argument("--fold", type=int, default=1, help="splits_final.json fold: train = probe training cases, "
                                                            "val = probe test cases (default 1)")
    parser.add_argument("--min-fraction", type=float, default=0.01,
                        help="a patch counts as a region's when at least this share of its voxels is (default 0.01)")
    parser.add_argument("--layers", default=None, help="comma-separated block depths to probe (default: all)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--out", required=True, help="results JSON (written atomically)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()

    train_cases, test_cases, dataset = read_split(args.preprocessed, args.fold)
    series = [dataset["channel_names"][k] for k in sorted(dataset["channel_names"], key=int)]
    labels = {int(v) for v in dataset["labels"].values()}
    regions = REGIONS["brain"] if {1, 2, 3} <= labels else {"foreground": tuple(sorted(labels - {0}))}

    encoders: list[tuple[str, str | None, dict]] = []  # name, checkpoint (None: random init), network config
    for item in args.checkpoint:
        name, sep, path = item.partition("=")
        if not sep or not os.path.isfile(path):
            raise SystemExit(f"--checkpoint {item!r}: expected NAME=PATH to an existing checkpoint file")
        encoders.append((name, path, torch.load(path, map_location="cpu", weights_only=False)["csm_network"]))
    if not encoders:
        raise SystemExit("give at least one --checkpoint NAME=PATH (its preset is the reference for --random)")
    ref = encoders[0][2]
    patch = tuple(int(p) for p in ref["patch_size"])
    token, preset = int(ref["token_size"]), ref["preset"]["name"]
    grid = tuple(p // token for p in patch)
    n_patches = int(np.prod(grid))
    encoders += [(f"random{i + 1}", None, ref) for i in range(args.random)]

    images, segs = load_cases(args.preprocessed, args.plans, train_cases + test_cases, patch)
    voxels = voxel_targets(segs, regions, token, grid)
    targets = token_targets(voxels, args.min_fraction)
    positives = {r: {"train": int(y[: len(train_cases) * n_patches].sum()),
                     "test": int(y[len(train_cases) * n_patches:].sum())} for r, y in targets.items()}
    bp.log(f"{len(train_cases)} probe-training / {len(test_cases)} test cases, {n_patches} patches each, "
           f"positive patches {positives}")

    header = {"what": "linear probes of frozen encoders on held-out cases: voxel Dice of a linear patch head, token "
                      "ROC AUC (last layer)", "series": series, "regions": {k: list(v) for k, v in regions.items()},
              "min_fraction": args.min_fraction, "train_cases": train_cases, "test_cases": test_cases,
              "patch": list(patch), "token": token, "preset": preset, "positives": positives}
    results: dict[str, Any] = {}
    raw = patchify_groups(torch.from_numpy(images), 1, token, grid)[:, 0].reshape(-1, len(series) * token ** 3)
    results["raw voxels"] = {"probes": {"layer 0": run_probes({"all": raw.numpy()}, targets, voxels,
                                                              len(train_cases), n_patches)}}
    bp.log("raw voxels done")
    from csm_nnunet.adapt import load_pretrained_checkpoint

    layers = [int(v) for v in args.layers.split(",")] if args.layers else None
    previous = {}
    if os.path.isfile(args.out):  # a run cut short: keep the encoders it finished (same checkpoint file)
        with open(args.out) as f:
            previous = json.load(f).get("encoders", {})
    for i, (name, path, cfg) in enumerate(encoders):
        if name in previous and previous[name].get("checkpoint") == path:
            results[name] = previous[name]
            bp.log(f"{name}: kept from {args.out}")
            continue
        fused = bool(cfg.get("fused"))
        if path is None:
            torch.manual_seed(1000 + i)
        net = build_encoder(series, patch, cfg["preset"]["name"], int(cfg["token_size"]), fused)
        if path is not None:
            load_pretrained_checkpoint(path, net, series, log=None)
        feats = encode(net, images)
        entry: dict[str, Any] = {"checkpoint": path, "fused": fused, "probes": {}, "stats": {}}
        for d, layer in enumerate(feats, start=1):
            if layers and d not in layers:
                continue
            entry["stats"][f"layer {d}"] = feature_stats(layer)
            entry["probes"][f"layer {d}"] = run_probes(probe_features(layer, series, fused), targets,
                                                       voxels, len(train_cases), n_patches, auc=d == len(feats))
            if d < len(feats):  # what the fine-tuning network's series fusion sees: it LayerNorms every tap
                normed = torch.nn.functional.layer_norm(torch.from_numpy(layer), (layer.shape[-1],)).numpy()
                entry["stats"][f"layer {d} LN"] = feature_stats(normed)
                entry["probes"][f"layer {d} LN"] = run_probes(
                    {"all": probe_features(normed, series, fused)["all"]}, targets, voxels, len(train_cases),
                    n_patches, auc=False)
        results[name] = entry
        write_json_atomically(args.out, {**header, "encoders": results, "complete": False})
        last = entry["probes"][max(entry["probes"], key=lambda k: int(k.split()[1]))]["all"]
        bp.log(f"{name}: AUC " + ", ".join(f"{r} {v:.3f}" for r, v in last.get("auc", {}).items() if v is not None)
               + "; voxel Dice " + ", ".join(f"{r} {v:.3f}" for r, v in last["voxel_dice"].items() if v is not None))

    out = {**header, "encoders": results, "complete": True, "seconds": round(time.time() - t0, 1),
           "machine": bp.machine_info(), "git": bp.git_info()}
    write_json_atomically(args.out, out)
    print(markdown(out))
    return 0


def markdown(res: dict[str, Any]) -> str:
    """Per encoder and layer: voxel Dice of the linear patch head and token AUC per region (all series), and the
    feature statistics."""
    regions = list(res["regions"])

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = ["| encoder | layer | " + " | ".join(f"Dice {r}" for r in regions) + " | "
             + " | ".join(f"AUC {r}" for r in regions) + " | token norm | eff. rank | top-axis var |",
             "|---|---|" + "---|" * (2 * len(regions) + 3)]
    for name, entry in res["encoders"].items():
        for layer, probes in entry["probes"].items():
            stats = entry.get("stats", {}).get(layer, {})
            dice = " | ".join(fmt(probes["all"]["voxel_dice"][r]) for r in regions)
            aucs = " | ".join(fmt(probes["all"].get("auc", {}).get(r)) for r in regions)
            extra = (f"{stats['token_norm']:.1f} | {stats['effective_rank']:.1f} | {stats['top_axis_variance']:.2f}"
                     if stats else "- | - | -")
            lines.append(f"| {name} | {layer} | {dice} | {aucs} | {extra} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
