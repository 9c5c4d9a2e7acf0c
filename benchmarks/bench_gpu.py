#!/usr/bin/env python
"""GPU benchmark of the CSM networks: bf16 autocast, SDPA kernels, volumes/s and model FLOP utilisation.

The CPU suite (``bench_pretrain.py``, ``bench_inference.py``) measures trainers and loaders on the 2-core box; this
script measures what only a GPU can answer, at the network level (synthetic tensors already on the device, so data
loading is excluded; nnU-Net itself is not needed, only ``dynamic-network-architectures``, ``timm`` and torch). One
JSON (see ``docs/benchmarks.md``, "GPU"):

``peak``          bf16 8192^3 matrix product: the rate the MFU figures are also quoted against (next to the data sheet's
                  dense bf16 peak), so a reader sees how far the model is from what this card does on one GEMM.
``pretrain``      one ``CSMPretrainer``-style optimiser step (zero_grad, forward, backward, clip 1.0, fused AdamW) of
                  :class:`~csm_nnunet.network.CSMMaskedAutoencoder`, 4 series, 96^3, mask ratio 0.875, presets B16
                  (16^3 tokens) and PrimusB (8^3 tokens, 8x the tokens), batch 2 and 8, fp32 vs bf16 autocast:
                  step time, volumes/s, model FLOPs per step (``torch.utils.flop_counter``), MFU, peak memory.
``sdpa``          the bf16 step with the attention kernel forced: masks with a different number of hidden series per
                  case pad the encoder batch and need an attention mask, which rules out flash attention; masks with
                  the same count per case need none. Measures what the padding costs and which kernels run.
``sparse-dense``  the encoder on visible tokens only (the method) vs every token with mask tokens (bf16).
``monai``         our step vs MONAI's ``MaskedAutoEncoderViT`` at the same ViT-B width/depth, 4 series fused into one
                  token per patch (4x fewer tokens), fp32 and bf16, batch 2 and 8 (a benchmark-only dependency).
``profile``       ``torch.profiler`` of a bf16 step at batch 8: GPU busy share, kernel launches and host
                  synchronisations per step, top host-side ops (why a small ViT step is host-bound).
``unet``          nnU-Net's default 3d_fullres U-Net for this 96^3 plan (the ``PlainConvUNet`` nnU-Net 2.8.1 plans for
                  bench_pretrain's synthetic dataset, with deep supervision) against ``CSMSegTrainer``'s network (B16,
                  deep supervision): a training step (bf16, CE on every deep-supervision output) and an inference
                  forward pass per 96^3 patch.

Every timing is the median over timed steps after warm-up, each step ended by ``torch.cuda.synchronize()`` and
measured with ``time.perf_counter`` (launch overhead included, as in training). Compared variants run in one
process, one after another, on the same masks.

Usage::

    python benchmarks/bench_gpu.py [--out benchmarks/results/gpu.json] [--only pretrain sdpa ...]
    python benchmarks/bench_gpu.py --smoke   # CPU, tiny shapes: checks the script, measures nothing useful
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time
import traceback
from collections.abc import Callable
from math import prod as math_prod
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_pretrain as bp  # noqa: E402  (machine description, median/summary, MONAI patch order)

from csm_nnunet.fileio import write_json_atomically  # noqa: E402

# most wanted first: a run cut short by its time limit still returns the sections it finished
SECTIONS = ("peak", "pretrain", "sdpa", "unet", "monai", "sparse-dense", "profile", "seg-infer")
SERIES = bp.SERIES
MASK_RATIO = bp.MASK_RATIO
# NVIDIA data sheets, SXM parts, dense (no 2:4 sparsity) bf16 tensor-core peak in FLOP/s; the H200 has the H100's
# compute. Cards not listed get MFU only against the measured GEMM rate.
SPEC_BF16_DENSE = {"H100": 989.4e12, "H200": 989.4e12}
# The 3d_fullres architecture nnU-Net 2.8.1's ExperimentPlanner wrote for bench_pretrain's 4-series 96^3 dataset.
UNET_ARCH = {"n_stages": 5, "features_per_stage": [32, 64, 128, 256, 320], "kernel_sizes": [[3, 3, 3]] * 5,
             "strides": [[1, 1, 1]] + [[2, 2, 2]] * 4, "n_conv_per_stage": [2] * 5,
             "n_conv_per_stage_decoder": [2] * 4, "conv_bias": True}


class Setting:
    """Shapes and repeats; ``--smoke`` shrinks everything so the script can be checked on a CPU."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.device = torch.device("cpu" if smoke else "cuda")
        self.patch = (32, 32, 32) if smoke else bp.PATCH
        self.presets = ("tiny", "tiny8") if smoke else ("B16", "PrimusB")
        self.batches = (2,) if smoke else (2, 8)
        self.warmup, self.timed = (1, 2) if smoke else (5, 20)
        self.gemm = 256 if smoke else 8192
        self.masks = 2 if smoke else 6  # the timed steps cycle through this many pre-drawn masks


def log(msg: str) -> None:
    print(f"[gpu-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 1e9, 2) if device.type == "cuda" else None


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def time_steps(step: Callable[[int], Any], s: Setting, warmup: int | None = None, timed: int | None = None
               ) -> list[float]:
    """Seconds per call of ``step(i)`` (each ended by a device sync), after warm-up calls that are not timed."""
    warmup = s.warmup if warmup is None else warmup
    timed = s.timed if timed is None else timed
    for i in range(warmup):
        step(i)
    sync(s.device)
    out = []
    for i in range(timed):
        t0 = time.perf_counter()
        step(i)
        sync(s.device)
        out.append(time.perf_counter() - t0)
    return out


def count_flops(fn: Callable[[], Any]) -> int:
    """Model FLOPs of one call (matrix products, convolutions, attention; forward and backward as run)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def rates(step_s: float, flops: float, batch: int, peaks: dict[str, float]) -> dict[str, Any]:
    """Throughput figures of one configuration from its median step time."""
    achieved = flops / step_s
    out: dict[str, Any] = {"volumes_per_s": round(batch / step_s, 2), "model_tflop_per_step": round(flops / 1e12, 4),
                           "achieved_tflop_s": round(achieved / 1e12, 2)}
    for name, peak in peaks.items():
        out[f"mfu_vs_{name}"] = round(achieved / peak, 4)
    return out


# ------------------------------------------------------------------------------------------------ masks
def draw_masks(s: Setting, net: Any, batch: int, count: int, equal_k: bool, seed: int = 2) -> list[Any]:
    """``count`` seeded cross-series masks for ``batch`` cases (moved to the device). With ``equal_k`` every case of
    a batch hides the same number of whole series, so all cases keep the same number of tokens and the encoder
    needs no padding mask (drawn per case and redrawn until the count matches the first case's)."""
    from csm_nnunet.masking import CrossSeriesMasker, SeriesMask

    masker = CrossSeriesMasker(MASK_RATIO)
    gen = torch.Generator().manual_seed(seed)
    masks = []
    for _ in range(count):
        if not equal_k:
            masks.append(masker(batch, net.num_groups, net.num_patches, generator=gen).to(s.device))
            continue
        parts = [masker(1, net.num_groups, net.num_patches, generator=gen)]
        k0 = int(parts[0].hidden_series.sum())
        while len(parts) < batch:
            m = masker(1, net.num_groups, net.num_patches, generator=gen)
            if int(m.hidden_series.sum()) == k0:
                parts.append(m)
        masks.append(SeriesMask(*(torch.cat([getattr(p, f) for p in parts]) for f in
                                  ("visible", "scored", "hidden_series", "present"))).to(s.device))
    return masks


def tokens_per_batch(masks: list[Any]) -> dict[str, float]:
    """Encoder tokens actually computed (batch x longest case, padding included) vs valid ones, over the masks."""
    padded = [m.visible.shape[0] * int(m.visible.flatten(1).sum(1).max()) for m in masks]
    valid = [int(m.visible.sum()) for m in masks]
    return {"encoder_tokens_padded": sum(padded) / len(padded), "encoder_tokens_valid": sum(valid) / len(valid)}


# ------------------------------------------------------------------------------------------------ pretraining step
def pretrain_step(s: Setting, preset: str, batch: int, bf16: bool, *, equal_k: bool = False, sparse: bool = True,
                  backends: list | None = None) -> tuple[Any, list[Any], Callable[[int], None], Callable[[int], None]]:
    """A fresh network, its masks, ``CSMPretrainer``'s optimiser step ``step(i)`` (on mask ``i`` modulo the count)
    and the same forward/backward without the optimiser, ``fwd_bwd(i)`` (for FLOP counting). ``backends``
    restricts SDPA (``torch.nn.attention``)."""
    from torch.nn.attention import sdpa_kernel

    from csm_nnunet.network import CSMMaskedAutoencoder
    from csm_nnunet.optim import adamw

    reset_memory(s.device)
    bp.seed_everything(0)
    net = CSMMaskedAutoencoder(SERIES, s.patch, preset, sparse_encoder=sparse).to(s.device).train()
    opt = adamw([{"params": list(net.parameters()), "weight_decay": 0.05}], lr=1e-4, betas=(0.9, 0.95))
    x = torch.randn(batch, len(SERIES), *s.patch, generator=torch.Generator().manual_seed(1)).to(s.device)
    masks = draw_masks(s, net, batch, s.masks, equal_k)
    kernel_ctx = (lambda: sdpa_kernel(backends)) if backends else contextlib.nullcontext

    def fwd_bwd(i: int) -> None:
        with kernel_ctx(), autocast(s.device, bf16):
            loss = net(x, masks[i % len(masks)]).loss
        loss.backward()

    def step(i: int) -> None:
        opt.zero_grad(set_to_none=True)
        fwd_bwd(i)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()

    return net, masks, step, fwd_bwd


def pretrain_case(s: Setting, preset: str, batch: int, bf16: bool, peaks: dict[str, float], *,
                  equal_k: bool = False, sparse: bool = True, backends: list | None = None) -> dict[str, Any]:
    """One configuration of the CSM pretraining step: times, FLOPs, throughput, memory."""
    net, masks, step, fwd_bwd = pretrain_step(s, preset, batch, bf16, equal_k=equal_k, sparse=sparse,
                                              backends=backends)

    def counted(i: int) -> None:
        fwd_bwd(i)
        net.zero_grad(set_to_none=True)

    times = time_steps(step, s)
    flops = sum(count_flops(lambda i=i: counted(i)) for i in range(len(masks))) / len(masks)
    med = bp.median(times)
    res = {"preset": preset, "batch": batch, "precision": "bf16 autocast" if bf16 else "fp32",
           "equal_hidden_series_per_case": equal_k, "sparse_encoder": sparse,
           "sdpa_backends": [str(b).split(".")[-1] for b in backends] if backends else "default",
           "tokens_per_case": len(SERIES) * net.num_patches, "step_s": bp.summary(times),
           "peak_memory_gb": peak_memory_gb(s.device), **tokens_per_batch(masks), **rates(med, flops, batch, peaks)}
    log(f"{preset} b{batch} {res['precision']} equal_k={equal_k} sparse={sparse} sdpa={res['sdpa_backends']}: "
        f"{med * 1e3:.1f} ms, {res['volumes_per_s']} vol/s, {res['achieved_tflop_s']} TFLOP/s")
    return res


def guarded(fn: Callable[[], dict[str, Any]], label: str) -> dict[str, Any]:
    """A configuration that cannot run (no kernel for the inputs, out of memory) is recorded, not fatal. The
    device's cache is emptied after each configuration, so the next one's peak memory starts from zero."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001  (the error text is the measurement: e.g. "no available kernel")
        error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        log(f"{label}: {error}")
        return {"label": label, "error": error}
    finally:
        reset_memory(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))


def bench_peak(s: Setting) -> dict[str, Any]:
    n = s.gemm
    a = torch.randn(n, n, device=s.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=s.device, dtype=torch.bfloat16)
    times = time_steps(lambda i: a @ b, s, warmup=3, timed=10)
    med = bp.median(times)
    return {"gemm": [n, n, n], "dtype": "bfloat16", "step_s": bp.summary(times), "tflop_s": 2 * n ** 3 / med / 1e12}


def bench_pretrain(s: Setting, peaks: dict[str, float]) -> dict[str, Any]:
    rows = []
    for preset in s.presets:
        for batch in s.batches:
            for bf16 in (False, True):
                rows.append(guarded(lambda p=preset, b=batch, h=bf16: pretrain_case(s, p, b, h, peaks),
                                    f"{preset} b{batch} bf16={bf16}"))
    speedups = {}
    for preset in s.presets:
        for batch in s.batches:
            pair = [r for r in rows if r.get("preset") == preset and r.get("batch") == batch]
            if len(pair) == 2:
                speedups[f"{preset}_b{batch}"] = round(pair[0]["step_s"]["median"] / pair[1]["step_s"]["median"], 2)
    return {"rows": rows, "bf16_speedup_over_fp32": speedups}


def bench_sdpa(s: Setting, peaks: dict[str, float]) -> dict[str, Any]:
    from torch.nn.attention import SDPBackend

    variants = [("random k (padded), default kernels", False, None),
                ("random k (padded), memory-efficient only", False, [SDPBackend.EFFICIENT_ATTENTION]),
                ("random k (padded), math only", False, [SDPBackend.MATH]),
                ("random k (padded), flash only", False, [SDPBackend.FLASH_ATTENTION]),
                ("equal k (no padding), default kernels", True, None),
                ("equal k (no padding), flash only", True, [SDPBackend.FLASH_ATTENTION]),
                ("equal k (no padding), memory-efficient only", True, [SDPBackend.EFFICIENT_ATTENTION])]
    batch = max(s.batches)
    rows = []
    for preset in s.presets:
        for label, equal_k, backends in variants:
            r = guarded(lambda p=preset, e=equal_k, k=backends: pretrain_case(s, p, batch, True, peaks, equal_k=e,
                                                                            backends=k), f"{preset} {label}")
            rows.append({"variant": label, "preset": preset, **r})
    return {"batch": batch, "rows": rows}


def bench_sparse_dense(s: Setting, peaks: dict[str, float]) -> dict[str, Any]:
    rows, ratios = [], {}
    for preset in s.presets:
        pair = [guarded(lambda p=preset, sp=sp: pretrain_case(s, p, 2, True, peaks, sparse=sp),
                        f"{preset} sparse={sp}") for sp in (True, False)]
        rows += pair
        if all("step_s" in r for r in pair):
            ratios[preset] = round(pair[1]["step_s"]["median"] / pair[0]["step_s"]["median"], 2)
    return {"batch": 2, "precision": "bf16 autocast", "rows": rows, "dense_over_sparse": ratios}


def bench_monai(s: Setting, peaks: dict[str, float]) -> dict[str, Any]:
    try:
        import monai
        from monai.networks.nets import MaskedAutoEncoderViT
    except ImportError as e:
        return {"error": f"MONAI not installed ({e}); it is a benchmark-only dependency"}
    from csm_nnunet.network import get_preset
    from csm_nnunet.optim import adamw

    preset = s.presets[0]
    p = get_preset(preset)
    out: dict[str, Any] = {"monai_version": monai.__version__, "preset": preset, "rows": []}
    for bf16 in (False, True):  # both precisions: MONAI 1.6.1's MAE fails under bf16 autocast (index_put dtypes)
        for batch in s.batches:
            ours = guarded(lambda b=batch, h=bf16: pretrain_case(s, preset, b, h, peaks), f"csm {preset} b{batch}")

            def theirs_case(batch: int = batch, bf16: bool = bf16) -> dict[str, Any]:
                reset_memory(s.device)
                bp.seed_everything(0)
                net = MaskedAutoEncoderViT(
                    in_channels=len(SERIES), img_size=s.patch, patch_size=p.token_size, hidden_size=p.embed_dim,
                    mlp_dim=4 * p.embed_dim, num_layers=p.depth, num_heads=p.num_heads, masking_ratio=MASK_RATIO,
                    decoder_hidden_size=p.decoder_dim, decoder_mlp_dim=4 * p.decoder_dim,
                    decoder_num_layers=p.decoder_depth, decoder_num_heads=p.decoder_heads, qkv_bias=True,
                    spatial_dims=3).to(s.device).train()
                opt = adamw([{"params": list(net.parameters()), "weight_decay": 0.05}], lr=1e-4, betas=(0.9, 0.95))
                x = torch.randn(batch, len(SERIES), *s.patch, generator=torch.Generator().manual_seed(1)).to(s.device)
                target = bp.monai_patches(x, p.token_size)

                def loss_fn() -> torch.Tensor:
                    with autocast(s.device, bf16):
                        pred, mask = net(x)
                    per_patch = ((pred.float() - target) ** 2).mean(-1)
                    return (per_patch * mask).sum() / mask.sum()

                def step(i: int) -> None:
                    opt.zero_grad(set_to_none=True)
                    loss_fn().backward()
                    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                    opt.step()

                times = time_steps(step, s)

                def fwd_bwd() -> None:
                    loss_fn().backward()
                    net.zero_grad(set_to_none=True)

                flops = count_flops(fwd_bwd)
                res = {"batch": batch, "precision": "bf16 autocast" if bf16 else "fp32",
                       "tokens_per_case": math_prod(s.patch) // p.token_size ** 3, "step_s": bp.summary(times),
                       "peak_memory_gb": peak_memory_gb(s.device), **rates(bp.median(times), flops, batch, peaks)}
                log(f"monai b{batch} bf16={bf16}: {bp.median(times) * 1e3:.1f} ms")
                return res

            theirs = guarded(theirs_case, f"monai b{batch} bf16={bf16}")
            row = {"batch": batch, "precision": "bf16 autocast" if bf16 else "fp32", "csm": ours, "monai": theirs}
            if "step_s" in ours and "step_s" in theirs:
                row["csm_over_monai"] = round(ours["step_s"]["median"] / theirs["step_s"]["median"], 2)
            out["rows"].append(row)
    return out


#: runtime calls that launch one kernel each (a replayed CUDA graph is one ``cudaGraphLaunch`` instead)
LAUNCH_KEYS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def profile_calls(call: Callable[[int], Any], s: Setting, steps: int) -> tuple[float, Any, float]:
    """Run ``call(i)`` for ``steps`` calls under ``torch.profiler`` (CPU, and CUDA on a GPU), ended by a device
    sync. Returns wall seconds per call, the profiler's key averages, and GPU kernel microseconds per call."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for i in range(steps):
            call(i)
        sync(s.device)
    wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / steps
    return wall, events, kernel_us


def bench_profile(s: Setting, peaks: dict[str, float]) -> dict[str, Any]:
    """Where a bf16 pretraining step's wall time goes (``torch.profiler``, CPU and CUDA): the share of the wall time
    the GPU spends in kernels, kernels launched and host synchronisations per step, and the top host-side ops. A
    step that takes as long at batch 8 as at batch 2 is bound by the host, not the GPU; this says by what."""
    rows = []
    steps = 2 if s.smoke else 5
    for preset in s.presets:
        batch = max(s.batches)
        _, _, step, _ = pretrain_step(s, preset, batch, True)
        time_steps(step, s, timed=0)
        wall, events, kernel_us = profile_calls(step, s, steps)
        launches = sum(e.count for e in events if e.key in LAUNCH_KEYS) / steps
        syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                         "cudaMemcpyAsync")) / steps
        top = sorted((e for e in events if e.device_type.name == "CPU" and not e.key.startswith("cuda")),
                     key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
        row = {"preset": preset, "batch": batch, "precision": "bf16 autocast", "profiled_steps": steps,
               "wall_ms_per_step_profiled": round(wall * 1e3, 1),
               "gpu_kernel_ms_per_step": round(kernel_us / 1e3, 1),
               "gpu_busy_share": round(kernel_us / 1e6 / wall, 3),
               "kernel_launches_per_step": launches, "sync_or_copy_calls_per_step": syncs,
               "top_host_ops_self_ms_per_step": {e.key: round(e.self_cpu_time_total / 1e3 / steps, 2) for e in top},
               "runtime_api_ms_and_calls_per_step": {
                   e.key: [round(e.self_cpu_time_total / 1e3 / steps, 2), e.count / steps] for e in events
                   if e.device_type.name == "CPU" and e.key.startswith("cu")}}
        log(f"profile {preset} b{batch}: wall {row['wall_ms_per_step_profiled']} ms, kernels "
            f"{row['gpu_kernel_ms_per_step']} ms, {launches:.0f} launches, {syncs:.0f} sync/copy calls")
        rows.append(row)
        del step
        reset_memory(s.device)
    return {"rows": rows}


def build_unet(s: Setting, num_classes: int) -> torch.nn.Module:
    """nnU-Net's default 3d_fullres ``PlainConvUNet`` for this plan (:data:`UNET_ARCH`), deep supervision on."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    bp.seed_everything(0)
    arch = dict(UNET_ARCH)
    if s.smoke:
        arch.update(n_stages=3, features_per_stage=[8, 16, 32], kernel_sizes=[[3, 3, 3]] * 3,
                    strides=[[1, 1, 1]] + [[2, 2, 2]] * 2, n_conv_per_stage=[2] * 3, n_conv_per_stage_decoder=[2] * 2)
    return PlainConvUNet(len(SERIES), num_classes=num_classes, conv_op=torch.nn.Conv3d,
                         norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True, **arch)


def bench_unet(s: Setting, peaks: dict[str, float]) -> dict[str, Any]:
    """Training step and inference forward of nnU-Net's default U-Net vs CSMSegTrainer's network, bf16."""
    from csm_nnunet.optim import adamw
    from csm_nnunet.segmentation import CSMSegmentationNetwork

    num_classes, batch = 4, 2
    preset = s.presets[0]
    torch.backends.cudnn.benchmark = True  # as nnU-Net sets it

    def build(kind: str) -> torch.nn.Module:
        bp.seed_everything(0)
        if kind == "nnunet":
            return build_unet(s, num_classes)
        return CSMSegmentationNetwork(len(SERIES), num_classes, s.patch, preset=preset, deep_supervision=True,
                                      series_names=SERIES)

    def case(kind: str) -> dict[str, Any]:
        reset_memory(s.device)
        net = build(kind).to(s.device)
        params = list(net.parameters())
        # nnU-Net's optimiser for its U-Net, ours (AdamW) for the ViT: each network as its trainer runs it
        opt = (torch.optim.SGD(params, lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5) if kind == "nnunet"
               else adamw([{"params": params, "weight_decay": 0.01}], lr=1e-4))
        x = torch.randn(batch, len(SERIES), *s.patch, generator=torch.Generator().manual_seed(1)).to(s.device)
        y = torch.randint(0, num_classes, (batch, *s.patch), generator=torch.Generator().manual_seed(3)).to(s.device)

        def loss_of(outs: list[torch.Tensor]) -> torch.Tensor:
            # CE on every deep-supervision output against a nearest-downsampled target (nnU-Net adds Dice; the
            # loss is a negligible share of either step)
            total = outs[0].new_zeros((), dtype=torch.float32)
            for o in outs:
                t = F.interpolate(y[:, None].float(), size=o.shape[2:], mode="nearest")[:, 0].long()
                total = total + F.cross_entropy(o.float(), t)
            return total

        def train_step(i: int) -> None:
            opt.zero_grad(set_to_none=True)
            with autocast(s.device, True):
                outs = net(x)
            loss_of(outs).backward()
            torch.nn.utils.clip_grad_norm_(params, 12.0)
            opt.step()

        net.train()
        train_times = time_steps(train_step, s)

        def fwd_bwd() -> None:
            with autocast(s.device, True):
                outs = net(x)
            loss_of(outs).backward()
            net.zero_grad(set_to_none=True)

        train_flops = count_flops(fwd_bwd)
        train_mem = peak_memory_gb(s.device)
        net.eval()
        if hasattr(net, "deep_supervision"):
            net.deep_supervision = False
        if kind == "nnunet":
            net.decoder.deep_supervision = False

        def infer(i: int) -> None:
            with torch.inference_mode(), autocast(s.device, True):
                net(x)

        reset_memory(s.device)
        infer_times = time_steps(infer, s)
        with torch.inference_mode():
            infer_flops = count_flops(lambda: infer(0))
        res = {"parameters_M": round(sum(p.numel() for p in params) / 1e6, 2),
               "train_step_s": bp.summary(train_times), "train_peak_memory_gb": train_mem,
               "train": rates(bp.median(train_times), train_flops, batch, peaks),
               "inference_s_per_batch": bp.summary(infer_times), "inference_peak_memory_gb": peak_memory_gb(s.device),
               "inference": rates(bp.median(infer_times), infer_flops, batch, peaks)}
        log(f"{kind}: train {bp.median(train_times) * 1e3:.1f} ms, infer {bp.median(infer_times) * 1e3:.1f} ms")
        return res

    rows = {kind: guarded(lambda k=kind: case(k), kind) for kind in ("nnunet", "csm_seg")}
    out: dict[str, Any] = {"batch": batch, "patch_size": list(s.patch), "num_classes": num_classes,
                           "csm_preset": preset, "nnunet_arch": UNET_ARCH, **rows}
    if all("train_step_s" in r for r in rows.values()):
        out["csm_over_nnunet_train"] = round(rows["csm_seg"]["train_step_s"]["median"]
                                             / rows["nnunet"]["train_step_s"]["median"], 2)
        out["csm_over_nnunet_inference"] = round(rows["csm_seg"]["inference_s_per_batch"]["median"]
                                                 / rows["nnunet"]["inference_s_per_batch"]["median"], 2)
    return out


def gpu_busy(call: Callable[[], Any], s: Setting, steps: int = 10) -> dict[str, Any]:
    """Profiler's kernel time and launches per call against the call's wall time: a busy share well below 1 means
    the GPU waits for the host to issue kernels."""
    call()
    sync(s.device)
    wall, events, kernel_us = profile_calls(lambda i: call(), s, steps)
    launches = {e.key: e.count / steps for e in events if e.key in (*LAUNCH_KEYS, "cudaGraphLaunch")}
    return {"wall_ms_profiled": round(wall * 1e3, 2), "gpu_kernel_ms": round(kernel_us / 1e3, 2),
            "gpu_busy_share": round(kernel_us / 1e6 / wall, 3), "launch_calls": launches}


def seg_infer_row(s: Setting, unet: torch.nn.Module, csm: torch.nn.Module, unet_graphs: Any, amp: torch.dtype,
                  batch: int) -> dict[str, Any]:
    """One precision and window batch of :func:`bench_seg_infer`."""
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, len(SERIES), *s.patch, generator=g).to(s.device)
    x_missing = x.clone()
    x_missing[:, SERIES.index("FLAIR")] = 0.0
    cuda = s.device.type == "cuda"
    calls: dict[str, Callable[[], Any]] = {
        "nnunet": lambda: unet(x),
        "nnunet_graphed": lambda: unet_graphs.run(unet, x) if cuda else unet(x),
        "csm_eager": lambda: csm.forward_eager(x),
        "csm_eager_all_tokens": lambda: csm.forward_eager(x, compact=False),
        "csm_graphed": lambda: csm(x),
        "csm_eager_flair_missing": lambda: csm.forward_eager(x_missing),
        "csm_graphed_flair_missing": lambda: csm(x_missing)}
    row: dict[str, Any] = {"precision": str(amp).replace("torch.", ""), "batch": batch}
    with torch.inference_mode(), torch.autocast(s.device.type, dtype=amp):
        for name, call in calls.items():
            reset_memory(s.device)
            times = time_steps(lambda i, c=call: c(), s)
            row[name] = {"ms": round(bp.median(times) * 1e3, 2), "peak_memory_gb": peak_memory_gb(s.device)}
        for label, inp in (("complete", x), ("flair_missing", x_missing)):
            eager, graphed = csm.forward_eager(inp).float(), csm(inp).float()
            row[f"graphed_vs_eager_{label}"] = {
                "max_abs_logit_diff": float((eager - graphed).abs().max()), "logit_scale": float(eager.abs().max()),
                "argmax_agreement": float((eager.argmax(1) == graphed.argmax(1)).float().mean())}
        if cuda and batch == 1:
            for name in ("csm_eager", "nnunet", "csm_graphed"):
                row[f"profile_{name}"] = gpu_busy(calls[name], s)
    row["csm_graphed_over_nnunet"] = round(row["csm_graphed"]["ms"] / row["nnunet"]["ms"], 2)
    row["csm_eager_over_nnunet"] = round(row["csm_eager"]["ms"] / row["nnunet"]["ms"], 2)
    row["csm_graphed_over_nnunet_graphed"] = round(row["csm_graphed"]["ms"] / row["nnunet_graphed"]["ms"], 2)
    log(f"seg-infer {row['precision']} b{batch}: nnunet {row['nnunet']['ms']} ms, csm eager "
        f"{row['csm_eager']['ms']} ms, csm graphed {row['csm_graphed']['ms']} ms "
        f"({row['csm_graphed_over_nnunet']}x), diff {row['graphed_vs_eager_complete']}")
    return row


def bench_seg_infer(s: Setting, peaks: dict[str, float]) -> dict[str, Any]:
    """One sliding window as nnU-Net's predictor runs it (``torch.inference_mode``, fp16 autocast by default, one
    window per call): nnU-Net's U-Net vs ``CSMSegTrainer``'s network, eager (the compact route, as before CUDA
    graphs) and graph-replayed (``csm_nnunet/cuda_graphs.py``), batch 1 and 2, fp16 and bf16; a window with one series
    missing; how far the graphed logits are from the eager ones; and the GPU's busy share per window (profiler
    kernel time over wall time), which says whether a window waits on the host. The U-Net is also timed graph-replayed
    by the same cache, so the comparison is not one-sided."""
    from csm_nnunet.cuda_graphs import CudaGraphCache
    from csm_nnunet.segmentation import CSMSegmentationNetwork

    num_classes, preset = 4, s.presets[0]
    torch.backends.cudnn.benchmark = True  # as nnU-Net's predictor sets it
    unet = build_unet(s, num_classes).to(s.device).eval()
    unet.decoder.deep_supervision = False
    bp.seed_everything(0)
    csm = CSMSegmentationNetwork(len(SERIES), num_classes, s.patch, preset=preset, series_names=SERIES)
    csm = csm.to(s.device).eval()
    unet_graphs = CudaGraphCache()
    rows = [guarded(lambda a=amp, b=batch: seg_infer_row(s, unet, csm, unet_graphs, a, b), f"{amp} b{batch}")
            for amp in (torch.float16, torch.bfloat16) for batch in (1, 2)]
    return {"preset": preset, "patch_size": list(s.patch), "num_classes": num_classes, "nnunet_arch": UNET_ARCH,
            "csm_graph_cache_disabled": csm._graphs.disabled, "rows": rows}


# ------------------------------------------------------------------------------------------------ driver
def gpu_info(s: Setting) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(s.device)}
    if s.device.type == "cuda":
        prop = torch.cuda.get_device_properties(0)
        info.update(name=prop.name, multiprocessors=prop.multi_processor_count,
                    memory_gb=round(prop.total_memory / 1e9, 1), capability=list(torch.cuda.get_device_capability()),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    bf16_supported=torch.cuda.is_bf16_supported(),
                    flash_sdp_enabled=torch.backends.cuda.flash_sdp_enabled(),
                    mem_efficient_sdp_enabled=torch.backends.cuda.mem_efficient_sdp_enabled())
    for dist in ("timm", "monai"):
        try:
            info[dist] = __import__(dist).__version__
        except ImportError:
            info[dist] = None
    with contextlib.suppress(Exception):
        from csm_nnunet.network import CSMMaskedAutoencoder

        blk = CSMMaskedAutoencoder(SERIES, (32, 32, 32), "tiny").eva.blocks[0]
        info["timm_fused_attn"] = bool(getattr(blk.attn, "fused_attn", False))
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=bp.REPO_ROOT / "benchmarks" / "results" / "gpu.json")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks that the script runs")
    args = parser.parse_args(argv)
    s = Setting(args.smoke)
    if not s.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: this benchmark is for a GPU (use --smoke to check the script on a CPU)")
    # PyTorch's defaults, stated: fp32 matrix products in full fp32 (the bf16 gain is measured against that),
    # cuDNN convolutions may use TF32 (only the U-Net's convolutions, run under bf16 autocast here anyway)
    torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.perf_counter()
    res: dict[str, Any] = {"schema": 1, "smoke": s.smoke, "machine": bp.machine_info(), "gpu": gpu_info(s),
                           "config": {"series": list(SERIES), "patch_size": list(s.patch), "mask_ratio": MASK_RATIO,
                                      "presets": list(s.presets), "batches": list(s.batches), "warmup": s.warmup,
                                      "timed": s.timed, "masks_cycled": s.masks,
                                      "matmul_tf32": False, "cudnn_tf32": torch.backends.cudnn.allow_tf32}}
    if os.environ.get("CSM_BENCH_COMMIT"):  # the device copy of the tree has no .git
        res["machine"]["git"] = {"commit": os.environ["CSM_BENCH_COMMIT"], "dirty": None}
    peaks: dict[str, float] = {}
    name = res["gpu"].get("name", "")
    for card, peak in SPEC_BF16_DENSE.items():
        if card in name:
            peaks["spec_bf16_dense"] = peak
    fns: dict[str, Callable[[], dict[str, Any]]] = {
        "pretrain": lambda: bench_pretrain(s, peaks), "sdpa": lambda: bench_sdpa(s, peaks),
        "sparse-dense": lambda: bench_sparse_dense(s, peaks), "monai": lambda: bench_monai(s, peaks),
        "unet": lambda: bench_unet(s, peaks), "profile": lambda: bench_profile(s, peaks),
        "seg-infer": lambda: bench_seg_infer(s, peaks)}
    for section in args.only:
        ts = time.perf_counter()
        log(f"section {section}")
        try:
            if section == "peak":
                res["peak"] = bench_peak(s)
                peaks["measured_gemm"] = res["peak"]["tflop_s"] * 1e12
            else:
                res[section] = fns[section]()
        except Exception:  # noqa: BLE001  (one section's failure must not lose the others' results)
            res[section] = {"error": traceback.format_exc()[-2000:]}
            log(res[section]["error"])
        res[section]["section_wall_s"] = round(time.perf_counter() - ts, 1)
        res["mfu_peaks_tflop_s"] = {k: round(v / 1e12, 1) for k, v in peaks.items()}
        res["total_wall_s"] = round(time.perf_counter() - t0, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(str(args.out), res, indent=1)
    log(f"wrote {args.out} in {res['total_wall_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
