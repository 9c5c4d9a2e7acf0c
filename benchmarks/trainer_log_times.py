#!/usr/bin/env python
"""Trainer-level speed from nnU-Net's own training logs: seconds per epoch and per iteration of real
``nnUNetv2_train`` runs (nnU-Net's loader, augmentation workers, the trainer's step), as opposed to the network-level
timings of ``bench_gpu.py``.

nnU-Net writes ``Epoch time: X s`` (training and validation iterations of one epoch) and a time stamp at the start of
every epoch into ``training_log_*.txt``. The gap between two epoch starts (the *cycle*) adds what happens between
epochs: logging, the progress plot, checkpoints. The first epoch holds the start-up (CUDA, workers filling their
queues), so medians are over the later epochs. The iterations per epoch come from the log's ``csm-nnunet:`` override
lines (``CSM_ITERS_PER_EPOCH``, ``CSM_VAL_ITERS``), else nnU-Net's defaults (250 and 50); ``CSMClassifierTrainer``
predicts every held-out case in each epoch's validation instead (``null`` in the JSON).

Usage::

    python benchmarks/trainer_log_times.py LABEL=FOLDER [LABEL=FOLDER ...] [--out times.json] [--machine TEXT]

Each FOLDER is searched for ``training_log_*.txt``; a folder with several logs (several runs) is an error.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import re
import statistics
import sys

from csm_nnunet.fileio import write_text_atomically

_STAMP = r"(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d+)"
_EPOCH_START = re.compile(_STAMP + r": Epoch (\d+)\s*$")
_EPOCH_TIME = re.compile(r": Epoch time: ([0-9.]+) s")
_OVERRIDE = re.compile(r"csm-nnunet: (num_iterations_per_epoch|num_val_iterations_per_epoch) = (\d+)")
_VAL_IGNORED = re.compile(r"the num_val_iterations_per_epoch override is ignored")  # the classifier: every case
_PLANS = re.compile(r"'batch_size': (\d+), 'patch_size': \[([0-9, ]+)\]")


def parse_log(path: str) -> dict:
    """Epoch times, epoch-start gaps and the iteration counts of one nnU-Net training log."""
    iters: dict[str, int | None] = {"num_iterations_per_epoch": 250, "num_val_iterations_per_epoch": 50}
    starts: list[dt.datetime] = []
    epoch_s: list[float] = []
    batch, patch = None, None
    with open(path) as f:
        for line in f:
            if m := _EPOCH_START.search(line):
                starts.append(dt.datetime.fromisoformat(m.group(1)))
            elif m := _EPOCH_TIME.search(line):
                epoch_s.append(float(m.group(1)))
            elif m := _OVERRIDE.search(line):
                iters[m.group(1)] = int(m.group(2))
            elif _VAL_IGNORED.search(line):
                iters["num_val_iterations_per_epoch"] = None
            elif batch is None and (m := _PLANS.search(line)):
                batch, patch = int(m.group(1)), [int(v) for v in m.group(2).split(",")]
    if len(epoch_s) < 2:
        raise ValueError(f"{path}: {len(epoch_s)} finished epoch(s); at least 2 are needed (the first is start-up)")
    cycles = [(b - a).total_seconds() for a, b in zip(starts, starts[1:])]
    n = iters["num_iterations_per_epoch"]
    median_epoch = statistics.median(epoch_s[1:])
    out = {"log": os.path.basename(path), "batch_size": batch, "patch_size": patch, "train_iterations_per_epoch": n,
           "val_iterations_per_epoch": iters["num_val_iterations_per_epoch"], "epochs": len(epoch_s),
           "epoch_s": epoch_s, "first_epoch_s": epoch_s[0], "median_epoch_s_after_first": round(median_epoch, 3),
           "ms_per_train_iteration": round(1000 * median_epoch / n, 1),
           "note": "ms per train iteration = median epoch time / train iterations; the epoch time includes the "
                   "validation iterations, so this is an upper bound on the training step"}
    if len(cycles) >= 2:
        median_cycle = statistics.median(cycles[1:])
        out.update({"cycle_s": [round(c, 2) for c in cycles], "median_cycle_s_after_first": round(median_cycle, 3),
                    "between_epochs_s": round(median_cycle - median_epoch, 3)})
    return out


def find_log(folder: str) -> str:
    logs = sorted(glob.glob(os.path.join(folder, "**", "training_log_*.txt"), recursive=True))
    if len(logs) != 1:
        raise ValueError(f"{folder}: expected one training_log_*.txt below it, found {len(logs)}; name the run's "
                         f"fold folder")
    return logs[0]


def markdown(rows: dict[str, dict]) -> str:
    lines = ["| run | batch | patch | train / val iterations per epoch | epochs | median epoch (s) | ms per train "
             "iteration | between epochs (s) |", "|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        patch = "x".join(str(v) for v in r["patch_size"] or [])
        val = "every held-out case" if r["val_iterations_per_epoch"] is None else r["val_iterations_per_epoch"]
        lines.append(f"| {label} | {r['batch_size']} | {patch} | {r['train_iterations_per_epoch']} / {val} | "
                     f"{r['epochs']} | {r['median_epoch_s_after_first']:.2f} | "
                     f"{r['ms_per_train_iteration']:.1f} | {r.get('between_epochs_s', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="LABEL=FOLDER holding one nnU-Net training log")
    parser.add_argument("--out", default=None, help="write the JSON here (atomically) as well as printing a table")
    parser.add_argument("--machine", default=None, help="where the logs were written (kept in the JSON)")
    parser.add_argument("--context", default=None, help="what ran: commands, dataset, commit (kept in the JSON)")
    args = parser.parse_args(argv)
    rows: dict[str, dict] = {}
    for spec in args.runs:
        label, sep, folder = spec.partition("=")
        if not sep or not label or not folder:
            parser.error(f"{spec!r} is not LABEL=FOLDER")
        try:
            rows[label] = parse_log(find_log(folder))
        except (ValueError, OSError) as e:
            print(f"trainer_log_times: error: {e}", file=sys.stderr)
            return 1
    print(markdown(rows), end="")
    if args.out:
        write_text_atomically(args.out, json.dumps({"machine": args.machine, "context": args.context, "runs": rows},
                                                   indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
