#!/usr/bin/env python
"""CPU benchmark of CSM pretraining: what the method's efficiency claims cost on real hardware.

Three measurements, one JSON (see ``docs/benchmarks.md``):

a. ``sparse-dense``   one optimiser step of :class:`~csm_nnunet.network.CSMMaskedAutoencoder` (B16, 4 series, 96^3,
                      token 16, mask ratio 0.875, batch 2) with the encoder on visible tokens only (the method) and on
                      every token with mask tokens inside the encoder (the same network, ``sparse_encoder=False``).
b. ``trainer-steps``  ``CSMPretrainer.train_step`` vs ``nnUNetTrainer.train_step`` on the same synthetic 4-series
                      dataset and 3d_fullres plan, plus the cost of producing one batch with nnU-Net's loader.
c. ``pretrain-run``   peak RSS and wall time of a short ``nnUNetv2_train ... -tr CSMPretrainer -device cpu`` run.
d. ``monai``          (only with ``--only monai``; needs ``pip install monai``, a benchmark-only dependency) our
                      optimiser step against MONAI's ``MaskedAutoEncoderViT``, what users would otherwise pick: the
                      same encoder width/depth/heads (ViT-B/16) and decoder (384 wide, 4 deep), 4 series fused into
                      one token per patch (4x fewer tokens than ours), 96^3, batch 2, mask ratio 0.875.

Usage::

    python benchmarks/bench_pretrain.py [--quick] [--out benchmarks/results/cpu.json]

Nothing here is imported by the package or the tests: it is a stand-alone script, and no measured number is written
into code (the docs quote the JSON it produces).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import importlib.metadata
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SERIES = ("T1", "T1ce", "T2", "FLAIR")
PATCH = (96, 96, 96)
BATCH = 2
MASK_RATIO = 0.875
PRESET = "B16"
THREADS = 2
DATASET_NAME = "CSMBench"
SECTIONS = ("sparse-dense", "trainer-steps", "pretrain-run")
OPTIONAL_SECTIONS = ("monai",)  # need an extra package; run with --only
# Targets the package promises (docs/benchmarks.md); only used to print pass/fail next to the measurement.
TARGETS = {"dense_over_sparse_min": 4.0, "csm_over_nnunet_max": 0.5, "peak_rss_gb_max": 6.0, "csm_over_monai_max": 2.0}
# Section c: 1 epoch of 3 iterations and 1 validation batch reaches everything that holds memory in a long run
# (activations, gradients, AdamW state, loader, checkpoint save) in about a minute.
PRETRAIN_RUN_ENV = {"CSM_NUM_EPOCHS": "1", "CSM_ITERS_PER_EPOCH": "3", "CSM_VAL_ITERS": "1"}


@dataclass(frozen=True)
class Repeats:
    """Warm-up and timed repetitions per section; ``--quick`` lowers them but never changes a shape. The nnU-Net
    U-Net step is by far the slowest thing measured on a CPU (tens of seconds), so it gets the fewest repeats."""

    sd_warmup: int
    sd_timed: int
    nnunet_warmup: int
    nnunet_timed: int
    csm_warmup: int
    csm_timed: int


FULL = Repeats(sd_warmup=1, sd_timed=5, nnunet_warmup=1, nnunet_timed=3, csm_warmup=1, csm_timed=5)
QUICK = Repeats(sd_warmup=1, sd_timed=2, nnunet_warmup=0, nnunet_timed=1, csm_warmup=1, csm_timed=2)
# A small parallel op costs ~0.01-0.02 ms on idle cores; far more means an OpenMP thread is waiting for a core that
# another process holds, and every small op of a step pays that (see docs/benchmarks.md).
CONTENDED_OP_MS = 0.5
# Share of the machine's CPU time used by *other* processes during a section above which timings are not trusted.
CONTENDED_OTHERS_SHARE = 0.1


# ------------------------------------------------------------------------------------------------ small helpers
def log(msg: str) -> None:
    """Progress on stderr so stdout carries only the final markdown table."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> list[float] | None:
    """1/5/15-minute load average: other processes on a 2-core box inflate every timing, so it is recorded."""
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def small_op_ms(bursts: int = 5, ops: int = 50) -> float:
    """Median per-op time of a small multi-threaded add (the size of a sparse-encoder activation). Load average
    says somebody else is busy; this says whether it costs *us*: with a core taken, every OpenMP parallel region
    waits for a time slice, and a ViT step is hundreds of such regions."""
    x = torch.randn(2, 54, 768)
    per_op = []
    for _ in range(bursts):
        t0 = time.perf_counter()
        for _ in range(ops):
            x.add(x)
        per_op.append((time.perf_counter() - t0) / ops * 1e3)
    return median(per_op)


@dataclass
class CpuSnapshot:
    """System-wide busy CPU seconds (/proc/stat) and this process's own (including waited-for children)."""

    system_busy_s: float
    own_s: float
    wall: float

    @classmethod
    def take(cls) -> CpuSnapshot:
        busy = float("nan")
        with contextlib.suppress(OSError, ValueError, IndexError):
            # cpu  user nice system idle iowait irq softirq steal ...: everything but idle and iowait is busy
            vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
            busy = (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")
        t = os.times()
        return cls(busy, t.user + t.system + t.children_user + t.children_system, time.perf_counter())

    def others_share(self, later: CpuSnapshot) -> float:
        """Fraction of all cores' time that other processes used between the two snapshots: the direct measure of
        how much of the 2-core box this benchmark did not have."""
        wall = later.wall - self.wall
        others = (later.system_busy_s - self.system_busy_s) - (later.own_s - self.own_s)
        return max(0.0, others) / (wall * (os.cpu_count() or 1)) if wall > 0 else float("nan")


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def summary(values: list[float]) -> dict[str, Any]:
    """Median is the headline (robust to one preempted repeat); min/max show the spread, raw values stay in."""
    return {"median": median(values), "min": min(values, default=float("nan")),
            "max": max(values, default=float("nan")), "values": [round(v, 4) for v in values]}


def git_info() -> dict[str, Any]:
    """Commit (None before the first commit) and whether the tree differs from it, so results are traceable."""
    def run(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    status = run("status", "--porcelain")
    return {"commit": run("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def machine_info() -> dict[str, Any]:
    """Enough to tell whether two JSON files are comparable (CPU, cores, threads, library versions, date)."""
    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) * 1024 / 1e9, 1)

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "cpu_model": cpu_model or platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": mem_gb,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "nnunetv2": version("nnunetv2"),
        "csm_nnunet": version("csm-nnunet"),
        "dynamic_network_architectures": version("dynamic-network-architectures"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git_info(),
    }


class Stopwatch:
    """Wall and process CPU time of a block. CPU/wall near the thread count means the cores were ours; much lower
    means another process was competing (OpenMP's spinning threads then lose time), which the JSON makes visible."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> Stopwatch:
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._w
        self.cpu = time.process_time() - self._c


def seed_everything(seed: int) -> None:
    """nnU-Net's loader draws from numpy/random, the networks from torch: seed all so runs pick the same crops."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------ a. sparse vs dense
def bench_sparse_dense(rep: Repeats) -> dict[str, Any]:
    """Interleave sparse and dense steps (alternating which goes first) on identical weights, input and masks, so
    drift in machine load hits both equally. The step mirrors ``CSMPretrainer.train_step`` on CPU: zero_grad,
    forward (masking excluded: drawn before the clock starts), backward, grad-norm clip 1.0, AdamW step."""
    from csm_nnunet.masking import CrossSeriesMasker
    from csm_nnunet.network import CSMMaskedAutoencoder
    from csm_nnunet.optim import adamw

    seed_everything(0)
    nets = {"sparse": CSMMaskedAutoencoder(SERIES, PATCH, PRESET, sparse_encoder=True)}
    nets["dense"] = CSMMaskedAutoencoder(SERIES, PATCH, PRESET, sparse_encoder=False)
    nets["dense"].load_state_dict(nets["sparse"].state_dict())
    # the optimizer factory CSMPretrainer uses (fused AdamW where torch has it), so the step mirrors training
    opts = {k: adamw([{"params": list(n.parameters()), "weight_decay": 0.05}], lr=1e-3, betas=(0.9, 0.95))
            for k, n in nets.items()}
    for n in nets.values():
        n.train()
    x = torch.randn(BATCH, len(SERIES), *PATCH, generator=torch.Generator().manual_seed(1))
    masker = CrossSeriesMasker(MASK_RATIO)
    gen = torch.Generator().manual_seed(2)
    N = nets["sparse"].num_patches
    rec: dict[str, dict[str, list[float]]] = {k: {"step": [], "cpu": [], "forward": [], "backward": [],
                                                  "optimizer": [], "enc_tokens": [], "enc_valid": []} for k in nets}
    total = rep.sd_warmup + rep.sd_timed
    for i in range(total):
        mask = masker(BATCH, len(SERIES), N, generator=gen)
        order = ("sparse", "dense") if i % 2 == 0 else ("dense", "sparse")
        for k in order:
            net, opt = nets[k], opts[k]
            with Stopwatch() as step:
                opt.zero_grad(set_to_none=True)
                with Stopwatch() as fwd:
                    out = net(x, mask)
                with Stopwatch() as bwd:
                    out.loss.backward()
                with Stopwatch() as upd:
                    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                    opt.step()
            timed = i >= rep.sd_warmup
            log(f"sparse-dense {'timed' if timed else 'warm-up'} {i + 1}/{total} {k}: {step.wall:.2f} s "
                f"(fwd {fwd.wall:.2f} bwd {bwd.wall:.2f} opt {upd.wall:.2f}; cpu/wall {step.cpu / step.wall:.2f}) "
                f"visible {out.num_visible.tolist()}")
            if timed:
                r = rec[k]
                r["step"].append(step.wall)
                r["cpu"].append(step.cpu)
                r["forward"].append(fwd.wall)
                r["backward"].append(bwd.wall)
                r["optimizer"].append(upd.wall)
                r["enc_valid"].append(float(out.num_visible.float().mean()))
                # the encoder runs on a [B, L] tensor, L = most visible tokens of any case (others padded)
                r["enc_tokens"].append(float(BATCH * int(out.num_visible.max())))
    result: dict[str, Any] = {
        "config": {"series": list(SERIES), "patch_size": list(PATCH), "batch_size": BATCH, "preset": PRESET,
                   "token_size": nets["sparse"].token_size, "mask_ratio": MASK_RATIO,
                   "tokens_per_case": len(SERIES) * N, "decoder_tokens_per_batch": BATCH * len(SERIES) * N,
                   "parameters_M": round(sum(p.numel() for p in nets["sparse"].parameters()) / 1e6, 2),
                   "warmup": rep.sd_warmup, "timed": rep.sd_timed,
                   "step": "zero_grad + forward + backward + clip_grad_norm(1.0) + AdamW.step (fused where available); "
                           "mask drawn outside"},
    }
    for k, r in rec.items():
        result[k] = {"step_s": summary(r["step"]), "forward_s": median(r["forward"]),
                     "backward_s": median(r["backward"]), "optimizer_s": median(r["optimizer"]),
                     "cpu_over_wall": median([c / w for c, w in zip(r["cpu"], r["step"], strict=True)]),
                     "encoder_tokens_per_batch": median(r["enc_tokens"]),
                     "encoder_valid_tokens_per_case": statistics.fmean(r["enc_valid"])}
    result["dense_over_sparse"] = result["dense"]["step_s"]["median"] / result["sparse"]["step_s"]["median"]
    result["dense_over_sparse_best"] = result["dense"]["step_s"]["min"] / result["sparse"]["step_s"]["min"]
    # the same ratio without the optimiser phase, whose cost does not depend on the encoder's token count
    result["dense_over_sparse_forward_backward"] = (
        median([f + b for f, b in zip(rec["dense"]["forward"], rec["dense"]["backward"], strict=True)])
        / median([f + b for f, b in zip(rec["sparse"]["forward"], rec["sparse"]["backward"], strict=True)]))
    del nets, opts
    gc.collect()
    return result


# ------------------------------------------------------------------------------------------------ d. vs MONAI's MAE
def monai_patches(x: torch.Tensor, token: int) -> torch.Tensor:
    """``[B, C, X, Y, Z] -> [B, N, C * token^3]`` in the order of MONAI's convolutional patch embedding (grid
    positions x-major, as ``Conv3d(...).flatten(2)``), the target its decoder predicts."""
    B, C, X, Y, Z = x.shape
    gx, gy, gz = X // token, Y // token, Z // token
    x = x.reshape(B, C, gx, token, gy, token, gz, token).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(B, gx * gy * gz, C * token ** 3)


def bench_monai(rep: Repeats) -> dict[str, Any]:
    """Interleave our step (the ``sparse`` network of section a) and a MONAI ``MaskedAutoEncoderViT`` step with the
    same encoder and decoder sizes; both: zero_grad, forward, MSE on the masked patches, backward, clip 1.0, AdamW.
    MONAI masks inside its forward (a random shuffle, cheap); ours is drawn outside the clock, as in section a."""
    try:
        from monai.networks.nets import MaskedAutoEncoderViT
    except ImportError as e:
        raise SystemExit(f"section monai needs MONAI, a benchmark-only dependency: pip install monai ({e})") from e
    import monai

    from csm_nnunet.masking import CrossSeriesMasker
    from csm_nnunet.network import CSMMaskedAutoencoder, get_preset
    from csm_nnunet.optim import adamw

    p = get_preset(PRESET)
    seed_everything(0)
    ours = CSMMaskedAutoencoder(SERIES, PATCH, PRESET, sparse_encoder=True)
    theirs = MaskedAutoEncoderViT(
        in_channels=len(SERIES), img_size=PATCH, patch_size=p.token_size, hidden_size=p.embed_dim,
        mlp_dim=4 * p.embed_dim, num_layers=p.depth, num_heads=p.num_heads, masking_ratio=MASK_RATIO,
        decoder_hidden_size=p.decoder_dim, decoder_mlp_dim=4 * p.decoder_dim, decoder_num_layers=p.decoder_depth,
        decoder_num_heads=p.decoder_heads, qkv_bias=True, spatial_dims=3)
    nets = {"csm": ours, "monai": theirs}
    opts = {k: adamw([{"params": list(n.parameters()), "weight_decay": 0.05}], lr=1e-3, betas=(0.9, 0.95))
            for k, n in nets.items()}
    for n in nets.values():
        n.train()
    x = torch.randn(BATCH, len(SERIES), *PATCH, generator=torch.Generator().manual_seed(1))
    target = monai_patches(x, p.token_size)
    masker = CrossSeriesMasker(MASK_RATIO)
    gen = torch.Generator().manual_seed(2)

    def monai_loss() -> torch.Tensor:
        pred, mask = theirs(x)  # mask [B, N]: 1 = hidden
        per_patch = ((pred - target) ** 2).mean(-1)
        return (per_patch * mask).sum() / mask.sum()

    steps: dict[str, list[float]] = {k: [] for k in nets}
    total = rep.sd_warmup + rep.sd_timed
    for i in range(total):
        mask = masker(BATCH, len(SERIES), ours.num_patches, generator=gen)
        for k in (("csm", "monai") if i % 2 == 0 else ("monai", "csm")):
            net, opt = nets[k], opts[k]
            with Stopwatch() as step:
                opt.zero_grad(set_to_none=True)
                loss = ours(x, mask).loss if k == "csm" else monai_loss()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                opt.step()
            timed = i >= rep.sd_warmup
            log(f"monai {'timed' if timed else 'warm-up'} {i + 1}/{total} {k}: {step.wall:.2f} s "
                f"(cpu/wall {step.cpu / step.wall:.2f}, loss {loss.item():.3f})")
            if timed:
                steps[k].append(step.wall)
    n_tok = ours.num_patches
    result: dict[str, Any] = {
        "config": {"series": list(SERIES), "patch_size": list(PATCH), "batch_size": BATCH, "preset": PRESET,
                   "mask_ratio": MASK_RATIO, "monai_version": monai.__version__,
                   "tokens_per_case": {"csm": len(SERIES) * n_tok, "monai": n_tok},
                   "parameters_M": {k: round(sum(q.numel() for q in n.parameters()) / 1e6, 2)
                                    for k, n in nets.items()},
                   "monai_args": "hidden 768, mlp 3072, 12 layers, 12 heads, decoder 384 / mlp 1536 / 4 layers / "
                                 "12 heads, qkv_bias, conv patch embedding, sincos positions",
                   "warmup": rep.sd_warmup, "timed": rep.sd_timed},
        "csm": {"step_s": summary(steps["csm"])}, "monai": {"step_s": summary(steps["monai"])},
    }
    result["csm_over_monai"] = result["csm"]["step_s"]["median"] / result["monai"]["step_s"]["median"]
    del nets, opts
    gc.collect()
    return result


# ------------------------------------------------------------------------------------------------ synthetic dataset
def write_synthetic_dataset(raw_root: Path, dataset_id: int, num_cases: int, shape: tuple[int, int, int]) -> Path:
    """Tiny 4-series dataset: per-series contrasts of the same smooth anatomy plus noise, and 1-3 spherical lesions
    (label 1) that differ in brightness per series. Images are 1 mm isotropic and exactly the target patch size, so
    nnU-Net's 3d_fullres planner (patch capped by the median shape) picks that patch; no voxel is zero, so nonzero
    cropping keeps the full volume."""
    import SimpleITK as sitk

    folder = raw_root / f"Dataset{dataset_id:03d}_{DATASET_NAME}"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    # (tissue weight, lesion contrast) per series: every series sees the lesion differently
    contrasts = [(1.0, 0.6), (0.8, 1.5), (-0.7, 1.2), (0.5, 0.9)]
    for case in range(num_cases):
        c = rng.uniform(-0.2, 0.2, size=3).astype(np.float32)
        tissue = np.exp(-((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) / 0.4)
        seg = np.zeros(shape, dtype=np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            center = rng.uniform(-0.5, 0.5, size=3)
            radius = rng.uniform(0.08, 0.2)
            seg[(zz - center[0]) ** 2 + (yy - center[1]) ** 2 + (xx - center[2]) ** 2 < radius ** 2] = 1
        assert seg.any(), "lesion must be non-empty"
        for ch, (w_tissue, w_lesion) in enumerate(contrasts):
            img = 2.0 + w_tissue * tissue + w_lesion * seg + 0.1 * rng.standard_normal(shape).astype(np.float32)
            out = sitk.GetImageFromArray(img.astype(np.float32))
            out.SetSpacing((1.0, 1.0, 1.0))
            sitk.WriteImage(out, str(folder / "imagesTr" / f"case_{case:03d}_{ch:04d}.nii.gz"), True)
        lab = sitk.GetImageFromArray(seg)
        lab.SetSpacing((1.0, 1.0, 1.0))
        sitk.WriteImage(lab, str(folder / "labelsTr" / f"case_{case:03d}.nii.gz"), True)
    dataset_json = {"channel_names": {str(i): s for i, s in enumerate(SERIES)},
                    "labels": {"background": 0, "lesion": 1}, "numTraining": num_cases, "file_ending": ".nii.gz",
                    "name": DATASET_NAME, "description": "synthetic csm-nnunet benchmark data (noise + blobs)"}
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return folder


def nnunet_env(work: Path, results: Path, n_proc_da: int) -> dict[str, str]:
    """Environment for nnU-Net subprocesses. CSM_* variables of the caller are dropped so the default B16 preset
    and paper-scale settings apply unless a section sets them explicitly."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CSM_")}
    env.update({"nnUNet_raw": str(work / "nnUNet_raw"), "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
                "nnUNet_results": str(results), "nnUNet_n_proc_DA": str(n_proc_da), "nnUNet_compile": "f",
                "nnUNet_def_n_proc": "1"})
    return env


def console_script(name: str) -> str:
    """The nnU-Net entry point next to this interpreter (the venv's), so the benchmark never picks up another
    installation from PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH; is nnunetv2 installed?")
    return found


def plan_and_preprocess(work: Path, dataset_id: int) -> dict[str, Any]:
    """Plan 3d_fullres with one process. nnUNet_n_proc_DA=1 here because the planner breaks on 0."""
    env = nnunet_env(work, work / "nnUNet_results_steps", n_proc_da=1)
    log_path = work / "plan_and_preprocess.log"
    cmd = [console_script("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", "3d_fullres", "-np", "1"]
    t0 = time.perf_counter()
    with open(log_path, "w") as fh:
        res = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}); see {log_path}:\n"
                           f"{log_path.read_text()[-3000:]}")
    plans_dir = work / "nnUNet_preprocessed" / f"Dataset{dataset_id:03d}_{DATASET_NAME}"
    cfg = json.loads((plans_dir / "nnUNetPlans.json").read_text())["configurations"]["3d_fullres"]
    return {"wall_s": wall, "patch_size": cfg["patch_size"], "batch_size": cfg["batch_size"],
            "spacing": cfg["spacing"]}


# ------------------------------------------------------------------------------------------------ b. trainer steps
@contextlib.contextmanager
def nnunet_paths(work: Path, results: Path, n_proc_da: int) -> Iterator[None]:
    """nnU-Net reads its folders from the environment when ``nnunetv2.paths`` is first imported and the DA process
    count on every loader build, so set both for the in-process trainers and restore the caller's environment."""
    saved = dict(os.environ)
    os.environ.update(nnunet_env(work, results, n_proc_da))
    for k in [k for k in os.environ if k.startswith("CSM_")]:
        del os.environ[k]
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def time_trainer(cls: type, work: Path, dataset_id: int, warmup: int, timed_steps: int,
                 log_file: Any) -> dict[str, Any]:
    """Build the trainer exactly as ``get_trainer_from_args`` does, run ``on_train_start`` (network, optimiser,
    loaders; nnUNet_n_proc_DA=0 so batches come from a single-threaded augmenter in this process) and
    ``on_train_epoch_start``, then time ``next(dataloader_train)`` and ``train_step(batch)`` separately."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    pre = work / "nnUNet_preprocessed" / f"Dataset{dataset_id:03d}_{DATASET_NAME}"
    plans = load_json(str(pre / "nnUNetPlans.json"))
    plans["continue_training"] = False
    dataset_json = load_json(str(pre / "dataset.json"))
    seed_everything(0)
    with contextlib.redirect_stdout(log_file):
        trainer = cls(plans, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
        trainer.on_train_start()
        trainer.on_train_epoch_start()
    torch.set_num_threads(THREADS)  # nnU-Net does not touch it in-process; make sure both trainers get the same
    steps: list[float] = []
    cpus: list[float] = []
    loads: list[float] = []
    total = warmup + timed_steps
    shape = None
    for i in range(total):
        with Stopwatch() as load:
            batch = next(trainer.dataloader_train)
        with Stopwatch() as step, contextlib.redirect_stdout(log_file):
            trainer.train_step(batch)
        shape = list(batch["data"].shape)
        timed = i >= warmup
        log(f"trainer-steps {cls.__name__} {'timed' if timed else 'warm-up'} {i + 1}/{total}: step {step.wall:.2f} s "
            f"(cpu/wall {step.cpu / step.wall:.2f}), loader {load.wall:.2f} s")
        if timed:
            steps.append(step.wall)
            cpus.append(step.cpu)
            loads.append(load.wall)
    net = trainer.network
    out = {"trainer": cls.__name__, "network": type(net).__name__, "warmup": warmup, "timed": timed_steps,
           "parameters_M": round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
           "batch_shape": shape, "patch_size": list(trainer.configuration_manager.patch_size),
           "batch_size": trainer.batch_size, "preset": getattr(trainer, "preset", None),
           "step_s": summary(steps), "cpu_over_wall": median([c / w for c, w in zip(cpus, steps, strict=True)]),
           "loader_s_per_batch": summary(loads)}
    out["loader_batches_per_s"] = 1.0 / out["loader_s_per_batch"]["median"]
    out["steps_per_s"] = 1.0 / out["step_s"]["median"]
    # single-process DA workers needed so the GPU-less step never waits on data (ignores DA-worker contention)
    out["da_workers_to_keep_up"] = math.ceil(out["loader_s_per_batch"]["median"] / out["step_s"]["median"])
    del trainer, net, batch
    gc.collect()
    return out


def bench_trainer_steps(work: Path, dataset_id: int, rep: Repeats) -> dict[str, Any]:
    """nnU-Net's own U-Net step vs the CSM step on the same plan/batch; the CSM trainer uses its default preset."""
    results = work / "nnUNet_results_steps"
    with nnunet_paths(work, results, n_proc_da=0), open(work / "trainer_steps.log", "w") as fh:
        from csm_nnunet.trainers.csm_pretrainer import CSMPretrainer
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        out = {"nnUNetTrainer": time_trainer(nnUNetTrainer, work, dataset_id, rep.nnunet_warmup, rep.nnunet_timed, fh),
               "CSMPretrainer": time_trainer(CSMPretrainer, work, dataset_id, rep.csm_warmup, rep.csm_timed, fh)}
    out["csm_over_nnunet"] = out["CSMPretrainer"]["step_s"]["median"] / out["nnUNetTrainer"]["step_s"]["median"]
    out["csm_over_nnunet_best"] = out["CSMPretrainer"]["step_s"]["min"] / out["nnUNetTrainer"]["step_s"]["min"]
    out["config"] = {"warmup": {"nnUNetTrainer": rep.nnunet_warmup, "CSMPretrainer": rep.csm_warmup},
                     "timed": {"nnUNetTrainer": rep.nnunet_timed, "CSMPretrainer": rep.csm_timed},
                     "nnUNet_n_proc_DA": 0, "device": "cpu",
                     "step": "trainer.train_step(batch) only; next(dataloader_train) timed separately"}
    return out


# ------------------------------------------------------------------------------------------------ c. pretraining run
class TreeRSSSampler(threading.Thread):
    """Polls the summed RSS of a process and its descendants from /proc. ``ru_maxrss`` (the headline) is the peak of
    the largest single process; this sampled sum catches memory spread over helper processes, at 0.2 s resolution."""

    def __init__(self, root_pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.root_pid, self.interval = root_pid, interval
        self.peak_bytes = 0
        self.max_processes = 0
        self._stop_event = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _tree_rss(self) -> tuple[int, int]:
        children: dict[int, list[int]] = {}
        rss: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                fields = stat[stat.rindex(")") + 2:].split()
                pid = int(entry.name)
                children.setdefault(int(fields[1]), []).append(pid)
                rss[pid] = int(fields[21]) * self._page
            except (OSError, ValueError, IndexError):
                continue
        total, count, todo = 0, 0, [self.root_pid]
        while todo:
            pid = todo.pop()
            total += rss.get(pid, 0)
            count += pid in rss
            todo.extend(children.get(pid, []))
        return total, count

    def run(self) -> None:
        while not self._stop_event.is_set():
            total, count = self._tree_rss()
            self.peak_bytes = max(self.peak_bytes, total)
            self.max_processes = max(self.max_processes, count)
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


# Runs argv[2:], then writes the peak RSS of its children (KiB on Linux), their CPU time and the exit code to argv[1].
_RUSAGE_WRAPPER = """
import json, resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write(json.dumps({"rc": rc, "maxrss_kib": ru.ru_maxrss, "user_s": ru.ru_utime,
                                         "sys_s": ru.ru_stime}))
"""


def bench_pretrain_run(work: Path, dataset_id: int) -> dict[str, Any]:
    """Run the real CLI and read its peak RSS without psutil: ``getrusage(RUSAGE_CHILDREN)`` in a tiny wrapper
    interpreter. Not ``wait4`` on a direct child: Linux carries the high-water RSS of the forking process across
    ``exec`` into the child's ``ru_maxrss``, so a child of this (by then multi-GB) benchmark process would report
    this process's peak instead of its own. The wrapper is small, so its children's figure is their own."""
    results = work / "nnUNet_results_run"
    env = nnunet_env(work, results, n_proc_da=0)
    env.update(PRETRAIN_RUN_ENV)
    cmd = [console_script("nnUNetv2_train"), str(dataset_id), "3d_fullres", "0", "-tr", "CSMPretrainer",
           "-device", "cpu"]
    log_path, usage_path = work / "pretrain_run.log", work / "pretrain_run_rusage.json"
    with open(log_path, "w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _RUSAGE_WRAPPER, str(usage_path), *cmd], env=env, stdout=fh,
                                stderr=subprocess.STDOUT)
        sampler = TreeRSSSampler(proc.pid)
        sampler.start()
        proc.wait()
        wall = time.perf_counter() - t0
        sampler.stop()
    usage = json.loads(usage_path.read_text()) if usage_path.exists() else {"rc": proc.returncode}
    if proc.returncode != 0 or usage["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({usage['rc']}); see {log_path}:\n"
                           f"{log_path.read_text()[-3000:]}")
    fold = results / f"Dataset{dataset_id:03d}_{DATASET_NAME}" / "CSMPretrainer__nnUNetPlans__3d_fullres" / "fold_0"
    epoch_times = []
    for path in sorted(fold.glob("training_log_*.txt")):
        for line in path.read_text().splitlines():
            if "Epoch time:" in line:
                with contextlib.suppress(ValueError):
                    epoch_times.append(float(line.split("Epoch time:")[1].split()[0]))
    ckpt = fold / "checkpoint_final.pth"
    peak = usage["maxrss_kib"] * 1024
    return {"command": " ".join(["nnUNetv2_train", *cmd[1:]]), "env": dict(PRETRAIN_RUN_ENV),
            "extra_env": {"nnUNet_n_proc_DA": "0", "nnUNet_compile": "f"}, "wall_s": wall,
            "peak_rss_bytes": peak, "peak_rss_gb": peak / 1e9, "peak_rss_gib": peak / 2 ** 30,
            "sampled_tree_rss_peak_gb": sampler.peak_bytes / 1e9, "max_processes_seen": sampler.max_processes,
            "epoch_time_s": epoch_times[0] if epoch_times else None,
            "checkpoint_final_gb": ckpt.stat().st_size / 1e9 if ckpt.exists() else None,
            "user_cpu_s": usage["user_s"], "system_cpu_s": usage["sys_s"]}


# ------------------------------------------------------------------------------------------------ report
def markdown_table(res: dict[str, Any]) -> str:
    """The headline numbers next to their targets; details stay in the JSON."""
    rows = ["| measurement | value | target | met |", "|---|---|---|---|"]

    def ok(flag: bool) -> str:
        return "yes" if flag else "**no**"

    sd = res.get("sparse_vs_dense")
    if sd:
        for k in ("sparse", "dense"):
            r = sd[k]
            rows.append(f"| {k} encoder step, median of {sd['config']['timed']} (s) | {r['step_s']['median']:.2f} "
                        f"(fwd {r['forward_s']:.2f} / bwd {r['backward_s']:.2f} / opt {r['optimizer_s']:.2f}) | | |")
            rows.append(f"| {k} encoder tokens per batch (padded [B, L]) | {r['encoder_tokens_per_batch']:.0f} "
                        f"(valid per case {r['encoder_valid_tokens_per_case']:.1f}) | | |")
        target = TARGETS["dense_over_sparse_min"]
        rows.append(f"| dense / sparse step | {sd['dense_over_sparse']:.2f}x | >= {target:g}x | "
                    f"{ok(sd['dense_over_sparse'] >= target)} |")
        rows.append(f"| dense / sparse, fastest repeat of each | {sd['dense_over_sparse_best']:.2f}x | | |")
        rows.append(f"| dense / sparse, forward+backward only | {sd['dense_over_sparse_forward_backward']:.2f}x | | |")
    ts = res.get("trainer_steps")
    if ts:
        for k in ("nnUNetTrainer", "CSMPretrainer"):
            r = ts[k]
            rows.append(f"| {k}.train_step, median of {r['timed']} (s) | {r['step_s']['median']:.2f} | | |")
            rows.append(f"| {k} loader time per batch (s) / step rate (1/s) | {r['loader_s_per_batch']['median']:.2f}"
                        f" / {r['steps_per_s']:.3f} | | |")
        target = TARGETS["csm_over_nnunet_max"]
        rows.append(f"| CSM / nnU-Net step | {ts['csm_over_nnunet']:.2f} | <= {target:g} | "
                    f"{ok(ts['csm_over_nnunet'] <= target)} |")
        rows.append(f"| CSM / nnU-Net step, fastest repeat of each | {ts['csm_over_nnunet_best']:.2f} | | |")
    mo = res.get("vs_monai")
    if mo:
        target = TARGETS["csm_over_monai_max"]
        rows.append(f"| CSM step vs MONAI MaskedAutoEncoderViT step, medians of {mo['config']['timed']} (s) | "
                    f"{mo['csm']['step_s']['median']:.2f} vs {mo['monai']['step_s']['median']:.2f} | | |")
        rows.append(f"| CSM / MONAI step ({mo['config']['tokens_per_case']['csm']} vs "
                    f"{mo['config']['tokens_per_case']['monai']} tokens per case) | {mo['csm_over_monai']:.2f}x | "
                    f"<= {target:g}x | {ok(mo['csm_over_monai'] <= target)} |")
    pr = res.get("pretrain_run")
    if pr:
        target = TARGETS["peak_rss_gb_max"]
        rows.append(f"| pretraining run peak RSS (GB) | {pr['peak_rss_gb']:.2f} | <= {target:g} | "
                    f"{ok(pr['peak_rss_gb'] <= target)} |")
        rows.append(f"| pretraining run wall time (s) | {pr['wall_s']:.1f} | | |")
    return "\n".join(rows)


def run_section(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Time a section and keep the load average around it next to its numbers."""
    before, probe_before = loadavg(), small_op_ms()
    log(f"section {name} ... (load {before}, small op {probe_before:.3f} ms)")
    t0 = time.perf_counter()
    snap = CpuSnapshot.take()
    out = fn()
    out["others_cpu_share"] = snap.others_share(CpuSnapshot.take())
    out["section_wall_s"] = time.perf_counter() - t0
    out["loadavg_before"], out["loadavg_after"] = before, loadavg()
    out["small_op_ms_before"], out["small_op_ms_after"] = probe_before, small_op_ms()
    log(f"section {name} done in {out['section_wall_s']:.0f} s (other processes used "
        f"{100 * out['others_cpu_share']:.0f}% of the CPU meanwhile)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, same shapes (~5 min instead of ~15)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "cpu.json")
    parser.add_argument("--only", nargs="+", choices=SECTIONS + OPTIONAL_SECTIONS, default=list(SECTIONS),
                        help="run these sections (monai only when named: it needs `pip install monai`)")
    parser.add_argument("--dataset-id", type=int, default=987, help="nnU-Net dataset id of the synthetic data")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep nnU-Net folders and logs here (default: a temporary folder, deleted at the end)")
    args = parser.parse_args(argv)

    torch.set_num_threads(THREADS)
    rep = QUICK if args.quick else FULL
    t_start = time.perf_counter()
    res: dict[str, Any] = {"schema": 1, "quick": args.quick, "machine": machine_info(), "targets": TARGETS,
                           "repeats": asdict(rep),
                           "loadavg_start": loadavg()}
    work = args.workdir or Path(tempfile.mkdtemp(prefix="csm_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if "sparse-dense" in args.only:
            res["sparse_vs_dense"] = run_section("sparse-dense", lambda: bench_sparse_dense(rep))
        if "monai" in args.only:
            res["vs_monai"] = run_section("monai", lambda: bench_monai(rep))
        if "trainer-steps" in args.only or "pretrain-run" in args.only:
            log(f"writing synthetic dataset and planning in {work}")
            write_synthetic_dataset(work / "nnUNet_raw", args.dataset_id, num_cases=6, shape=PATCH)
            res["plan"] = plan_and_preprocess(work, args.dataset_id)
            log(f"plan: patch {res['plan']['patch_size']} batch {res['plan']['batch_size']}")
        if "trainer-steps" in args.only:
            res["trainer_steps"] = run_section("trainer-steps", lambda: bench_trainer_steps(work, args.dataset_id, rep))
        if "pretrain-run" in args.only:
            res["pretrain_run"] = run_section("pretrain-run", lambda: bench_pretrain_run(work, args.dataset_id))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    res["loadavg_end"] = loadavg()
    sections = [sec for sec in res.values() if isinstance(sec, dict) and "others_cpu_share" in sec]
    probes = [v for sec in sections for k, v in sec.items() if k.startswith("small_op_ms")]
    shares = [sec["others_cpu_share"] for sec in sections]
    res["contended"] = bool(sections) and (max(probes) > CONTENDED_OP_MS or max(shares) > CONTENDED_OTHERS_SHARE)
    res["total_wall_s"] = time.perf_counter() - t_start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    log(f"wrote {args.out} (total {res['total_wall_s']:.0f} s)")
    print(markdown_table(res))
    if res["contended"]:
        msg = (f"WARNING: other processes competed for the CPU during this run (they used up to "
               f"{100 * max(shares):.0f}% of it in a section; small-op probe up to {max(probes):.2f} ms vs < "
               f"{CONTENDED_OP_MS} ms on idle cores); timings are inflated, re-run on an idle machine.")
        log(msg)
        print(f"\n{msg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
