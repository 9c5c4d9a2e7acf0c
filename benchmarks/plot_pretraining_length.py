#!/usr/bin/env python
"""Held-out Dice against pretraining length, from the experiment runner's ``results.json`` files.

Issue #5 asks for Dice against pretraining length as a curve, not one point. The runner pretrains an arm for
another number of steps when its name carries ``~STEPS`` (``csm-nodrop~400``) and repeats it with ``@K``; each run
records its ``pretrain_steps`` and its held-out Dice. This script gathers the runs of one arm over one or more
results files (they may repeat a run: a folder resumed into a second file), takes the runs of a from-scratch
baseline from the same files, and writes a plot (every run a dot, the mean with its sample sd, the baseline as a
band) and a markdown table.

Usage::

    python benchmarks/plot_pretraining_length.py --arm csm-nodrop --baseline scratch-nodrop \\
        --out docs/img/dice_vs_pretraining_steps.png RESULTS.json [RESULTS.json ...]

Files with another dataset, split fold or fine-tuning budget than the first are refused: their Dice is not
comparable.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from csm_nnunet.experiment import _mean_sd, parse_arm  # the runner's table cell and its arm-name grammar
from csm_nnunet.visualize import save_figure_atomically

REGIONS = ("whole tumour", "tumour core", "enhancing")


class LengthCurveError(ValueError):
    """Results that cannot go on one curve; the message names the file and the field."""


def collect(paths: list[str], arm: str, baseline: str, condition: str = "complete") -> dict:
    """``{"steps": {steps: {region: [dice per run]}}, "baseline": {region: [...]}, "setting": {...}}``.

    A run that appears in several files (same arm name, same Dice in every region) counts once."""
    setting: dict | None = None
    seen: set[tuple] = set()
    by_steps: dict[int, dict[str, list[float]]] = {}
    base_runs: dict[str, list[float]] = {r: [] for r in REGIONS}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        this = {"dataset": data.get("dataset"), "fold": data.get("fold"),
                "finetune_steps": (data.get("steps") or {}).get("finetune")}
        if setting is None:
            setting = this
        for key, value in this.items():
            if value != setting[key]:
                raise LengthCurveError(f"{path}: {key} is {value!r}, but {paths[0]} has {setting[key]!r}; runs "
                                       "with another dataset, fold or fine-tuning budget are not comparable: "
                                       "give files of one setting only")
        for name, run in (data.get("arms") or {}).items():
            parsed = parse_arm(name)  # "csm-nodrop~400@2" -> ("csm-nodrop", 400, 2)
            if parsed is None:
                continue
            is_arm = parsed[0] == arm
            if not (is_arm or (parsed[0] == baseline and parsed[1] is None)):
                continue
            dice = (run.get("dice") or {}).get(condition)
            if dice is None:
                continue  # an arm that failed or was not scored: nothing to plot
            missing = [r for r in REGIONS if r not in dice]
            if missing:
                raise LengthCurveError(f"{path}: arm {name!r} has no Dice for {missing} under {condition!r}")
            key = (name, *(round(float(dice[r]), 10) for r in REGIONS))
            if key in seen:
                continue
            seen.add(key)
            if is_arm:
                steps = run.get("pretrain_steps")
                if not isinstance(steps, int):
                    raise LengthCurveError(f"{path}: arm {name!r} records no integer 'pretrain_steps'")
                target = by_steps.setdefault(steps, {r: [] for r in REGIONS})
            else:
                target = base_runs
            for r in REGIONS:
                target[r].append(float(dice[r]))
    if not by_steps:
        raise LengthCurveError(f"no run of arm {arm!r} (or {arm}~STEPS) in {paths}")
    return {"steps": dict(sorted(by_steps.items())), "baseline": base_runs, "setting": setting}


def table(curve: dict, arm: str, baseline: str) -> str:
    """Markdown: one row per pretraining length, then the baseline; mean ± sample sd over runs."""
    lines = [f"| arm | pretraining steps | runs | {' | '.join(REGIONS)} |", "|---|---|---|" + "---|" * len(REGIONS)]
    for steps, runs in curve["steps"].items():
        lines.append(f"| {arm} | {steps} | {len(runs[REGIONS[0]])} | "
                     + " | ".join(_mean_sd(runs[r]) for r in REGIONS) + " |")
    n_base = len(curve["baseline"][REGIONS[0]])
    if n_base:
        lines.append(f"| {baseline} | 0 (none) | {n_base} | "
                     + " | ".join(_mean_sd(curve["baseline"][r]) for r in REGIONS) + " |")
    return "\n".join(lines) + "\n"


def plot(curve: dict, arm: str, baseline: str, png: str, title: str = "") -> None:
    """One panel per region, written to a temporary file and renamed into place."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(curve["steps"])
    fig, axes = plt.subplots(1, len(REGIONS), figsize=(3.6 * len(REGIONS), 3.4), squeeze=False)
    for ax, region in zip(axes[0], REGIONS):
        base = curve["baseline"][region]
        if base:
            mean = statistics.mean(base)
            sd = statistics.stdev(base) if len(base) > 1 else 0.0
            ax.axhspan(mean - sd, mean + sd, color="0.85", lw=0)
            ax.axhline(mean, color="0.4", ls="--", lw=1, label=f"{baseline} (n={len(base)}), mean ± sd")
        means = [statistics.mean(curve["steps"][s][region]) for s in steps]
        sds = [statistics.stdev(curve["steps"][s][region]) if len(curve["steps"][s][region]) > 1 else 0.0
               for s in steps]
        ax.errorbar(steps, means, yerr=sds, marker="o", capsize=3, lw=1.2, color="C0", label=f"{arm}, mean ± sd")
        for s in steps:
            vals = curve["steps"][s][region]
            ax.plot([s] * len(vals), vals, ".", color="C0", alpha=0.5, markersize=5)
        ax.set_xscale("log")
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.minorticks_off()
        ax.set_xlabel("pretraining steps", fontsize=8)
        ax.set_title(f"Dice, {region}", fontsize=9)
    axes[0][0].legend(fontsize=7, loc="lower left", frameon=False)
    setting = curve["setting"]
    fig.suptitle(title or f"{setting['dataset']}, fold {setting['fold']}, {setting['finetune_steps']} fine-tuning "
                 "steps: held-out Dice against pretraining length", fontsize=9)
    fig.tight_layout()
    save_figure_atomically(fig, png, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="the runner's results.json files (or copies under benchmarks/)")
    parser.add_argument("--arm", required=True, help="the pretrained arm; its ~STEPS variants are the other points")
    parser.add_argument("--baseline", default="scratch", help="the from-scratch arm drawn as a band (default scratch)")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--condition", default="complete", help="which prediction condition (default: complete)")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    try:
        curve = collect(args.results, args.arm, args.baseline, args.condition)
    except (LengthCurveError, OSError, json.JSONDecodeError) as e:
        print(f"plot_pretraining_length: error: {e}", file=sys.stderr)
        return 1
    plot(curve, args.arm, args.baseline, args.out, args.title)
    print(table(curve, args.arm, args.baseline), end="")
    print(f"plot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
