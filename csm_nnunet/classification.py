"""Per-case classification (e.g. benign/malignant, paper III.C and Tables III, IV) on the CSM encoder.

:class:`CSMClassificationNetwork` is the fine-tuning encoder of :class:`csm_nnunet.segmentation.SeriesTokenEncoder`
(so :mod:`csm_nnunet.adapt` loads CSM/MAE pretraining checkpoints into it exactly as into the segmentation network),
followed by a pooling of the encoder's output tokens and a linear head.

Pooling (``pooling``):

* ``"centre"`` (default): per series, a Gaussian-weighted mean of the tokens around the centre of the crop, the
  series' vectors normalised and concatenated in series order (an absent series gets a learned "absent" vector), then
  the head. Crops are centred on the region of interest (the lesion) in training, validation and ``classify`` alike,
  so the centre is where the class is. Why not the mean over all tokens: with few labelled cases the lesion's few
  tokens drown in the mean over every token of every series; a logistic regression on the (frozen, even random)
  encoder's centre token per series separates held-out cases perfectly where the same on the all-token mean is at
  chance (docs/experiments.md). Concatenating by series keeps "bright in DWI *and* dark in ADC" linearly readable.
* ``"mean"``: MAE's classification pooling, the mean over every token of the present series (a missing series is
  left out of the mean, never counted as zeros).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from csm_nnunet.network import ViTPreset
from csm_nnunet.segmentation import SeriesTokenEncoder

POOLINGS = ("centre", "mean")


def centre_weights(grid: Sequence[int], sigma_tokens: float) -> torch.Tensor:
    """``[N]`` weights (sum 1) of the token grid's positions, Gaussian in the distance from the grid centre in token
    units (x-major order, as :func:`csm_nnunet.network.patchify_groups` orders patches)."""
    axes = [torch.arange(g, dtype=torch.float32) - (g - 1) / 2 for g in grid]
    d2 = sum(a ** 2 for a in torch.meshgrid(*axes, indexing="ij"))
    w = torch.exp(-d2 / (2 * float(sigma_tokens) ** 2)).flatten()
    return w / w.sum()


class CSMClassificationNetwork(SeriesTokenEncoder):
    """Series-tokenized ViT encoder + pooling (see the module docstring) + linear head.

    ``x [B, S, X, Y, Z]`` (one channel per series; ``present [B, S]`` optional, default: a series is absent when its
    channel is all zero while another is not) -> logits ``[B, num_classes]``.

    Args:
        num_classes: number of classes (>= 2).
        dropout: dropout before the head (0 by default; small datasets may want 0.1-0.3).
        pooling: ``"centre"`` or ``"mean"``.
        centre_sigma: width of the centre weighting in tokens (0.5: the centre token holds about half the weight
            on a 3^3 grid).
        Other arguments as :class:`~csm_nnunet.segmentation.SeriesTokenEncoder`.
    """

    def __init__(self, num_series: int, num_classes: int, patch_size: Sequence[int], preset: str | ViTPreset = "B16",
                 token_size: int | None = None, series_names: Sequence[str] | None = None,
                 fused_tokens: bool = False, dropout: float = 0.0, pooling: str = "centre",
                 centre_sigma: float = 0.5, same_position_bias: bool = False):
        super().__init__(num_series, patch_size, preset, token_size, series_names, fused_tokens,
                         same_position_bias=same_position_bias)
        self.num_classes = int(num_classes)
        if self.num_classes < 2:
            raise ValueError(f"a classifier needs >= 2 classes, got num_classes={num_classes}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if centre_sigma <= 0:
            raise ValueError(f"centre_sigma must be > 0 (tokens), got {centre_sigma}")
        self.pooling = pooling
        D = self.preset.embed_dim
        self.head_norm = nn.LayerNorm(D)
        self.head_drop = nn.Dropout(float(dropout))
        if pooling == "centre":
            self.register_buffer("centre_weight", centre_weights(self.grid, centre_sigma), persistent=False)
            self.absent_embed = nn.Parameter(torch.zeros(self.num_groups, D))
            nn.init.normal_(self.absent_embed, std=0.02)
            self.head = nn.Linear(self.num_groups * D, self.num_classes)
        else:
            self.head = nn.Linear(D, self.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)  # small logits at the start: the loss starts near log(K)
        nn.init.zeros_(self.head.bias)

    def pooled_features(self, x: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, F]`` features for the head: ``F = G * D`` (centre pooling, G token groups) or ``D`` (mean)."""
        x, _, groups = self._prepare_inputs(x, present)
        tokens = self.forward_encoder(x, groups, (self.preset.depth,))[0]  # [B, G, N, D], zeros at absent series
        if self.pooling == "centre":
            per_series = self.head_norm(torch.einsum("bgnd,n->bgd", tokens, self.centre_weight.to(tokens.dtype)))
            per_series = torch.where(groups[:, :, None], per_series, self.absent_embed[None].to(per_series.dtype))
            return per_series.flatten(1)
        weight = groups.to(tokens.dtype)[:, :, None, None]
        count = weight.sum(1) * self.num_patches  # [B, 1, 1]
        return self.head_norm((tokens * weight).sum((1, 2)) / count.reshape(-1, 1))

    def forward(self, x: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.head_drop(self.pooled_features(x, present)))


# ---------------------------------------------------------------------------------------------------------------------
# Region of interest: where a case's crop is taken (training, validation and `csm_nnunet classify` alike)
# ---------------------------------------------------------------------------------------------------------------------
ROI_KEY = "classification_roi_labels"


def resolve_roi_labels(dataset_json: dict) -> list[int]:
    """Segmentation labels whose voxels make a case's region of interest (the lesion the class is about).

    dataset.json ``classification_roi_labels`` lists label names or values (e.g. ``["lesion"]`` when the mask also
    outlines the organ); default: every foreground label. Crops are centred on these voxels, so a lesion plus its
    surroundings is what the classifier sees (paper IV: lesion regions "slightly expanded").
    """
    labels = dataset_json.get("labels") or {}
    ints = {str(k): v for k, v in labels.items() if isinstance(v, int) and not isinstance(v, bool)}
    wanted = dataset_json.get(ROI_KEY)
    if wanted is None:
        return sorted(v for k, v in ints.items() if v > 0 and k != "ignore")
    if not isinstance(wanted, (list, tuple)) or not wanted:
        raise ValueError(f"dataset.json {ROI_KEY!r} must be a non-empty list of label names or values, got {wanted!r}")
    out = []
    for w in wanted:
        if isinstance(w, str) and w in ints:
            out.append(ints[w])
        elif isinstance(w, int) and not isinstance(w, bool) and w in ints.values() and w > 0:
            out.append(w)
        else:
            raise ValueError(f"dataset.json {ROI_KEY!r}: {w!r} is not a foreground label of 'labels' {labels}; "
                             f"use label names or values from 'labels'")
    return sorted(set(out))


def roi_centre(shape: Sequence[int], seg: np.ndarray | None, roi_labels: Sequence[int]) -> tuple[int, ...]:
    """Centre of the bounding box of the ROI voxels of ``seg [1, *shape]`` (or ``[*shape]``); the image centre
    when there is no mask or it holds no ROI voxel (a case with only images, or a lesion-centred crop already)."""
    if seg is not None and len(roi_labels):
        mask = np.isin(np.asarray(seg).reshape(tuple(shape)), list(roi_labels))
        if mask.any():
            idx = np.nonzero(mask)
            return tuple(int((i.min() + i.max() + 1) // 2) for i in idx)
    return tuple(int(s) // 2 for s in shape)


def crop_around(data, centre: Sequence[int], patch_size: Sequence[int]) -> np.ndarray:
    """``data [C, *shape]`` (numpy or blosc2) cropped to ``patch_size`` around ``centre``, zero-padded where the
    window leaves the image (nnU-Net's loader pads its data with zeros too)."""
    from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd

    bbox = [[int(c) - int(p) // 2, int(c) - int(p) // 2 + int(p)] for c, p in zip(centre, patch_size)]
    return np.asarray(crop_and_pad_nd(data, bbox, 0), dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Metrics and the files written at the end of training
# ---------------------------------------------------------------------------------------------------------------------
def classification_metrics(labels: Sequence[int], probabilities: np.ndarray, class_names: Sequence[str]) -> dict:
    """AUC, accuracy, per-class sensitivity/specificity (one vs rest), confusion matrix and counts.

    Binary: AUC of the probability of class 1 (the positive class, e.g. "malignant"), and the headline sensitivity /
    specificity are those of class 1. More classes: macro one-vs-rest AUC, headline sensitivity = balanced accuracy.
    An AUC that is undefined (the cases hold one class only, or lack a class with more than two) is ``None`` with
    the reason in ``auc_note``: this happens with small validation folds and is reported, never an exception.
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels, dtype=int)
    p = np.asarray(probabilities, dtype=float)
    K = len(class_names)
    if p.ndim != 2 or p.shape != (len(y), K):
        raise ValueError(f"probabilities must be [cases={len(y)}, classes={K}], got {list(p.shape)}")
    if len(y) == 0:
        raise ValueError("no cases to evaluate")
    if y.min() < 0 or y.max() >= K:
        raise ValueError(f"labels must be class ids 0..{K - 1}, got {sorted(set(y.tolist()))}")
    pred = p.argmax(1)
    cm = np.zeros((K, K), dtype=int)
    np.add.at(cm, (y, pred), 1)
    per_class = {}
    for k, name in enumerate(class_names):
        tp, fn = cm[k, k], cm[k].sum() - cm[k, k]
        fp = cm[:, k].sum() - cm[k, k]
        tn = cm.sum() - tp - fn - fp
        per_class[str(name)] = {"n": int(tp + fn),
                                "sensitivity": float(tp / (tp + fn)) if tp + fn else None,
                                "specificity": float(tn / (tn + fp)) if tn + fp else None}
    present = sorted(set(y.tolist()))
    auc, note = None, None
    if len(present) < 2:
        note = (f"AUC undefined: every evaluated case has class {class_names[present[0]]!r}; a ROC needs cases of "
                f"two classes (use a split whose validation folds hold both)")
    elif K == 2:
        auc = float(roc_auc_score(y, p[:, 1]))
    elif len(present) < K:
        absent = [class_names[k] for k in range(K) if k not in present]
        note = f"AUC undefined: no evaluated case of class(es) {absent} (one-vs-rest AUC needs every class)"
    else:
        auc = float(roc_auc_score(y, p, multi_class="ovr", average="macro", labels=list(range(K))))
    out = {"n": int(len(y)), "n_per_class": {str(n): int((y == k).sum()) for k, n in enumerate(class_names)},
           "auc": auc, "accuracy": float((pred == y).mean()), "per_class": per_class,
           "confusion_matrix": cm.tolist(), "class_names": [str(n) for n in class_names]}
    if K == 2:
        pos = str(class_names[1])
        out.update(positive_class=pos, sensitivity=per_class[pos]["sensitivity"],
                   specificity=per_class[pos]["specificity"])
    else:
        sens = [v["sensitivity"] for v in per_class.values() if v["sensitivity"] is not None]
        out.update(sensitivity=float(np.mean(sens)) if sens else None, specificity=None)
    if note:
        out["auc_note"] = note
    return out


def predictions_csv(cases: Sequence[str], probabilities: np.ndarray, class_names: Sequence[str],
                    labels: Sequence[int] | None = None) -> str:
    """CSV text: ``case, p_<class>..., predicted[, label]`` (probabilities with 6 decimals)."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case", *[f"p_{n}" for n in class_names], "predicted", *(["label"] if labels is not None else [])])
    for i, case in enumerate(cases):
        row = [case, *[f"{v:.6f}" for v in probabilities[i]], class_names[int(np.argmax(probabilities[i]))]]
        if labels is not None:
            row.append(class_names[int(labels[i])])
        w.writerow(row)
    return buf.getvalue()


def save_roc_png(path: str, labels: Sequence[int], probabilities: np.ndarray, class_names: Sequence[str],
                 metrics: dict, title: str = "") -> None:
    """ROC curve(s) (binary: class 1 vs 0; more classes: one vs rest), or the reason the AUC is undefined."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    y = np.asarray(labels, dtype=int)
    p = np.asarray(probabilities, dtype=float)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1)
    if metrics.get("auc") is None:
        ax.text(0.5, 0.5, metrics.get("auc_note", "AUC undefined"), ha="center", va="center", wrap=True, fontsize=9)
    else:
        targets = [1] if len(class_names) == 2 else range(len(class_names))
        for k in targets:
            fpr, tpr, _ = roc_curve(y == k, p[:, k])
            ax.plot(fpr, tpr, lw=2, label=f"{class_names[k]}" + (" vs rest" if len(class_names) > 2 else ""))
        ax.legend(loc="lower right", title=f"AUC {metrics['auc']:.3f} (n={metrics['n']})")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
