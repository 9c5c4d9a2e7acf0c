"""Crash and resume, numerics, AMP and DDP (issue 6).

* ``kill -9`` of ``nnUNetv2_train`` mid-epoch, then ``--c``: training resumes from ``checkpoint_latest.pth`` and loses
  at most the epoch in progress; checkpoints are written atomically.
* finite losses and gradients with all-zero and constant series; the GradScaler path of ``backward_and_step``.
* masks reproducible per (seed, epoch, stream) and different per DDP rank; two gloo processes run the pretrainer's
  reductions, a ``DistributedDataParallel`` step of the masked autoencoder and the rank-0-only checkpoint writing.
  nnU-Net's own ``-num_gpus`` path needs NCCL and CUDA, so it cannot run on a CPU machine; these tests run the code our
  trainers execute on that path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from csm_nnunet.trainers.csm_pretrainer import CSMPretrainer
from ddp_worker import PATCH, SERIES, ddp_worker, epoch_masks, pretrainer_stub
from e2e_helpers import BIN, SHORT, fold_dir

from csm_nnunet.masking import TRAIN_STREAM, VALIDATION_STREAM, CrossSeriesMasker, mask_seed
from csm_nnunet.network import CSMMaskedAutoencoder
from csm_nnunet.segmentation import CSMSegmentationNetwork
from csm_nnunet.trainer_utils import backward_and_step, save_checkpoint_atomically


# ------------------------------------------------------------------ atomic checkpoints
# (a write that fails midway: tests/test_trainer_utils.py::test_checkpoint_written_atomically_with_cpu_tensors)
def test_checkpoint_write_replaces_a_stale_temporary_file(tmp_path):
    """``kill -9`` during a write leaves ``<name>.tmp``; the next save of that checkpoint must simply replace it."""
    path = tmp_path / "checkpoint_latest.pth"
    (tmp_path / "checkpoint_latest.pth.tmp").write_bytes(b"truncated by kill -9")
    save_checkpoint_atomically({"current_epoch": 5, "w": torch.arange(3)}, str(path))
    assert torch.load(path, weights_only=False)["current_epoch"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_latest.pth"]


# ------------------------------------------------------------------ kill -9, then --c
RESUME_ID, RESUME_NAME = 976, "Dataset976_CSMResume"
RESUME_EPOCHS = 2
# nnUNetv2_train -device cpu runs torch on every core; with OpenMP's default busy-waiting, a run on a shared 2-core
# machine was 5-10x slower per epoch than with passive waiting (measured), which changes no result
RESUME_BUDGET = {**SHORT, "CSM_NUM_EPOCHS": str(RESUME_EPOCHS), "CSM_ITERS_PER_EPOCH": "1", "CSM_VAL_ITERS": "1",
                 "OMP_WAIT_POLICY": "PASSIVE"}


@pytest.fixture(scope="module")
def resume_env(synthetic) -> dict[str, str]:
    """The session's planned synthetic set copied under its own id, so killed runs never touch other tests' folders.
    Fold 0 of its split validates on one case (nnU-Net's default split needs five cases)."""
    src = Path(synthetic["nnUNet_preprocessed"]) / "Dataset990_CSMSynth"
    dst = Path(synthetic["nnUNet_preprocessed"]) / RESUME_NAME
    if not dst.exists():
        shutil.copytree(src, dst)
        plans = json.loads((dst / "nnUNetCSMPlans.json").read_text())
        plans["dataset_name"] = RESUME_NAME
        (dst / "nnUNetCSMPlans.json").write_text(json.dumps(plans, indent=2))
        (dst / "splits_final.json").write_text(json.dumps(
            [{"train": ["brain_000", "brain_001", "brain_003"], "val": ["brain_002"]}]))
    return synthetic


def _started_epochs(log: Path) -> list[int]:
    return [int(e) for e in re.findall(r": Epoch (\d+)\s*$", log.read_text(), re.M)]


def _train_until(env: dict[str, str], trainer: str, fold: str, folder: Path, stop: Callable[[Path], bool],
                 args: tuple[str, ...] = ()) -> tuple[Path, int, str]:
    """Run ``nnUNetv2_train`` and SIGKILL its process group as soon as ``stop(its training log)`` holds. Returns
    the log of this run, the exit status (``-SIGKILL`` if it was killed) and the end of its console output."""
    cmd = [str(BIN / "nnUNetv2_train"), str(RESUME_ID), "3d_fullres", fold, "-tr", trainer, "-p", "nnUNetCSMPlans",
           "-device", "cpu", *args]
    before = set(folder.glob("training_log_*.txt"))
    console = Path(env["nnUNet_results"]) / f"{trainer}_{fold}_console.txt"
    with console.open("w") as out:
        proc = subprocess.Popen(cmd, env={**env, **RESUME_BUDGET}, stdout=out, stderr=subprocess.STDOUT,
                                cwd=env["nnUNet_results"], start_new_session=True)
    deadline = time.monotonic() + 600
    try:
        while True:
            new = sorted(set(folder.glob("training_log_*.txt")) - before)
            if new and stop(new[-1]):
                os.killpg(proc.pid, signal.SIGKILL)
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    output = console.read_text()[-4000:]
    if not new:
        raise AssertionError(f"{' '.join(cmd)} wrote no training log ({proc.returncode}):\n{output}")
    return new[-1], proc.returncode, output


@pytest.mark.parametrize("trainer, fold", [("CSMPretrainer", "all"), ("CSMSegTrainer", "0")])
def test_kill_9_then_continue_loses_at_most_one_epoch(resume_env, trainer, fold):
    env = resume_env
    folder = fold_dir(env, RESUME_NAME, trainer, "nnUNetCSMPlans", fold=fold)
    # kill -9 as soon as epoch 1 is in progress
    killed_log, status, output = _train_until(env, trainer, fold, folder, lambda log: 1 in _started_epochs(log))
    assert status == -signal.SIGKILL, f"the run ended ({status}) before it could be killed:\n{output}"
    started = _started_epochs(killed_log)

    # what the kill left: a complete checkpoint_latest from the end of the last finished epoch, nothing half-written
    latest = folder / "checkpoint_latest.pth"
    assert latest.is_file(), f"no checkpoint_latest.pth after epoch 0 (only {sorted(p.name for p in folder.iterdir())})"
    assert not list(folder.glob("*.tmp")), "a temporary checkpoint was left behind"
    saved = torch.load(latest, map_location="cpu", weights_only=False)
    assert saved["trainer_name"] == trainer
    assert max(started) <= saved["current_epoch"] < RESUME_EPOCHS, (started, saved["current_epoch"])
    assert not (folder / "checkpoint_final.pth").exists()

    # --c continues from there. Stop once training is done: nnU-Net's final validation is tested elsewhere.
    resumed_log, status, output = _train_until(env, trainer, fold, folder,
                                               lambda log: "Training done." in log.read_text(), ("--c",))
    assert "Training done." in resumed_log.read_text(), f"--c failed ({status}):\n{output}"
    assert _started_epochs(resumed_log) == list(range(saved["current_epoch"], RESUME_EPOCHS))
    final = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == RESUME_EPOCHS
    assert len(final["logging"]["train_losses"]) == RESUME_EPOCHS, "the epochs before the kill left the history"
    assert not latest.exists() and not list(folder.glob("*.tmp"))


# ------------------------------------------------------------------ numerics
def _odd_batch() -> torch.Tensor:
    """Two cases of four series: case 0 has an all-zero series (1) and a constant one (2); case 1 is all zeros."""
    x = torch.randn(2, len(SERIES), *PATCH, generator=torch.Generator().manual_seed(0))
    x[0, 1] = 0.0
    x[0, 2] = 3.5
    x[1] = 0.0
    return x


@pytest.mark.parametrize("kwargs", [{}, {"norm_pix_loss": True}, {"fused": True}])
def test_masked_autoencoder_gives_every_parameter_a_finite_gradient(kwargs):
    """Finite loss and gradients with all-zero and constant series, and a gradient for *every* trainable parameter
    whatever the mask hides: DDP as nnU-Net wraps it (find_unused_parameters off) fails otherwise."""
    torch.manual_seed(0)
    net = CSMMaskedAutoencoder(SERIES, PATCH, "tiny", **kwargs)
    masker = CrossSeriesMasker(0.75, "off" if net.fused else "reconstruct")
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):  # different masks: the odd series visible, hidden whole, or scored
        mask = masker(2, net.num_groups, net.num_patches, generator=gen)
        net.zero_grad(set_to_none=True)
        out = net(_odd_batch(), mask)
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(out.pred).all()
        for name, p in net.named_parameters():
            if p.requires_grad:
                # DDP with find_unused_parameters=False (nnU-Net) needs a gradient for every trainable parameter
                assert p.grad is not None, f"{name} got no gradient (breaks DDP)"
                assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("fusion", ["attention", "concat"])
def test_segmentation_network_gives_every_parameter_a_finite_gradient(fusion):
    """As above for the fine-tuning network with deep supervision (an all-zero series is dropped as absent; an
    all-zero case keeps every series)."""
    torch.manual_seed(0)
    net = CSMSegmentationNetwork(len(SERIES), 3, PATCH, preset="tiny", fusion=fusion, deep_supervision=True)
    outputs = net(_odd_batch())
    assert all(torch.isfinite(o).all() for o in outputs)
    sum(o.float().square().mean() for o in outputs).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, f"{name} got no gradient (breaks DDP)"
        assert torch.isfinite(p.grad).all(), name


# ------------------------------------------------------------------ AMP: the GradScaler path of backward_and_step
def _scaler_step(scaler, max_norm: float, poison: bool = False) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    trainer = SimpleNamespace(network=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.5), grad_scaler=scaler)
    before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
    loss = net(torch.randn(4, 8, generator=torch.Generator().manual_seed(2))).square().mean() * 100
    backward_and_step(trainer, loss * float("inf") if poison else loss, max_norm=max_norm)
    return net, before


def test_backward_and_step_through_a_grad_scaler_matches_the_plain_step():
    """A real (CPU, enabled) GradScaler: the loss is scaled by 2**16, gradients are unscaled before clipping, so the
    SGD step equals the unscaled one. Clipping scaled gradients would shrink the step by 2**16."""
    plain, before = _scaler_step(None, max_norm=0.1)
    scaled, _ = _scaler_step(torch.amp.GradScaler("cpu", init_scale=2.0 ** 16), max_norm=0.1)
    after_plain = torch.cat([p.detach().flatten() for p in plain.parameters()])
    after_scaled = torch.cat([p.detach().flatten() for p in scaled.parameters()])
    assert not torch.equal(after_plain, before)
    torch.testing.assert_close(after_scaled, after_plain, rtol=1e-6, atol=1e-7)


def test_backward_and_step_lets_the_scaler_skip_an_overflow():
    """With an inf gradient the scaler must skip the step and lower its scale (the optimizer is not stepped)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    net, before = _scaler_step(scaler, max_norm=1.0, poison=True)
    assert torch.equal(torch.cat([p.detach().flatten() for p in net.parameters()]), before)
    assert scaler.get_scale() < 2.0 ** 16


# ------------------------------------------------------------------ masks: seeds, epochs, ranks
def test_mask_seed_is_a_fixed_function_of_its_arguments():
    # pinned: a resumed run on another machine or Python must draw the same masks (hash() would not promise that)
    assert mask_seed(12345, 0, TRAIN_STREAM, 0) == mask_seed(12345, 0, 0, 0) == 483569281378326548
    seeds = {mask_seed(s, e, st, r) for s in (1, 2) for e in range(4) for st in (TRAIN_STREAM, VALIDATION_STREAM)
             for r in range(3)}
    assert len(seeds) == 2 * 4 * 2 * 3 and all(0 <= s < 2 ** 63 for s in seeds)


def test_pretrainer_masks_are_reproducible_per_epoch_and_iteration():
    run = [epoch_masks(pretrainer_stub(e)) for e in range(3)]
    resumed = epoch_masks(pretrainer_stub(2))  # a fresh process after --c starts at epoch 2
    assert all(torch.equal(a, b) for a, b in zip(run[2], resumed))
    assert not torch.equal(run[0][0], run[1][0]) and not torch.equal(run[0][0], run[0][1])
    # validation masks are the same every epoch, so validation losses stay comparable
    val = []
    for e in (0, 7):
        trainer = pretrainer_stub(e)
        trainer.on_validation_epoch_start()
        val.append(CrossSeriesMasker(0.75)(2, 4, 8, generator=trainer._mask_generator).visible)
    assert torch.equal(*val)


# ------------------------------------------------------------------ DDP on CPU: gloo, two processes
def test_ddp_with_gloo_masks_reductions_gradients_and_rank0_checkpoints(tmp_path):
    import torch.multiprocessing as mp

    world = 2
    folder = tmp_path / "fold_all"
    folder.mkdir()
    outs = [str(folder / f"rank{r}.pt") for r in range(world)]
    mp.spawn(ddp_worker, args=(world, str(tmp_path / "rendezvous"), outs), nprocs=world)
    r0, r1 = (torch.load(o, weights_only=False) for o in outs)

    # (a) different masks per rank, each reproducible, and the masks a single process computes for that rank
    assert not torch.equal(r0["masks"][0], r1["masks"][0])
    for rank, res in enumerate((r0, r1)):
        assert all(torch.equal(a, b) for a, b in zip(res["masks"], res["masks_again"]))
        gen = torch.Generator().manual_seed(mask_seed(CSMPretrainer.mask_seed, 1, TRAIN_STREAM, rank))
        assert torch.equal(CrossSeriesMasker(0.75)(2, 4, 8, generator=gen).visible, res["masks"][0])
    # (b) every rank logs the mean over all ranks
    assert r0["train_loss"] == r1["train_loss"] == pytest.approx(np.mean([1, 3, 2, 4]))
    assert r0["val_loss"] == r1["val_loss"] == pytest.approx(15.0)
    # (c) DDP averaged the two ranks' gradients, and the ranks stayed in step
    torch.testing.assert_close(r0["grad_ddp"], r0["grad_mean_of_ranks"], rtol=1e-4, atol=1e-6)
    assert torch.equal(r1["grad_ddp"], r0["grad_ddp"]) and torch.equal(r1["weights"], r0["weights"])
    # (e) sharded validation: rank r predicted cases r, r+2, ...; every rank holds all five in order
    assert r0["sharded_seen"] == ["0", "2", "4"] and r1["sharded_seen"] == ["1", "3"]
    for res in (r0, r1):
        np.testing.assert_array_equal(res["sharded"], [[0, 0], [1, 1], [2, 0], [3, 1], [4, 0]])
    # (d) one complete checkpoint, written by rank 0
    assert torch.load(folder / "checkpoint_latest.pth", weights_only=False)["written_by"] == 0
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint_latest.pth", "rank0.pt", "rank1.pt"]
