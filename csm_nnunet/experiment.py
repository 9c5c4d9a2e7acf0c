"""``csm_nnunet experiment seg|cls``: fine-tuning quality of the arms, through nnU-Net's console scripts.

One command runs the comparison the issues ask for, on one split and one training budget for every arm. ``seg``
arms:

* ``nnunet``   nnU-Net's default U-Net (``nnUNetTrainer``, only shortened: ``nnUNetTrainer_CSMBudget``);
* ``fused``    a channel-fused-token ViT of the same width/depth with our fusion and decoder
  (``CSMSegTrainer_FusedTokens``), from scratch;
* ``scratch``  ``CSMSegTrainer`` (series tokens) from scratch;
* ``csm``      ``CSMSegTrainer`` from a ``CSMPretrainer`` encoder (pretrained on every non-validation case);
* ``mae``      ``CSMSegTrainer_FusedTokens`` from a ``MAEPretrainer`` encoder (channel-fused pretraining);
* ``scratch-instnorm`` / ``csm-instnorm``  ``CSMSegTrainer_InstanceNormFusion`` (taps standardised per channel over the
  patch positions instead of LayerNorm-ed per token) from scratch and from a ``CSMPretrainer`` encoder;
* ``scratch-nodrop`` / ``csm-nodrop``  ``CSMSegTrainer_NoSeriesDropout`` (no random series dropout) from scratch and
  from a ``CSMPretrainer`` encoder;
* ``csm-decfirst`` / ``csm-nodrop-decfirst``  ``CSMSegTrainer_DecoderFirst`` / ``..._NoSeriesDropout_DecoderFirst``
  from a ``CSMPretrainer`` encoder: the encoder is frozen for the first 20 % of the epochs; ``scratch-nodrop-decfirst``
  the same schedule on a random encoder (the control: does the schedule alone help?);
* ``mae-nodrop-decfirst``  ``CSMSegTrainer_FusedTokens_NoSeriesDropout_DecoderFirst`` from a ``MAEPretrainer``
  encoder: channel-fused pretraining under the same fine-tuning recipe as ``csm-nodrop-decfirst``;
* ``csm-mask50-nodrop-decfirst`` / ``csm-samepos-nodrop-decfirst``  the same recipe from a ``CSMPretrainer_Mask50``
  (intra-series mask ratio 50 %) / ``CSMPretrainer_SamePositionMask`` (one patch mask for all series of a case)
  encoder, the paper's Table VIII / VII switches: under them the pretraining encoder sees one position in two series
  4x / 8x as often as under CSM's independent 87.5 % masks (does the cross-series attention then form?);
* ``csm-lr5e3-nodrop-decfirst``  the same recipe from a ``CSMPretrainer_LR5e3`` encoder (pretraining peak lr 5e-3
  instead of 1e-3: does the encoder's attention, uniform after 1e-3 pretraining here, then form?);
* ``csm-normpix-nodrop-decfirst``  the same recipe from a ``CSMPretrainer_NormPix`` encoder (each hidden patch's
  target normalised to zero mean and unit variance, MAE practice: the case-level average no longer explains it);
* ``scratch-drop10`` / ``csm-drop10``  ``CSMSegTrainer_SeriesDropout10`` (series dropout on 10 % of cases instead of
  20 %) from scratch and from a ``CSMPretrainer`` encoder;
* ``primus-scratch`` / ``primus-csm``  nnU-Net's own ``nnUNet_Primus_S_Trainer`` (shortened) from scratch and from a
  ``CSM_PRESET=PrimusS`` CSM encoder folded in by ``csm_nnunet export-primus``.

Every step is a real entry point in a subprocess (``nnUNetv2_plan_and_preprocess``, ``nnUNetv2_train``,
``nnUNetv2_predict``, ``csm_nnunet export-primus``); Dice comes from nnU-Net's ``compute_metrics_on_folder`` on the
predictions of the held-out cases, for each label and for the label regions of the dataset (brain: whole tumour,
tumour core, enhancing). With ``--missing`` every arm also predicts the held-out cases once per series with that
series replaced by an all-zero image (the package's missing-series convention) and reports the Dice drop.

``cls`` arms (``CLS_ARMS``): ``scratch`` / ``csm`` (``CSMClassifierTrainer`` without / with a CSM encoder),
``fused`` / ``mae`` (the channel-fused-token classifier from scratch / from ``MAEPretrainer``), ``csm-layerdecay``,
``csm-lr5e3`` (``CSMClassifierTrainer`` from a ``CSMPretrainer_LR5e3`` encoder).
The held-out cases are classified with ``csm_nnunet classify`` and scored (AUC, accuracy, sensitivity, specificity)
against dataset.json's labels; ``--missing`` repeats that per zeroed series. Results: ``results_cls.json/.md``.

Split (written to ``splits_final.json`` before training): ``--val`` held-out cases; fold 0 trains on ``--labelled``
of the others (fine-tuning), fold 1 on all of the others (pretraining: unlabelled images may include cases without
labels, never the held-out ones). Results: ``<out>/results.json`` and ``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from csm_nnunet.fileio import write_text_atomically

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
    "scratch-instnorm": ("CSMSegTrainer_InstanceNormFusion", None, None),
    "csm-instnorm": ("CSMSegTrainer_InstanceNormFusion", "CSMPretrainer", None),
    "scratch-nodrop": ("CSMSegTrainer_NoSeriesDropout", None, None),
    "csm-nodrop": ("CSMSegTrainer_NoSeriesDropout", "CSMPretrainer", None),
    "csm-decfirst": ("CSMSegTrainer_DecoderFirst", "CSMPretrainer", None),
    "csm-nodrop-decfirst": ("CSMSegTrainer_NoSeriesDropout_DecoderFirst", "CSMPretrainer", None),
    "scratch-nodrop-decfirst": ("CSMSegTrainer_NoSeriesDropout_DecoderFirst", None, None),
    "mae-nodrop-decfirst": ("CSMSegTrainer_FusedTokens_NoSeriesDropout_DecoderFirst", "MAEPretrainer", None),
    "csm-mask50-nodrop-decfirst": ("CSMSegTrainer_NoSeriesDropout_DecoderFirst", "CSMPretrainer_Mask50", None),
    "csm-samepos-nodrop-decfirst": ("CSMSegTrainer_NoSeriesDropout_DecoderFirst", "CSMPretrainer_SamePositionMask",
                                    None),
    "csm-lr5e3-nodrop-decfirst": ("CSMSegTrainer_NoSeriesDropout_DecoderFirst", "CSMPretrainer_LR5e3", None),
    "csm-normpix-nodrop-decfirst": ("CSMSegTrainer_NoSeriesDropout_DecoderFirst", "CSMPretrainer_NormPix", None),
    "scratch-nodrop-posbias": ("CSMSegTrainer_NoSeriesDropout_SamePositionBias", None, None),
    "csm-nodrop-decfirst-posbias": ("CSMSegTrainer_NoSeriesDropout_DecoderFirst_SamePositionBias", "CSMPretrainer",
                                    None),
    "scratch-drop10": ("CSMSegTrainer_SeriesDropout10", None, None),
    "csm-drop10": ("CSMSegTrainer_SeriesDropout10", "CSMPretrainer", None),
    "primus-scratch": ("nnUNet_Primus_S_Trainer_CSMBudget", None, "PrimusS"),
    "primus-csm": ("nnUNet_Primus_S_Trainer_CSMBudget", "CSMPretrainer", "PrimusS"),
}
#: the paper's pretraining ablations (Tables VII, VIII): the same fine-tuning trainer as ``csm``, another pretrainer
ABLATIONS: dict[str, str] = {
    "csm-samepos": "CSMPretrainer_SamePositionMask",
    "csm-noseriesrecon": "CSMPretrainer_SeriesMaskNoRecon",
    "csm-noseriesmask": "CSMPretrainer_NoSeriesMask",
    "csm-mask50": "CSMPretrainer_Mask50",
}
ARMS.update({arm: ("CSMSegTrainer", pretrainer, None) for arm, pretrainer in ABLATIONS.items()})
#: label regions reported besides the single labels (BraTS-style for the synthetic brain data)
REGIONS: dict[str, dict[str, tuple[int, ...]]] = {
    "brain": {"whole tumour": (1, 2, 3), "tumour core": (2, 3), "enhancing": (2,)},
    "prostate": {"gland+lesion": (1, 2), "lesion": (2,)},
}


#: classification arms (``experiment cls``): the same roles with CSMClassifierTrainer and its variants
CLS_ARMS: dict[str, tuple[str, str | None, str | None]] = {
    "scratch": ("CSMClassifierTrainer", None, None),
    "csm": ("CSMClassifierTrainer", "CSMPretrainer", None),
    "fused": ("CSMClassifierTrainer_FusedTokens", None, None),
    "mae": ("CSMClassifierTrainer_FusedTokens", "MAEPretrainer", None),
    "csm-layerdecay": ("CSMClassifierTrainer_LayerDecay", "CSMPretrainer", None),
    "csm-headfirst": ("CSMClassifierTrainer_HeadFirst", "CSMPretrainer", None),
    "scratch-headfirst": ("CSMClassifierTrainer_HeadFirst", None, None),
    "scratch-posbias": ("CSMClassifierTrainer_SamePositionBias", None, None),
    "csm-posbias": ("CSMClassifierTrainer_SamePositionBias", "CSMPretrainer", None),
    "csm-lr5e3": ("CSMClassifierTrainer", "CSMPretrainer_LR5e3", None),
    **{arm: ("CSMClassifierTrainer", pretrainer, None) for arm, pretrainer in ABLATIONS.items()},
}
#: ``--grid``: the paper's rows (full CSM, its ablations, channel-fused MAE, scratch) plus the channel-fused ViT and,
#: for segmentation, nnU-Net's default U-Net, so that no comparison is flattering
GRID_ARMS: dict[str, str] = {
    "seg": "csm,csm-noseriesrecon,csm-noseriesmask,csm-samepos,csm-mask50,mae,scratch,fused,nnunet",
    "cls": "csm,csm-noseriesrecon,csm-noseriesmask,csm-samepos,csm-mask50,mae,scratch,fused",
}
STUDY_ARMS = {"seg": ARMS, "cls": CLS_ARMS}


def parse_arm(arm: str) -> tuple[str, int | None, int] | None:
    """``name[~steps][@k]`` -> ``(name, pretraining steps or None, repeat k)``; None if malformed.

    ``@k`` (k >= 2) is the k-th independent run of an arm (its own results folder); ``~steps`` gives a pretrained arm
    its own pretraining run of that many steps instead of ``--pretrain-epochs`` (the pretraining-length curve:
    ``csm~100,csm~400,csm~1600``)."""
    head, at, repeat = arm.partition("@")
    name, tilde, steps = head.partition("~")
    if (at and not (repeat.isdigit() and int(repeat) >= 2)) or (tilde and not (steps.isdigit() and int(steps))):
        return None
    return name, int(steps) if steps else None, int(repeat) if repeat else 1


def arm_spec(arm: str, study: str = "seg") -> tuple[str, str | None, str | None] | None:
    """``ARMS[name]`` (``CLS_ARMS`` for ``study="cls"``) for an arm written ``name[~steps][@k]`` (see
    :func:`parse_arm`); None if unknown, malformed, or ``~steps`` on an arm without pretraining."""
    parsed = parse_arm(arm)
    spec = STUDY_ARMS[study].get(parsed[0]) if parsed else None
    if spec is None or (parsed[1] is not None and spec[1] is None):
        return None
    return spec


@dataclass
class Runner:
    """Runs console scripts with the experiment's nnU-Net folders; logs every command and its wall time."""

    out: str
    threads: int
    device: str = "cpu"
    log_lines: list[str] = field(default_factory=list)

    def env(self, results: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of every console script. Data augmentation: an ``nnUNet_n_proc_DA`` the user set wins;
        otherwise none on CPU (worker processes cost tens of seconds to start and compete with the training step for
        the same few cores) and nnU-Net's own default on CUDA, where the step is fast and augmentation in the main
        process would leave the GPU waiting."""
        env = dict(os.environ)
        env.update({"nnUNet_raw": join(self.out, "raw"), "nnUNet_preprocessed": join(self.out, "preprocessed"),
                    "nnUNet_results": results, "nnUNet_compile": "f", "nnUNet_def_n_proc": "1",
                    "OMP_NUM_THREADS": str(self.threads)})
        if "nnUNet_n_proc_DA" not in os.environ and self.device == "cpu":
            env["nnUNet_n_proc_DA"] = "0"
        env.update(extra or {})
        return env

    @property
    def preprocessing_processes(self) -> str:
        """``-np``/``-npfp`` of the planning step: 1 on a 2-core machine (as measured there), up to 8 on more."""
        return str(max(1, min(8, self.threads // 2)))

    def __call__(self, cmd: list[str], results: str, extra: dict[str, str] | None = None, log_name: str = "",
                 epochs: int | None = None) -> float:
        """Run ``cmd`` with its output in ``<out>/logs/<log_name>.log``. With ``epochs`` (a training run) the
        progress is read from nnU-Net's training log under ``results`` and shown as ``epoch k/epochs``."""
        t0 = time.time()
        log_path = join(self.out, "logs", (log_name or cmd[0]) + ".log")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd)}", flush=True)
        with open(log_path, "a") as log:
            log.write(f"$ {' '.join(cmd)}\n  env: {extra or {}}\n")
            log.flush()
            proc = subprocess.Popen(cmd, env=self.env(results, extra), stdout=log, stderr=subprocess.STDOUT)
            shown = -1
            while proc.poll() is None:
                time.sleep(2.0)
                if epochs:
                    shown = _show_progress(results, t0, epochs, shown)
                else:
                    shown = _show_elapsed(t0, shown)
            if shown >= 0 and sys.stdout.isatty():
                print(flush=True)
        seconds = time.time() - t0
        self.log_lines.append(f"{seconds:8.1f} s  {' '.join(cmd)}")
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}; see {log_path}")
        return seconds


TIMINGS_LEDGER = "timings.json"


def record_timing(out: str, timings: dict[str, float | None], key: str, seconds: float,
                  ran: list[str] | None = None) -> None:
    """Keep the wall time of a run in ``timings`` and in ``<out>/timings.json``, which outlives the invocation: a
    later invocation of the same command reuses the run (its output exists) and reads its time back from there, so
    the tables' compute total covers every run behind them, not only those of the last invocation. ``ran`` collects
    the keys this invocation ran itself (not reused), for its entry in the results' ``invocations``."""
    timings[key] = seconds
    if ran is not None:
        ran.append(key)
    path = join(out, TIMINGS_LEDGER)
    ledger = json.load(open(path)) if isfile(path) else {}
    ledger[key] = round(seconds, 1)
    write_text_atomically(path, json.dumps(ledger, indent=1, sort_keys=True))


def reuse_timing(out: str, timings: dict[str, float | None], key: str) -> None:
    """A run reused from an earlier invocation: its recorded time, or ``None`` when it predates the ledger."""
    path = join(out, TIMINGS_LEDGER)
    timings[key] = (json.load(open(path)) if isfile(path) else {}).get(key)


def merge_timings(kept: dict[str, float | None], new: dict[str, float | None]) -> dict[str, float | None]:
    """``kept`` (a --resume's earlier summary) updated with this invocation's ``new`` timings, rounded; a reuse with
    no recorded time must not erase one the earlier summary kept."""
    timings = dict(kept)
    for k, v in new.items():
        if v is not None or timings.get(k) is None:
            timings[k] = None if v is None else round(v, 1)
    return timings


def csm_environment() -> dict[str, str]:
    """The ``CSM_*`` variables set when the experiment ran: every run inherits them (a ``CSM_LR`` there changes the
    pretraining runs too), so the results must say so."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("CSM_")}


def settings_note(summary: dict) -> str:
    """The non-default settings behind a table, for its footer: ``--finetune-lr`` and inherited ``CSM_*``."""
    parts = []
    if summary.get("finetune_lr"):
        parts.append(f"fine-tuning peak lr {summary['finetune_lr']:g} (--finetune-lr)")
    if summary.get("environment"):
        parts.append("set in the environment of every run: "
                     + ", ".join(f"{k}={v}" for k, v in summary["environment"].items()))
    text = "; ".join(parts)
    return f" {text[0].upper()}{text[1:]}." if parts else ""


def earlier_summary(path: str, resume: bool) -> dict:
    """The summary an earlier invocation wrote to ``path``, which a ``--resume`` extends; ``{}`` otherwise."""
    if not (resume and isfile(path)):
        return {}
    with open(path) as f:
        return json.load(f)


def invocation_record(args: argparse.Namespace, t_start: float, ran: list[str], summary: dict) -> dict:
    """One invocation of the runner as the results remember it: when it started, its wall time, scope and machine
    (those ``summary`` has just recorded at its top level), its options and the runs it ran itself. A ``--resume``
    adds arms to a folder's results over several invocations, possibly on other machines; the top-level ``machine``
    and ``wall_s`` describe only the newest, so without this list the provenance of the earlier arms would be lost
    (one results file per folder then says it all)."""
    import datetime

    options = {k: v for k, v in sorted(vars(args).items()) if isinstance(v, (str, int, float, bool, type(None)))}
    return {"started": datetime.datetime.fromtimestamp(t_start, datetime.timezone.utc).isoformat(
                timespec="milliseconds"),
            "wall_s": summary["wall_s"], "scope": summary.get("wall_scope", "this invocation"),
            "machine": summary["machine"], "options": options, "ran": list(ran)}


def kept_invocations(earlier: dict) -> list[dict]:
    """The ``invocations`` a --resume keeps from ``earlier`` (the summary it extends). A results file written before
    the runner recorded invocations has arms but no list; without an entry for them the list would start with the
    first invocation that recorded itself, as if it had run every arm. Their entry cannot say which invocation ran
    what or when (``started`` and ``ran`` are ``None``), only what the file held and the machine and wall time it
    named last."""
    if not earlier or "invocations" in earlier:
        return list(earlier.get("invocations", []))
    held: list[str] | dict[str, list[str]] = sorted(earlier.get("arms", {})) or {
        pct: sorted(f.get("arms", {})) for pct, f in earlier.get("fractions", {}).items()}
    if not held:  # nothing was run before: nothing to describe
        return []
    return [{"started": None, "wall_s": earlier.get("wall_s"),
             "scope": "every invocation before the results recorded them, merged",
             "machine": earlier.get("machine"), "options": {}, "ran": None, "held": held}]


def add_invocation(earlier: list[dict], record: dict) -> list[dict]:
    """``earlier`` (a --resume's kept list) with ``record`` appended, replacing an entry of the same invocation: the
    grid is rewritten after every label fraction and must list its invocation once."""
    return [r for r in earlier if r.get("started") != record["started"]] + [record]


def compute_total(timings: dict[str, float | None]) -> tuple[float, int]:
    """Seconds summed over the timed runs, and how many runs have no recorded time."""
    return (round(sum(v for v in timings.values() if v is not None), 1),
            sum(1 for v in timings.values() if v is None))


def wall_note(summary: dict) -> str:
    """The tables' footer: the wall time of what wrote them and the compute of every run behind the tables.

    ``wall_scope`` says what the wall time covers: a ``--fractions`` fold's own table is timed from the start of that
    label fraction (its fine-tuning and prediction), not from planning and pretraining, and must not claim more."""
    text = f"wall time {(summary.get('wall_s') or 0) / 60:.0f} min"
    if "compute_s" not in summary:
        return text + "." + settings_note(summary)
    text += (f" ({summary.get('wall_scope', 'this invocation')}); "
             f"{summary['compute_s'] / 60:.0f} min summed over the runs behind these tables")
    untimed = summary.get("untimed_runs", 0)
    return text + (f", {untimed} run(s) reused from before times were recorded not counted." if untimed else ".") \
        + settings_note(summary)


def _show_progress(results: str, t0: float, epochs: int, shown: int) -> int:
    """Print ``epoch k/epochs`` from the newest nnU-Net training log under ``results`` written since ``t0`` (on a
    terminal in place, otherwise a line per quarter of the run); returns the last epoch shown."""
    import glob

    logs = [f for f in glob.glob(join(results, "**", "training_log_*.txt"), recursive=True)
            if os.path.getmtime(f) >= t0 - 1]
    if not logs:
        return shown
    with open(max(logs, key=os.path.getmtime)) as f:
        done = sum(1 for line in f if "Epoch time:" in line)
    if done <= shown:
        return shown
    elapsed = time.time() - t0
    if sys.stdout.isatty():
        print(f"\r    epoch {done}/{epochs}  {elapsed:5.0f} s", end="", flush=True)
    elif done == epochs or (4 * done) // max(epochs, 1) > (4 * max(shown, 0)) // max(epochs, 1):
        print(f"    epoch {done}/{epochs}  {elapsed:5.0f} s", flush=True)
    return done


def _show_elapsed(t0: float, shown: int, every_s: int = 60) -> int:
    """The heartbeat of a step without epochs (planning, prediction, classification): on a terminal the seconds so
    far in place, otherwise a line every ``every_s`` seconds, so a long step is never silent. Returns the seconds
    last shown."""
    elapsed = int(time.time() - t0)
    if sys.stdout.isatty():
        print(f"\r    running  {elapsed:5d} s", end="", flush=True)
        return elapsed
    if elapsed // every_s > max(shown, 0) // every_s:
        print(f"    running  {elapsed:5d} s", flush=True)
        return elapsed
    return shown


def _find_dataset(raw: str, dataset_id: int) -> str:
    names = [d for d in os.listdir(raw) if d.startswith(f"Dataset{dataset_id:03d}_")]
    if len(names) != 1:
        raise FileNotFoundError(f"expected one Dataset{dataset_id:03d}_* in {raw}, found {names}")
    return names[0]


def write_splits(preprocessed_dataset: str, cases: list[str], n_val: int, n_labelled: int, seed: int,
                 fractions: tuple[int, ...] = (), strata: dict[str, int] | None = None) -> dict:
    """Held-out cases and the labelled subset, chosen by a seeded permutation (stated in the results).

    Folds of ``splits_final.json``: 0 trains on ``n_labelled`` cases, 1 on every non-held-out case (pretraining),
    2, 3, ... on the label fractions (``fractions[i]`` percent of them, at least one case), returned as
    ``fraction_folds``. A fraction keeps the fold an earlier invocation gave it when folds 0 and 1 are unchanged
    (same cases, seed and held-out set), and new fractions are appended: results folders hold ``fold_<k>``, so
    running ``--fractions 100`` after ``--fractions 10,50,100`` must not renumber 100 % to fold 2 and lose its runs.
    The labelled subsets are nested prefixes of one permutation, so a larger fraction adds cases to a smaller one
    instead of drawing others (Table V/VI style).
    With ``strata`` (case -> class, dataset.json's ``classification_labels``) that permutation takes the classes in
    turn, so even a 2-case fraction holds both classes of a binary task."""
    if n_val < 1 or n_labelled < 1 or n_val + n_labelled > len(cases):
        raise ValueError(f"--val {n_val} + --labelled {n_labelled} must fit the {len(cases)} cases (each >= 1)")
    bad = [f for f in fractions if not 0 < f <= 100]
    if bad:
        raise ValueError(f"--fractions {bad}: label fractions are percentages in (0, 100]")
    order = [cases[i] for i in np.random.default_rng(seed).permutation(len(cases))]
    val, pool = sorted(order[:n_val]), order[n_val:]
    labelled = sorted(pool[:n_labelled])
    ranked = _interleave_classes(pool, strata) if strata else pool
    by_fraction = {str(f): sorted(ranked[: max(1, round(f / 100 * len(pool)))]) for f in fractions}
    splits = [{"train": labelled, "val": val}, {"train": sorted(pool), "val": val}]
    path = join(preprocessed_dataset, "splits_final.json")
    if isfile(path):
        with open(path) as f:
            earlier = json.load(f)
        if isinstance(earlier, list) and earlier[:2] == splits:
            splits = earlier
    fraction_folds = {}
    for pct, train in by_fraction.items():
        fold = {"train": train, "val": val}
        if fold not in splits[2:]:
            splits.append(fold)
        fraction_folds[pct] = 2 + splits[2:].index(fold)
    write_text_atomically(path, json.dumps(splits, indent=1))
    out = {"val": val, "labelled": labelled, "pretraining": sorted(pool)}
    return {**out, "fractions": by_fraction, "fraction_folds": fraction_folds} if fractions else out


def _interleave_classes(cases: list[str], strata: dict[str, int]) -> list[str]:
    """``cases`` reordered to take one case of each class in turn (class order by first appearance, each class in
    its given order); cases without a class come last."""
    by_class: dict[int, list[str]] = {}
    for case in cases:
        if case in strata:
            by_class.setdefault(int(strata[case]), []).append(case)
    queues = list(by_class.values())
    out = [queue[i] for i in range(max(map(len, queues), default=0)) for queue in queues if i < len(queue)]
    return out + [case for case in cases if case not in strata]


#: the pseudo Dice (nnU-Net's per-epoch Dice on validation patches) at which a label counts as learned
LEARNED_AT = 0.5


def foreground_names(labels: dict[str, int | list[int]]) -> list[str]:
    """dataset.json's foreground label (or region) names in the order nnU-Net logs their pseudo Dice: labels by
    value, regions in dataset.json order; like nnU-Net's ``LabelManager``, the ``ignore`` label is not one of them."""
    fg = [(name, v) for name, v in labels.items() if name != "ignore" and v not in (0, [0], (0,))]
    if all(isinstance(v, int) for _, v in fg):
        fg.sort(key=lambda item: item[1])
    return [name for name, _ in fg]


def training_curve(checkpoint: str, label_names: list[str]) -> dict | None:
    """Per-epoch training loss and pseudo Dice per label from a fine-tuning run's nnU-Net checkpoint (its
    ``logging``), or None when the checkpoint has no such log. Why: with few labels a small label is learned at a
    random epoch or not at all, so the final Dice is nearly all-or-nothing; the epoch a label is first learned is the
    finer measure of whether pretrained weights speed fine-tuning up."""
    import torch

    # mmap: only the pickled log is read, not the weights and optimizer state beside it (every --resume rereads it)
    log = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True).get("logging") or {}
    dice, losses = log.get("dice_per_class_or_region"), log.get("train_losses")
    if not dice or not losses or any(len(d) != len(label_names) for d in dice):
        return None
    return {"labels": list(label_names), "train_loss": [round(float(v), 4) for v in losses],
            "pseudo_dice": [[None if v != v else round(float(v), 4) for v in d] for d in dice]}


def first_learned_epoch(curve: dict, label: str, threshold: float = LEARNED_AT) -> int | None:
    """The first epoch (1-based) whose pseudo Dice of ``label`` reached ``threshold``; None if none did."""
    i = curve["labels"].index(label)
    return next((e for e, d in enumerate(curve["pseudo_dice"], start=1) if d[i] is not None and d[i] >= threshold),
                None)


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
                file_ending: str) -> tuple[dict[str, float], dict[str, dict[str, dict]]]:
    """Dice per label and per region from nnU-Net's compute_metrics_on_folder: the mean over the cases of
    ``pred_dir`` (a case where reference and prediction are both empty counts as NaN there and is skipped in the
    mean), and per case ``{case: {name: {"dice": float | None, "n_ref": voxels, "n_pred": voxels}}}``. The per-case
    record is kept because that mean hides what happens on cases without the label: a false prediction there scores
    0, a correct empty one is skipped, so a run that leaves such a case clean is averaged over fewer cases."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    fg = {name: v for name, v in labels.items() if int(v) > 0}
    keys: list[int | tuple[int, ...]] = [int(v) for v in fg.values()] + [tuple(r) for r in regions.values()]
    res = compute_metrics_on_folder(labels_dir, pred_dir, None, SimpleITKIO(), file_ending, keys, num_processes=1)
    names = list(fg) + list(regions)
    cases = {}
    for c in res["metric_per_case"]:
        m = [c["metrics"][key] for key in keys]
        cases[os.path.basename(c["reference_file"])[: -len(file_ending)]] = {
            name: {"dice": None if np.isnan(k["Dice"]) else float(k["Dice"]), "n_ref": int(k["n_ref"]),
                   "n_pred": int(k["n_pred"])} for name, k in zip(names, m)}
    means = {}
    for name in names:
        defined = [r[name]["dice"] for r in cases.values() if r[name]["dice"] is not None]
        means[name] = float(np.mean(defined)) if defined else float("nan")
    return means, cases


def held_out_classes(ds: dict, val: list[str]) -> dict[str, str]:
    """``{held-out case: class name}`` from dataset.json's ``classification_labels``/``class_names`` (the synthetic
    data has them), so segmentation results can be read per class; ``{}`` when the dataset has no class label for
    every held-out case. Lenient on purpose, unlike :func:`csm_nnunet.class_labels.read_class_labels` (which a
    classifier needs, and which raises): a segmentation study must not fail because its dataset lacks class labels,
    nor because the held-out cases happen to share one class."""
    from csm_nnunet.class_labels import LABELS_KEY, NAMES_KEY

    labels, names = ds.get(LABELS_KEY) or {}, ds.get(NAMES_KEY)
    ids = [labels.get(c) for c in val]
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        return {}
    return {c: str(names[i]) if names and i < len(names) else str(i) for c, i in zip(val, ids)}


@dataclass
class Context:
    """What every study shares: folders, the dataset, the split, the pretrained checkpoints, timings."""

    args: argparse.Namespace
    out: str
    run: Runner
    name: str
    dataset_id: int
    ds: dict
    file_ending: str
    split: dict[str, list[str]]
    steps: dict[str, int]
    arms: list[str]
    checkpoints: dict[tuple[str, str], str]
    timings: dict[str, float | None]
    t_start: float
    #: timing keys of the runs this invocation ran itself (shared with the label-fraction contexts it spawns)
    ran: list[str] = dataclasses.field(default_factory=list)
    #: the fine-tuning fold of splits_final.json (0: ``--labelled``; 2 + i: the i-th ``--fractions`` entry)
    fold: int = 0
    #: suffix of this fold's results folders and files (``""``, or ``"_f10"`` for the 10 % label fraction)
    tag: str = ""

    @property
    def variant(self) -> str:
        """The suffix of a non-default fine-tuning (``variant_tag``); ``""`` for the default."""
        return variant_tag(self.args)

    def run_name(self, arm: str) -> str:
        """One arm's fine-tuning in this fold, as its results/predictions folder, log and timing keys call it:
        ``csm_f10`` (seg), ``cls_crop24_csm_f10`` (cls with ``--crop 24``), ``csm_lr0.001_f10`` (``--finetune-lr``).
        The study is in the cls name so that seg and cls runs in one folder never share a timing key."""
        return (f"{arm}{self.variant}" if self.args.study == "seg" else f"cls{self.variant}_{arm}") + self.tag

    def pretrained_key(self, arm: str, pretrainer: str, preset: str) -> tuple[str, str, int, int]:
        """Which pretraining run an arm loads: ``(pretrainer, preset, replicate, epochs)``. Replicate 1 for every
        arm, or with ``--pretrain-per-repeat`` the arm's repeat number (``csm@3`` loads pretraining run 3), so
        repeats measure pretraining variance too, not only fine-tuning variance. With ``--finetunes-per-encoder M``
        consecutive repeats share a run (``csm@1..M`` load run 1, ``csm@M+1..2M`` run 2, ...), which separates the
        encoder's variance from fine-tuning's. Epochs: ``--pretrain-epochs``, or for ``name~steps`` the epochs of
        ``--iters`` iterations that reach ``steps`` (rounded up)."""
        _, steps, k = parse_arm(arm)
        epochs = self.args.pretrain_epochs if steps is None else -(-steps // self.args.iters)
        per_encoder = getattr(self.args, "finetunes_per_encoder", 1)
        return pretrainer, preset, (k - 1) // per_encoder + 1 if self.args.pretrain_per_repeat else 1, epochs

    def length(self, epochs: int) -> dict[str, str]:
        return {"CSM_NUM_EPOCHS": str(epochs), "CSM_ITERS_PER_EPOCH": str(self.args.iters), "CSM_VAL_ITERS": "2"}

    def train_arm(self, arm: str, trainer: str, pretrainer: str | None, preset: str) -> tuple[str, dict]:
        """Fine-tune one arm on fold 0 (skipped when its checkpoint_final exists); returns its results folder and
        the results-json stub."""
        run_name = self.run_name(arm)
        results = join(self.out, "results", run_name)
        extra = {**self.length(self.args.epochs), "CSM_PRESET": preset}
        if self.args.study == "cls" and getattr(self.args, "crop", None):
            extra["CSM_CROP"] = str(self.args.crop)
        if getattr(self.args, "finetune_lr", None):
            extra["CSM_LR"] = repr(self.args.finetune_lr)
        fold_dir = join(results, self.name, f"{trainer}__{PLANS}__{CONFIG}", f"fold_{self.fold}")
        timing_key = f"train {run_name}"
        if isfile(join(fold_dir, "checkpoint_final.pth")):
            reuse_timing(self.out, self.timings, timing_key)
        else:
            cmd = ["nnUNetv2_train", str(self.dataset_id), CONFIG, str(self.fold), "-tr", trainer, "-p", PLANS,
                   "-device", self.args.device]
            if pretrainer is not None:
                weights = self.checkpoints[self.pretrained_key(arm, pretrainer, preset)]
                if trainer.startswith("nnUNet_Primus"):
                    exported = join(self.out, "results", f"export_{arm}.pth")
                    self.run(["csm_nnunet", "export-primus", weights, "--trainer", trainer, "-d",
                              str(self.dataset_id), "-c", CONFIG, "-p", PLANS, "-o", exported], results, extra,
                             f"export_{arm}")
                    weights = exported
                cmd += ["-pretrained_weights", weights]
            record_timing(self.out, self.timings, timing_key, ran=self.ran,
                          seconds=self.run(cmd, results, extra, f"train_{run_name}", epochs=self.args.epochs))
        res: dict = {"trainer": trainer, "pretrained": pretrainer, "preset": preset if trainer.startswith(
            ("CSM", "nnUNet_Primus")) else None, "finetune_steps": self.steps["finetune"],
            "finetune_lr": getattr(self.args, "finetune_lr", None)}
        if pretrainer is not None:
            ckpt = self.checkpoints[self.pretrained_key(arm, pretrainer, preset)]
            record = join(os.path.dirname(ckpt), "csm_experiment_steps.json")
            res["pretrain_steps"] = json.load(open(record))["steps"] if isfile(record) else None
            res["pretrained_checkpoint"] = os.path.relpath(ckpt, self.out)
        if self.args.study == "seg":
            curve = training_curve(join(fold_dir, "checkpoint_final.pth"), foreground_names(self.ds["labels"]))
            if curve is not None:
                res["training"] = curve
        return results, res

    def missing_inputs(self) -> dict[str, str]:
        """Held-out images as given, and (``--missing``) once per series with that series all zero."""
        variants: list[tuple[str, int | None]] = [("complete", None)]
        if self.args.missing:
            variants += [(f"without {self.ds['channel_names'][str(c)]}", c)
                         for c in range(len(self.ds["channel_names"]))]
        images = join(self.out, "raw", self.name, "imagesTr")
        folders = {}
        for label, channel in variants:
            folder = join(self.out, "inputs", label.replace(" ", "_"))
            if not isdir(folder):
                zero_series_copy(images, folder + ".tmp", self.split["val"], channel, self.file_ending)
                os.replace(folder + ".tmp", folder)
            folders[label] = folder
        return folders

    def summary(self, results_json: str) -> dict:
        a = self.args
        summary = earlier_summary(results_json, a.resume)
        if summary:
            summary["invocations"] = kept_invocations(summary)  # before the update overwrites machine and wall_s
        summary.update({"study": a.study, "dataset": self.name, "split": self.split, "fold": self.fold,
                        "steps": self.steps,
                        "batch": "from the plans", "preset": a.preset,
                        "finetunes_per_encoder": getattr(a, "finetunes_per_encoder", 1),
                        "finetune_lr": getattr(a, "finetune_lr", None), "environment": csm_environment(),
                        "machine": machine_description(a.threads, a.device)})
        summary.setdefault("arms", {})
        return summary

    def finish(self, summary: dict, results_json: str, md: str) -> None:
        summary["timings_s"] = merge_timings(summary.get("timings_s", {}), self.timings)
        summary["compute_s"], summary["untimed_runs"] = compute_total(summary["timings_s"])
        summary["wall_s"] = round(time.time() - self.t_start, 1)
        summary["wall_scope"] = "this label fraction in this invocation" if self.tag else "this invocation"
        summary["invocations"] = add_invocation(summary.get("invocations", []), invocation_record(
            self.args, self.t_start, [k for k in self.ran if k in self.timings], summary))
        write_text_atomically(results_json, json.dumps(summary, indent=1))
        write_text_atomically(join(self.out, md), markdown(summary))
        if summary["arms"]:
            scores, cols = summary_scores(summary)
            plot_scores(scores, cols, join(self.out, md[: -len(".md")] + ".png"),
                        f"{summary['dataset']}: {len(summary['split']['labelled'])} labelled, "
                        f"{len(summary['split']['val'])} held-out, {summary['steps']['finetune']} steps")


def prepare(args: argparse.Namespace) -> Context:
    """Data, plans, split and the pretraining runs the arms need (each step skipped when its output exists)."""
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    raw, pre = join(out, "raw"), join(out, "preprocessed")
    run = Runner(out, args.threads, args.device)
    t_start = time.time()
    arms = expand_seeds([a.strip() for a in args.arms.split(",") if a.strip()], getattr(args, "seeds", 1))
    unknown = [a for a in arms if arm_spec(a, args.study) is None]
    if unknown:
        raise ValueError(f"unknown {args.study} arm(s) {unknown}; choose from {sorted(STUDY_ARMS[args.study])} "
                         f"(append @2, @3, ... to repeat an arm as an independent run, ~N to give a pretrained arm its "
                         f"own N-step pretraining run)")

    # ---- data
    if args.dataset:
        src = os.path.abspath(args.dataset)
        name = os.path.basename(src)
        if not isdir(src) or not name.startswith("Dataset"):
            raise FileNotFoundError(f"--dataset {args.dataset!r} must be a raw nnU-Net dataset folder DatasetXXX_Name")
        dataset_id = int(name[7:10])
    else:
        dataset_id, name = 901, f"Dataset901_CSMExp{args.kind.capitalize()}"
    others = [d for d in (os.listdir(raw) if isdir(raw) else []) if d.startswith(f"Dataset{dataset_id:03d}_")
              and d != name]
    if others:
        raise ValueError(f"{raw} already holds {others[0]} with the same dataset id: use one --out folder per dataset")
    if not isdir(join(raw, name)):
        if args.dataset:
            shutil.copytree(src, join(raw, name))
        else:
            from csm_nnunet.synthetic import make_synthetic_dataset

            make_synthetic_dataset(join(raw, name), num_cases=args.cases, kind=args.kind, shape=(args.shape,) * 3,
                                   seed=args.data_seed)
    with open(join(raw, name, "dataset.json")) as f:
        ds = json.load(f)
    file_ending = ds["file_ending"]
    cases = sorted({f[: -len(file_ending)] for f in os.listdir(join(raw, name, "labelsTr"))
                    if f.endswith(file_ending)})

    # ---- plan + preprocess (once)
    timings: dict[str, float | None] = {}
    ran: list[str] = []
    if isfile(join(pre, name, f"{PLANS}.json")):
        reuse_timing(out, timings, "plan_and_preprocess")
    else:
        record_timing(out, timings, "plan_and_preprocess", ran=ran, seconds=run(
            ["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-pl", "CSMPlanner", "-fpe",
             "CSMFingerprintExtractor", "-c", CONFIG, "-np", run.preprocessing_processes, "-npfp",
             run.preprocessing_processes], join(out, "results", "_plan"),
            {"nnUNet_n_proc_DA": "1"}, "plan"))
    split = write_splits(join(pre, name), cases, args.val, args.labelled, args.split_seed,
                         tuple(getattr(args, "fractions", None) or ()), ds.get("classification_labels"))
    steps = {"pretrain": args.pretrain_epochs * args.iters, "finetune": args.epochs * args.iters}
    ctx = Context(args, out, run, name, dataset_id, ds, file_ending, split, steps, arms, {}, timings, t_start, ran)

    # ---- pretraining runs needed by the arms (fold 1: every non-held-out case)
    for arm in arms:
        trainer, pretrainer, preset = arm_spec(arm, args.study)
        if pretrainer is None:
            continue
        preset = preset or args.preset
        key = ctx.pretrained_key(arm, pretrainer, preset)
        if key in ctx.checkpoints:
            continue
        replicate, epochs = key[2], key[3]
        tag = f"{pretrainer}_{preset}" + (f"~{epochs * args.iters}" if epochs != args.pretrain_epochs else "") + (
            f"@{replicate}" if replicate > 1 else "")
        results = join(out, "results", f"pretrain_{tag}")
        ckpt = join(results, name, f"{pretrainer}__{PLANS}__{CONFIG}", "fold_1", "checkpoint_final.pth")
        if isfile(ckpt):
            reuse_timing(out, timings, f"pretrain {tag}")
        else:
            # replicate k >= 2 draws other masks (CSM_MASK_SEED); weights and batches differ anyway (nnU-Net is
            # not seeded)
            seed = {"CSM_MASK_SEED": str(12345 + 1000 * replicate)} if replicate > 1 else {}
            record_timing(out, timings, f"pretrain {tag}", ran=ctx.ran, seconds=run(
                ["nnUNetv2_train", str(dataset_id), CONFIG, "1", "-tr", pretrainer, "-p", PLANS, "-device",
                 args.device],
                results, {**ctx.length(epochs), "CSM_PRESET": preset, **seed}, f"pretrain_{tag}", epochs=epochs))
            write_text_atomically(join(os.path.dirname(ckpt), "csm_experiment_steps.json"),
                                  json.dumps({"steps": epochs * args.iters}))
        ctx.checkpoints[key] = ckpt
    return ctx


def run_segmentation(ctx: Context) -> dict:
    """Fine-tune the segmentation arms, predict the held-out cases with nnUNetv2_predict, Dice per label/region."""
    args, ds, name = ctx.args, ctx.ds, ctx.name
    kind = args.kind if not args.dataset else ("brain" if {"1", "2", "3"} <= {str(v) for v in ds["labels"].values()}
                                               and len(ds["labels"]) == 4 else "")
    regions = REGIONS.get(kind, {})
    labels_dir = join(ctx.out, "raw", name, "labelsTr")
    val_images = ctx.missing_inputs()
    stem = results_stem("seg", ctx.variant, ctx.tag)
    results_json = join(ctx.out, stem + ".json")
    summary = ctx.summary(results_json)
    summary["regions"] = {k: list(v) for k, v in regions.items()}
    summary["case_classes"] = held_out_classes(ds, ctx.split["val"])
    for arm in ctx.arms:
        trainer, pretrainer, preset = arm_spec(arm)
        preset = preset or args.preset
        results, arm_res = ctx.train_arm(arm, trainer, pretrainer, preset)
        run_name = ctx.run_name(arm)
        arm_res["dice"] = {}
        for label, folder in val_images.items():
            pred = join(ctx.out, "predictions", run_name, label.replace(" ", "_"))
            key = f"predict {run_name} {label}"
            if isdir(pred) and any(f.endswith(ctx.file_ending) for f in os.listdir(pred)):
                reuse_timing(ctx.out, ctx.timings, key)
            else:
                record_timing(ctx.out, ctx.timings, key, ran=ctx.ran, seconds=ctx.run(
                    ["nnUNetv2_predict", "-d", str(ctx.dataset_id), "-c", CONFIG, "-f", str(ctx.fold), "-tr", trainer,
                     "-p", PLANS, "-i", folder, "-o", pred, "--disable_tta", "-device", args.device, "-npp", "1",
                     "-nps", "1"],
                    results, {**ctx.length(args.epochs), "CSM_PRESET": preset}, f"predict_{run_name}"))
            arm_res["dice"][label], arm_res.setdefault("cases", {})[label] = region_dice(
                labels_dir, pred, ds["labels"], regions, ctx.file_ending)
        summary["arms"][arm] = arm_res
        write_text_atomically(results_json, json.dumps(summary, indent=1))
    ctx.finish(summary, results_json, stem + ".md")
    return summary


def run_classification(ctx: Context) -> dict:
    """Fine-tune the classification arms, classify the held-out cases with ``csm_nnunet classify`` (checkpoint_final,
    crops centred on the labelsTr ROI), AUC/accuracy/sensitivity/specificity against dataset.json's labels.

    Fold 0's validation cases are the held-out cases, so ``checkpoint_best`` (chosen by validation AUC) would be
    chosen on the test set; the runner therefore scores ``checkpoint_final`` only."""
    from csm_nnunet.class_labels import read_class_labels
    from csm_nnunet.classification import classification_metrics

    args = ctx.args
    truth, class_names = read_class_labels(ctx.ds, sorted(set(ctx.split["val"]) | set(ctx.split["pretraining"])))
    inputs = ctx.missing_inputs()
    stem = results_stem("cls", ctx.variant, ctx.tag)
    results_json = join(ctx.out, stem + ".json")
    summary = ctx.summary(results_json)
    for arm in ctx.arms:
        trainer, pretrainer, preset = arm_spec(arm, "cls")
        preset = preset or args.preset
        results, arm_res = ctx.train_arm(arm, trainer, pretrainer, preset)
        model = join(results, ctx.name, f"{trainer}__{PLANS}__{CONFIG}")
        run_name = ctx.run_name(arm)
        arm_res["metrics"] = {}
        for label, folder in inputs.items():
            csv_path = join(ctx.out, "predictions", run_name, label.replace(" ", "_") + ".csv")
            os.makedirs(os.path.dirname(csv_path), exist_ok=True)
            key = f"classify {run_name} {label}"
            if isfile(csv_path):
                reuse_timing(ctx.out, ctx.timings, key)
            else:
                record_timing(ctx.out, ctx.timings, key, ran=ctx.ran, seconds=ctx.run(
                    ["csm_nnunet", "classify", "-i", folder, "-o", csv_path, "-m", model, "-f", str(ctx.fold),
                     "--masks", join(ctx.out, "raw", ctx.name, "labelsTr"), "-device", args.device], results,
                    {"CSM_PRESET": preset}, f"classify_{run_name}"))
            cases, probs = _read_probabilities(csv_path, class_names)
            arm_res["metrics"][label] = classification_metrics([truth[c] for c in cases], probs, class_names)
        summary["arms"][arm] = arm_res
        write_text_atomically(results_json, json.dumps(summary, indent=1))
    summary["crop"] = getattr(args, "crop", None)
    ctx.finish(summary, results_json, stem + ".md")
    return summary


def _read_probabilities(csv_path: str, class_names: list[str]) -> tuple[list[str], np.ndarray]:
    import csv

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [r["case"] for r in rows], np.array([[float(r[f"p_{n}"]) for n in class_names] for r in rows])


def expand_seeds(arms: list[str], seeds: int) -> list[str]:
    """``--seeds N``: every arm named without ``@k`` runs N times (``csm``, ``csm@2``, ... ``csm@N``), seed-major so
    that a stopped run has complete seeds of every arm rather than all seeds of the first arms."""
    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: must be >= 1")
    if seeds == 1:
        return arms
    return [arm if k == 1 else f"{arm}@{k}" for k in range(1, seeds + 1) for arm in arms if "@" not in arm] + \
        [arm for arm in arms if "@" in arm]


def run_experiment(args: argparse.Namespace) -> dict:
    ctx = prepare(args)
    study = run_segmentation if args.study == "seg" else run_classification
    if not ctx.split.get("fractions"):
        return study(ctx)
    # one fine-tuning fold per label fraction, the same held-out cases and pretraining runs for all; a --resume starts
    # from the fractions earlier invocations finished and this one does not rerun, so the grid keeps every column
    grid = earlier_fractions(ctx)
    for pct, labelled in ctx.split["fractions"].items():
        sub = dataclasses.replace(ctx, split={**ctx.split, "labelled": labelled},
                                  fold=ctx.split["fraction_folds"][pct], tag=f"_f{pct}",
                                  timings={}, t_start=time.time())
        print(f"--- label fraction {pct} %: {len(labelled)} labelled cases (fold {sub.fold})", flush=True)
        grid[pct] = study(sub)
        summary = write_grid(ctx, grid)  # after every fraction, so a stopped run still has its grid table
    return summary


def earlier_fractions(ctx: Context) -> dict[str, dict]:
    """With ``--resume``: the per-fraction summaries (``results[_cls]<variant>_f<pct>.json``) of the fractions the
    grid of an earlier invocation showed and this one was not asked for, e.g. 10 and 50 % when ``--fractions 100``
    follows ``--fractions 10,50,100``. Without them the grid this invocation writes would hold 100 % alone.

    A fraction is kept only while its results still describe the folder's split: the same held-out cases and the
    same labelled cases as its fold of ``splits_final.json`` (a split seed or case count changed since rewrites the
    folds, and its runs then no longer belong to this grid) and the same pretraining and fine-tuning steps."""
    earlier = earlier_summary(join(ctx.out, grid_json_name(ctx.args.study, ctx.variant)), ctx.args.resume)
    with open(join(ctx.out, "preprocessed", ctx.name, "splits_final.json")) as f:
        folds = json.load(f)
    kept = {}
    for pct, entry in earlier.get("fractions", {}).items():
        path = join(ctx.out, results_stem(ctx.args.study, ctx.variant, f"_f{pct}") + ".json")
        if pct in ctx.split["fractions"] or not isfile(path):
            continue
        with open(path) as f:
            summary = json.load(f)
        fold, split = summary.get("fold"), summary.get("split", {})
        if (fold == entry.get("fold") and isinstance(fold, int) and 2 <= fold < len(folds)
                and summary.get("steps") == ctx.steps
                and split.get("val") == ctx.split["val"] == folds[fold]["val"]
                and split.get("labelled") == folds[fold]["train"]):
            kept[pct] = summary
    return kept


def variant_tag(args: argparse.Namespace) -> str:
    """Suffix of the folders, results files and timing keys of runs that differ from the default fine-tuning, so
    that they sit beside the default's in one work folder: ``_crop<edge>`` (cls, ``--crop``), then
    ``_lr<value>`` (``--finetune-lr``, e.g. ``_lr0.001``)."""
    crop = getattr(args, "crop", None) if args.study == "cls" else None
    lr = getattr(args, "finetune_lr", None)
    return (f"_crop{crop}" if crop else "") + (f"_lr{lr:g}" if lr else "")


def results_stem(study: str, variant: str = "", tag: str = "") -> str:
    """``results[_cls]<variant><tag>``: one study's results file name without .json/.md/.png, the one place that
    names it (the studies write it, ``run`` prints it)."""
    return f"results{'' if study == 'seg' else '_cls'}{variant}{tag}"


def grid_json_name(study: str, variant: str = "") -> str:
    return f"results_grid{variant}.json" if study == "seg" else f"results_grid_cls{variant}.json"


def write_grid(ctx: Context, grid: dict[str, dict]) -> dict:
    """The label-fraction x arm x seed summary (``results_grid[_cls].json/.md/.png``) from the per-fraction
    summaries; each fraction also keeps its own ``results[_cls]_f<pct>.json/.md/.png``."""
    first = next(iter(grid.values()))
    name = grid_json_name(ctx.args.study, ctx.variant)
    # a --resume keeps the arms of earlier invocations in the tables, so it keeps the planning and pretraining times
    # behind them too (this invocation may not have run them: an added scratch arm pretrains nothing)
    earlier = earlier_summary(join(ctx.out, name), ctx.args.resume)
    kept = earlier.get("timings_s", {})
    grid = dict(sorted(grid.items(), key=lambda item: float(item[0])))  # columns in label order, kept ones too
    split = {"val": ctx.split["val"], "pretraining": ctx.split["pretraining"],
             "fractions": {pct: s["split"]["labelled"] for pct, s in grid.items()}}
    summary = {"study": ctx.args.study, "dataset": ctx.name, "grid": True, "split": split, "steps": ctx.steps,
               "preset": ctx.args.preset, "seeds": getattr(ctx.args, "seeds", 1),
               "pretrain_per_repeat": bool(ctx.args.pretrain_per_repeat),
               "finetunes_per_encoder": getattr(ctx.args, "finetunes_per_encoder", 1), "machine": first["machine"],
               "finetune_lr": getattr(ctx.args, "finetune_lr", None), "environment": csm_environment(),
               "timings_s": merge_timings(kept, ctx.timings),
               "fractions": {pct: {"labelled": len(s["split"]["labelled"]), "fold": s["fold"], "arms": s["arms"],
                                   "wall_s": s.get("wall_s")} for pct, s in grid.items()}}
    if ctx.args.study == "seg":
        summary["regions"] = first.get("regions", {})
    # compute behind the grid: plan and pretraining (ctx) plus every fraction's fine-tuning and prediction runs
    everything = {**summary["timings_s"], **{f"{pct}: {k}": v for pct, s in grid.items()
                                              for k, v in s.get("timings_s", {}).items()}}
    summary["compute_s"], summary["untimed_runs"] = compute_total(everything)
    summary["wall_s"] = round(time.time() - ctx.t_start, 1)
    summary["invocations"] = add_invocation(kept_invocations(earlier), invocation_record(
        ctx.args, ctx.t_start, ctx.ran, summary))
    write_text_atomically(join(ctx.out, name), json.dumps(summary, indent=1))
    write_text_atomically(join(ctx.out, name[: -len(".json")] + ".md"), markdown_grid(summary))
    plot_grid(summary, join(ctx.out, name[: -len(".json")] + ".png"))
    return summary


def grid_columns(summary: dict) -> list[str]:
    """The metrics a grid reports: the label regions (else the labels) for ``seg``, AUC and accuracy for ``cls``."""
    if summary["study"] == "cls":
        return ["auc", "accuracy"]
    if summary.get("regions"):
        return list(summary["regions"])
    first = next(iter(next(iter(summary["fractions"].values()))["arms"].values()))
    return list(first["dice"]["complete"])


def grid_scores(summary: dict) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{metric: {arm: {fraction: [value of each seed]}}}`` on complete held-out cases (undefined values left
    out)."""
    cols = grid_columns(summary)
    out: dict[str, dict[str, dict[str, list[float]]]] = {c: {} for c in cols}
    for pct, f in summary["fractions"].items():
        scores, _ = summary_scores({"study": summary["study"], "arms": f["arms"]})
        for arm, runs in _group_repeats(scores).items():
            for c in cols:
                out[c].setdefault(arm, {})[pct] = _values(runs, c)
    return out


def grid_run_counts(summary: dict) -> dict[str, dict[str, int]]:
    """``{fraction: {arm: runs that finished}}`` (``csm``, ``csm@2`` ... count as runs of ``csm``)."""
    return {pct: {arm: len(runs) for arm, runs in _group_repeats(f["arms"]).items()}
            for pct, f in summary["fractions"].items()}


def run_count(n_runs: dict[str, dict[str, int]]) -> str:
    """"3 runs" or "1-3 runs": the runs behind each arm's cells, counted from the results rather than taken from
    ``--seeds``, since repeats can also be listed as ``arm@k`` or added later with ``--resume``."""
    counts = sorted({n for by_arm in n_runs.values() for n in by_arm.values()}) or [0]
    lo, hi = counts[0], counts[-1]
    return f"{lo} run{'s' if lo != 1 else ''}" if lo == hi else f"{lo}-{hi} runs"


def markdown_grid(summary: dict) -> str:
    """One table per metric: arms x label fractions, mean ± sample sd over seeds (n runs)."""
    fr = summary["fractions"]
    m = summary["machine"]
    metric = "Dice" if summary["study"] == "seg" else ""
    n_runs = grid_run_counts(summary)  # also flags cells where a seed gave no value
    lines = [f"Dataset {summary['dataset']}: {len(summary['split']['val'])} held-out cases; pretraining on the "
             f"{len(summary['split']['pretraining'])} others (images only, {summary['steps']['pretrain']} steps); "
             f"fine-tuning on a label fraction of them ({summary['steps']['finetune']} steps, preset "
             f"{summary['preset']}); {run_count(n_runs)} per arm"
             + ((", each with its own pretraining run" if summary.get("finetunes_per_encoder", 1) == 1 else
                 f", every {summary['finetunes_per_encoder']} consecutive seeds sharing one pretraining run")
                if summary["pretrain_per_repeat"] else "") + ". "
             "Mean ± sd over seeds (n runs when not every seed gave a value).", ""]
    head = " | ".join(f"{pct} % ({f['labelled']} cases)" for pct, f in fr.items())
    for col, arms in grid_scores(summary).items():
        lines += [f"**{metric + ' ' if metric else ''}{col}**", "", f"| arm | {head} |", "|---|" + "---|" * len(fr)]
        for arm, by_fraction in arms.items():
            cells = []
            for pct in fr:
                vals, n = by_fraction.get(pct, []), n_runs[pct].get(arm, 0)
                cells.append(_mean_sd(vals) + (f" ({len(vals)} of {n})" if vals and len(vals) != n else ""))
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"{machine_line(m)}; {wall_note(summary)}"]
    return "\n".join(lines) + "\n"


def plot_grid(summary: dict, png: str) -> None:
    """One panel per metric: the metric against the label fraction, a line per arm through the seed means, the
    sample sd as error bars and every seed as a dot. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from csm_nnunet.visualize import save_figure_atomically

    scores = grid_scores(summary)
    pcts = list(summary["fractions"])
    xs = np.array([float(p) for p in pcts])
    fig, axes = plt.subplots(1, len(scores), figsize=(3.6 * len(scores) + 1.5, 3.6), squeeze=False)
    for ax, (col, arms) in zip(axes[0], scores.items()):
        for i, (arm, by_fraction) in enumerate(arms.items()):
            jitter = xs * (1 + 0.02 * (i - (len(arms) - 1) / 2))  # keep overlapping arms apart on the log axis
            means = [np.mean(by_fraction.get(p) or [np.nan]) for p in pcts]
            sds = [np.std(by_fraction[p], ddof=1) if len(by_fraction.get(p, [])) > 1 else 0.0 for p in pcts]
            line = ax.errorbar(jitter, means, yerr=sds, marker="o", markersize=3, capsize=2, label=arm, lw=1)
            for x, p in zip(jitter, pcts):
                vals = by_fraction.get(p, [])
                ax.plot([x] * len(vals), vals, ".", color=line[0].get_color(), markersize=3, alpha=0.5)
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{p} %" for p in pcts])
        ax.minorticks_off()
        ax.set_ylim(0, 1)
        ax.set_title(col, fontsize=9)
        ax.set_xlabel("labelled fraction", fontsize=8)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.suptitle(f"{summary['dataset']}: {run_count(grid_run_counts(summary))} per arm, "
                 f"{summary['steps']['finetune']} fine-tuning steps", fontsize=9)
    fig.tight_layout()
    save_figure_atomically(fig, png, dpi=120)


def machine_description(threads: int, device: str = "cpu") -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    da = os.environ.get("nnUNet_n_proc_DA")
    if da is None:
        from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

        da = "0" if device == "cpu" else str(get_allowed_n_proc_DA())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads, "da_workers": int(da),
            "torch": torch.__version__, "python": platform.python_version(), "device": device,
            **({"gpu": torch.cuda.get_device_name(0)} if device == "cuda" and torch.cuda.is_available() else {})}


def machine_line(m: dict) -> str:
    """The footer line of a table: where it ran, so a number is never read without its machine."""
    workers = f", {m['da_workers']} augmentation workers" if m.get("da_workers") else ""
    gpu = f" ({m['gpu']})" if m.get("gpu") else ""
    return (f"Machine: {m.get('cpu')} ({m.get('cores')} cores, {m.get('torch_threads')} torch threads{workers}), "
            f"torch {m.get('torch')}, device {m.get('device')}{gpu}")


def markdown(summary: dict) -> str:
    arms = summary["arms"]
    if not arms:
        return "no arm finished\n"
    if summary.get("study") == "cls":
        return _markdown_cls(summary)
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
    scores = {arm: r["dice"]["complete"] for arm, r in arms.items()}
    lines += repeat_table(scores, cols)
    lines += class_table(summary, cols)
    lines += encoder_table(arms, scores, cols)
    lines += learning_table(arms)
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
    lines += ["", f"{machine_line(m)}; {wall_note(summary)}"]
    return "\n".join(lines) + "\n"


def _group_repeats(scores: dict[str, dict[str, float | None]]) -> dict[str, list[dict]]:
    """``{"csm": ..., "csm@2": ...}`` -> ``{"csm": [run 1, run 2]}`` (arm order kept)."""
    groups: dict[str, list[dict]] = {}
    for arm, d in scores.items():
        groups.setdefault(arm.partition("@")[0], []).append(d)  # "csm~400@2" -> "csm~400"
    return groups


def _values(runs: list[dict], col: str) -> list[float]:
    """The defined (not None/NaN) values of ``col`` over the runs of one arm."""
    return [float(r[col]) for r in runs if r.get(col) is not None and r[col] == r[col]]


def plot_scores(scores: dict[str, dict[str, float | None]], cols: list[str], png: str, title: str) -> None:
    """Grouped bars per metric: one bar per arm at its mean over repeats, the sample sd as an error bar, and every
    run as a dot, so a reader sees the spread and not only the mean. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from csm_nnunet.visualize import save_figure_atomically

    groups = _group_repeats(scores)
    width = 0.8 / max(1, len(groups))
    fig, ax = plt.subplots(figsize=(min(12.0, 3.0 + 0.25 * len(cols) * len(groups)), 4.2))
    for i, (arm, runs) in enumerate(groups.items()):
        xs = np.arange(len(cols)) + (i - (len(groups) - 1) / 2) * width
        means = [np.mean(_values(runs, c)) if _values(runs, c) else np.nan for c in cols]
        sds = [np.std(_values(runs, c), ddof=1) if len(_values(runs, c)) > 1 else 0.0 for c in cols]
        ax.bar(xs, means, width, yerr=sds, capsize=3, label=f"{arm} (n={len(runs)})", alpha=0.8)
        for x, c in zip(xs, cols):
            vals = _values(runs, c)
            ax.plot([x] * len(vals), vals, "k.", markersize=4)
    ax.set_xticks(np.arange(len(cols)), cols)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    fig.tight_layout()
    save_figure_atomically(fig, png, dpi=120)


def summary_scores(summary: dict) -> tuple[dict[str, dict[str, float | None]], list[str]]:
    """Per-arm held-out scores on complete cases and their column names: Dice per region (seg) or AUC, accuracy,
    sensitivity, specificity (cls)."""
    arms = summary["arms"]
    if summary.get("study") == "cls":
        keys = ["auc", "accuracy", "sensitivity", "specificity"]
        return {arm: {k: r["metrics"]["complete"][k] for k in keys} for arm, r in arms.items()}, keys
    scores = {arm: r["dice"]["complete"] for arm, r in arms.items()}
    return scores, list(next(iter(scores.values()))) if scores else []


def repeat_table(scores: dict[str, dict[str, float | None]], cols: list[str]) -> list[str]:
    """Markdown lines: mean ± sd (sample sd, n-1) per arm over its repeats ``arm``, ``arm@2``, ...; empty when no
    arm is repeated. A metric that is undefined in a run (None/NaN) is left out of that arm's mean and counted."""
    groups = _group_repeats(scores)
    if all(len(g) == 1 for g in groups.values()):
        return []
    lines = ["", "Mean ± sd over the repeats of each arm (n runs):", "",
             "| arm | n | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for arm, runs in groups.items():
        cells = []
        for c in cols:
            vals = _values(runs, c)
            cells.append(_mean_sd(vals) + (f" ({len(vals)})" if vals and len(vals) != len(runs) else ""))
        lines.append(f"| {arm} | {len(runs)} | " + " | ".join(cells) + " |")
    return lines


def class_table(summary: dict, cols: list[str]) -> list[str]:
    """Markdown lines: Dice on complete inputs split by the held-out cases' class (``summary["case_classes"]``), per
    arm (repeats pooled). A cell is the mean over that class's cases whose reference has the label, mean ± sd over
    the arm's runs, and, where some of those cases lack the label, how many of them (over all runs) got a false
    prediction of it. Why: the main table's mean follows nnU-Net (a false prediction on an empty reference scores
    0, a correct empty one is skipped), which mixes "finds the rim where there is one" with "draws one where there
    is none" and is hard to read when the cases without the label dominate. Empty without classes or per-case
    results (results written before per-case records were kept)."""
    classes = summary.get("case_classes") or {}
    per_case = {arm: r["cases"]["complete"] for arm, r in summary["arms"].items()
                if (r.get("cases") or {}).get("complete")}
    if not classes or len(per_case) != len(summary["arms"]):
        return []
    lines = ["", "By the held-out cases' class (dataset.json `classification_labels`), complete input: Dice over the "
             "cases whose reference has the label, mean ± sd over runs; \"false in k/m\": of m case-runs whose "
             "reference lacks the label, k predicted some of it:", "",
             "| arm | n | class (cases) | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for arm, runs in _group_repeats(per_case).items():
        for cls in sorted(set(classes.values())):
            cases = [c for c, k in classes.items() if k == cls]
            cells = []
            for col in cols:
                means, empty, false = [], 0, 0
                for run in runs:
                    recs = [run[c][col] for c in cases if c in run]
                    found = [r["dice"] for r in recs if r["n_ref"] > 0 and r["dice"] is not None]
                    if found:
                        means.append(float(np.mean(found)))
                    empty += sum(r["n_ref"] == 0 for r in recs)
                    false += sum(r["n_ref"] == 0 and r["n_pred"] > 0 for r in recs)
                parts = ([_mean_sd(means)] if means else []) + ([f"false in {false}/{empty}"] if empty else [])
                cells.append("; ".join(parts) or "n/a")
            lines.append(f"| {arm} | {len(runs)} | {cls} ({len(cases)}) | " + " | ".join(cells) + " |")
    return lines


def encoder_table(arms: dict[str, dict], scores: dict[str, dict[str, float | None]], cols: list[str]) -> list[str]:
    """Markdown lines for pretrained arms whose repeats share pretraining runs (``--finetunes-per-encoder``): mean ±
    sd over each encoder's fine-tunings, then the sd of the encoder means ("between") and the pooled sd of the
    fine-tunings around their own encoder's mean ("within"). Why: at few labels one arm's spread mixes the two, and
    only the between-encoder part says how much one pretraining run can be trusted. Empty unless some arm has >= 2
    encoders and some encoder >= 2 fine-tunings."""
    groups: dict[str, dict[str, list[dict]]] = {}
    for arm, r in arms.items():
        if r.get("pretrained_checkpoint"):
            groups.setdefault(arm.partition("@")[0], {}).setdefault(r["pretrained_checkpoint"], []).append(scores[arm])
    nested = {a: e for a, e in groups.items() if len(e) > 1 and any(len(runs) > 1 for runs in e.values())}
    if not nested:
        return []
    lines = ["", "Pretrained arms by encoder (pretraining run), mean ± sd over its fine-tunings; between: sd of the "
             "encoder means; within: pooled sd of the fine-tunings around their encoder's mean:", "",
             "| arm | encoder | n | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for arm, encoders in nested.items():
        for ckpt, runs in encoders.items():
            parts = ckpt.replace(os.sep, "/").split("/")
            label = parts[1] if len(parts) > 1 and parts[0] == "results" else ckpt
            lines.append(f"| {arm} | {label} | {len(runs)} | "
                         + " | ".join(_mean_sd(_values(runs, c)) for c in cols) + " |")
        between, within = [], []
        for c in cols:
            per_encoder = [v for v in (_values(runs, c) for runs in encoders.values()) if v]
            means = [float(np.mean(v)) for v in per_encoder]
            between.append(f"{np.std(means, ddof=1):.3f}" if len(means) > 1 else "n/a")
            dof = sum(len(v) - 1 for v in per_encoder)
            ss = sum(float(np.sum((np.array(v) - np.mean(v)) ** 2)) for v in per_encoder)
            within.append(f"{np.sqrt(ss / dof):.3f}" if dof else "n/a")
        lines += [f"| {arm} | between | {len(encoders)} | " + " | ".join(between) + " |",
                  f"| {arm} | within | {sum(len(runs) for runs in encoders.values())} | " + " | ".join(within) + " |"]
    return lines


def learning_table(arms: dict[str, dict]) -> list[str]:
    """Markdown lines: per arm (repeats pooled) and label, how many runs learned the label (pseudo Dice reached
    ``LEARNED_AT`` in some epoch) and the epoch by which half of the runs had (``>E`` when fewer than half did in
    their E epochs). That "half-way epoch" stays defined when some runs never learn a label, where a mean of first
    epochs would not. Empty when no arm has a training curve."""
    curves = {arm: r["training"] for arm, r in arms.items() if r.get("training")}
    if not curves:
        return []
    labels = next(iter(curves.values()))["labels"]
    lines = ["", f"When each label was first learned (pseudo Dice >= {LEARNED_AT} in an epoch's validation): runs that "
             "learned it / runs, and the epoch by which half of the runs had:", "",
             "| arm | n | epochs | " + " | ".join(labels) + " |", "|---|---|---|" + "---|" * len(labels)]
    for arm, runs in _group_repeats(curves).items():
        epochs = sorted({len(c["pseudo_dice"]) for c in runs})
        cells = []
        for label in labels:
            firsts = [first_learned_epoch(c, label) for c in runs]
            learned = sorted(f for f in firsts if f is not None)
            half = -(-len(runs) // 2)  # runs that make "half"
            when = str(learned[half - 1]) if len(learned) >= half else f">{min(epochs)}"
            cells.append(f"{len(learned)}/{len(runs)}, {when}")
        lines.append(f"| {arm} | {len(runs)} | {'/'.join(map(str, epochs))} | " + " | ".join(cells) + " |")
    return lines


def _mean_sd(vals: list[float]) -> str:
    """A table cell: ``mean ± sample sd``, the value itself for one run, ``n/a`` for none."""
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f}"


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _markdown_cls(summary: dict) -> str:
    arms = summary["arms"]
    n = len(summary["split"]["val"])
    lines = [f"Dataset {summary['dataset']}: {len(summary['split']['labelled'])} labelled training cases, {n} held-out "
             f"cases, {summary['steps']['finetune']} fine-tuning steps per arm; held-out cases classified by "
             f"`csm_nnunet classify` (checkpoint_final, crop centred on the labelsTr ROI).", "",
             "| arm | trainer | pretrained (steps) | AUC | accuracy | sensitivity | specificity |",
             "|---|---|---|---|---|---|---|"]
    for arm, r in arms.items():
        m = r["metrics"]["complete"]
        pre = "-" if not r["pretrained"] else f"{r['pretrained']} ({r.get('pretrain_steps') or '?'})"
        lines.append(f"| {arm} | {r['trainer']} | {pre} | {_fmt(m['auc'])} | {_fmt(m['accuracy'])} | "
                     f"{_fmt(m['sensitivity'])} | {_fmt(m['specificity'])} |")
    keys = ["auc", "accuracy", "sensitivity", "specificity"]
    cls_scores = {arm: {k: r["metrics"]["complete"][k] for k in keys} for arm, r in arms.items()}
    lines += repeat_table(cls_scores, keys)
    lines += encoder_table(arms, cls_scores, keys)
    missing = [k for k in next(iter(arms.values()))["metrics"] if k != "complete"]
    if missing:
        lines += ["", "Missing series at inference (AUC; the series replaced by an all-zero image):", "",
                  "| arm | complete | " + " | ".join(missing) + " |", "|---|---|" + "---|" * len(missing)]
        for arm, r in arms.items():
            if all(k in r["metrics"] for k in missing):
                lines.append(f"| {arm} | {_fmt(r['metrics']['complete']['auc'])} | "
                             + " | ".join(_fmt(r["metrics"][k]["auc"]) for k in missing) + " |")
    m = summary.get("machine", {})
    lines += ["", f"{machine_line(m)}; {wall_note(summary)}"]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", choices=["seg", "cls"],
                        help="seg: segmentation Dice and missing-series robustness; cls: classification AUC")
    parser.add_argument("--out", required=True, help="work folder (nnU-Net raw/preprocessed/results live inside); "
                                                     "one per dataset")
    parser.add_argument("--arms", default=None,
                        help=f"comma-separated arms; seg: {', '.join(ARMS)} (default nnunet,fused,scratch,csm); "
                             f"cls: {', '.join(CLS_ARMS)} (default scratch,csm,fused,mae); append @k for the k-th "
                             f"independent run, ~N for a pretrained arm with its own N-step pretraining run")
    parser.add_argument("--dataset", help="a raw nnU-Net dataset folder to use instead of synthetic data")
    parser.add_argument("--kind", default=None, choices=sorted(REGIONS),
                        help="synthetic data kind (default: brain for seg, prostate for cls)")
    parser.add_argument("--cases", type=int, default=None, help="synthetic cases (default 24 for seg, 48 for cls)")
    parser.add_argument("--shape", type=int, default=48, help="synthetic image edge in voxels (default 48)")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--val", type=int, default=None, help="held-out cases (default 8 for seg, 16 for cls)")
    parser.add_argument("--labelled", type=int, default=None,
                        help="labelled fine-tuning cases (default 8 for seg, 16 for cls)")
    parser.add_argument("--preset", default="small8", help="ViT preset of the CSM arms (default small8)")
    parser.add_argument("--epochs", type=int, default=15, help="fine-tuning epochs (default 15)")
    parser.add_argument("--pretrain-epochs", type=int, default=50, help="pretraining epochs (default 50)")
    parser.add_argument("--iters", type=int, default=20, help="iterations per epoch (default 20)")
    parser.add_argument("--missing", action="store_true", help="also predict with each single series missing")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2)), help="torch threads")
    parser.add_argument("--resume", action="store_true", help="keep arms already in results.json")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device for every nnU-Net step")
    parser.add_argument("--crop", type=int, default=None,
                        help="cls: edge of the ROI-centred classifier crop (CSM_CROP; default the plans' patch size)")
    parser.add_argument("--finetune-lr", type=_learning_rate, default=None, metavar="LR",
                        help="peak learning rate of the fine-tuning runs only (CSM_LR for them; pretraining keeps its "
                             "own); default the trainers' (5e-3, paper IV.A). Its runs get their own folders and "
                             "results files (suffix _lr<LR>), so a sweep shares one work folder and its pretraining")
    parser.add_argument("--fractions", type=_percentages, default=None,
                        help="label fractions in percent of the non-held-out cases, e.g. 10,50,100: one fine-tuning "
                             "fold per fraction (nested subsets) and a grid table results_grid[_cls].md")
    parser.add_argument("--seeds", type=int, default=None,
                        help="independent runs of every arm (csm, csm@2, ...), each with its own pretraining run "
                             "(implies --pretrain-per-repeat when > 1)")
    parser.add_argument("--grid", action="store_true",
                        help="the paper's grid: every pretraining row (csm, its four ablations, mae) plus scratch, "
                             "fused (and nnunet for seg) x --fractions 10,50,100 x --seeds 3, unless given")
    parser.add_argument("--pretrain-per-repeat", action="store_true",
                        help="repeat k of a pretrained arm (csm@k) loads its own pretraining run k (other masks, "
                             "weights, batches) instead of the shared run 1")
    parser.add_argument("--finetunes-per-encoder", type=_at_least_one, default=1, metavar="M",
                        help="M consecutive repeats of a pretrained arm fine-tune the same pretraining run "
                             "(csm..csm@M run 1, csm@M+1..csm@2M run 2, ...; e.g. --seeds 12 --finetunes-per-encoder "
                             "4: 3 encoders x 4 fine-tunings), and results*.md split each pretrained arm's spread into "
                             "between-encoder and within-encoder parts (implies --pretrain-per-repeat when > 1; "
                             "default 1)")


STUDY_DEFAULTS = {"seg": {"arms": "nnunet,fused,scratch,csm", "kind": "brain", "cases": 24, "val": 8, "labelled": 8},
                  "cls": {"arms": "scratch,csm,fused,mae", "kind": "prostate", "cases": 48, "val": 16,
                          "labelled": 16}}


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1")
    return int(text)


def _learning_rate(text: str) -> float:
    """``--finetune-lr`` reaches the trainers as ``CSM_LR``, so it is checked by the parser they use for it."""
    from csm_nnunet.overrides import read_env_overrides

    try:
        return read_env_overrides({"CSM_LR": text})["initial_lr"]
    except (ValueError, KeyError):  # KeyError: an empty value, which the environment reader treats as unset
        raise argparse.ArgumentTypeError(f"{text!r}: expected a learning rate in (0, 1), e.g. 1e-3") from None


def _percentages(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected whole percentages separated by commas, e.g. 10,50,100") from None
    if not values or any(not 0 < v <= 100 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected distinct percentages in 1..100, e.g. 10,50,100")
    return sorted(values)


def apply_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill what the command line left open: ``--grid``'s arms, fractions and seeds, then the study's defaults.
    ``--seeds`` > 1 gives every seed its own pretraining run (``--pretrain-per-repeat``)."""
    if getattr(args, "grid", False):
        args.arms = args.arms or GRID_ARMS[args.study]
        args.fractions = args.fractions or [10, 50, 100]
        args.seeds = args.seeds or 3
    args.seeds = args.seeds or 1
    if args.seeds > 1:
        args.pretrain_per_repeat = True
    if getattr(args, "finetunes_per_encoder", 1) > 1:
        args.pretrain_per_repeat = True
    for key, value in STUDY_DEFAULTS[args.study].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def run(args: argparse.Namespace) -> int:
    apply_defaults(args)
    try:
        summary = run_experiment(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"csm_nnunet experiment: error: {e}", file=sys.stderr)
        return 1
    variant = variant_tag(args)
    if summary.get("grid"):
        print(markdown_grid(summary))
        print(f"results: {join(os.path.abspath(args.out), grid_json_name(args.study, variant))}")
        return 0
    print(markdown(summary))
    name = results_stem(args.study, variant) + ".json"
    print(f"results: {join(os.path.abspath(args.out), name)}")
    return 0
