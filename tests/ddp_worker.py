"""The DDP worker of ``test_reliability.py`` and the pretrainer stub it shares with that file.

A module of its own (not a test file): ``torch.multiprocessing.spawn`` pickles the worker function by module name,
and the spawned interpreters import it from ``tests/`` (on ``sys.path`` through pytest's ``pythonpath``), which works
whether pytest was started as ``pytest`` or ``python -m pytest``.
"""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace

import numpy as np
import torch
from csm_nnunet.trainers.csm_pretrainer import CSMPretrainer

from csm_nnunet.masking import TRAIN_STREAM, CrossSeriesMasker
from csm_nnunet.network import CSMMaskedAutoencoder
from csm_nnunet.trainer_utils import predict_sharded, save_trainer_checkpoint

SERIES = ["T1", "T1ce", "T2", "FLAIR"]
PATCH = (32, 32, 32)


def pretrainer_stub(epoch: int, rank: int | None = None) -> CSMPretrainer:
    """A ``CSMPretrainer`` holding only what its mask and reduction hooks read (no plans, data or network), so those
    hooks run unchanged without nnU-Net training; ``rank`` None means no DDP."""
    trainer = CSMPretrainer.__new__(CSMPretrainer)
    trainer.__dict__.update(is_ddp=rank is not None, local_rank=rank or 0, mask_seed=CSMPretrainer.mask_seed,
                            current_epoch=epoch, _mask_generator=torch.Generator(), network=torch.nn.Identity())
    return trainer


def epoch_masks(trainer: CSMPretrainer, iterations: int = 3) -> list[torch.Tensor]:
    """The masks of one training epoch as the pretrainer draws them: reseeded at the epoch start, then one draw per
    iteration from the running generator."""
    trainer._reseed(TRAIN_STREAM)
    masker = CrossSeriesMasker(0.75)
    return [masker(2, 4, 8, generator=trainer._mask_generator).visible for _ in range(iterations)]



def ddp_worker(rank: int, world_size: int, rendezvous: str, outs: list[str]) -> None:
    import torch.distributed as dist
    from nnunetv2.training.logging.nnunet_logger import MetaLogger
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        result: dict = {}
        # (a) the pretrainer's own seeding, as every rank of nnU-Net's DDP run calls it
        trainer = pretrainer_stub(epoch=1, rank=rank)
        result["masks"] = epoch_masks(trainer)
        result["masks_again"] = epoch_masks(trainer)

        # (b) loss reductions: the train loss by nnU-Net's on_train_epoch_end (the pretrainer keeps it), the
        # validation reconstruction loss by the pretrainer's own on_validation_epoch_end
        assert CSMPretrainer.on_train_epoch_end is nnUNetTrainer.on_train_epoch_end
        trainer.logger, trainer.current_epoch = MetaLogger(os.path.dirname(outs[rank]), False), 0
        trainer.on_train_epoch_end([{"loss": np.array(1.0 + rank)}, {"loss": np.array(3.0 + rank)}])
        trainer.on_validation_epoch_end([{"loss": np.array(10.0 * (rank + 1))}])
        result["train_loss"] = trainer.logger.get_value("train_losses", step=-1)
        result["val_loss"] = trainer.logger.get_value("val_losses", step=-1)

        # (c) DDP steps of the masked autoencoder with different masks per rank. On rank 1 series 2 is absent and
        # series 3 hidden whole in every case, so whole token groups go unused there (and the sparse encoder never
        # uses its mask token): DDP's reducer must still get a gradient for every trainable parameter.
        torch.manual_seed(0)  # the same initial weights on both ranks (DDP also broadcasts rank 0's)
        net = CSMMaskedAutoencoder(SERIES, PATCH, "tiny")
        reference = copy.deepcopy(net)  # the same weights outside DDP: each rank's own gradient of step 0
        ddp = DDP(net)
        trainable = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-3)
        for step in range(2):  # a parameter without gradient fails at the *second* forward
            x = torch.randn(2, len(SERIES), *PATCH, generator=torch.Generator().manual_seed(100 * rank + step))
            present = torch.ones(2, len(SERIES), dtype=torch.bool)
            if rank == 0:
                mask = CrossSeriesMasker(0.75)(2, len(SERIES), net.num_patches, generator=trainer._mask_generator)
            else:
                present[:, 2] = False
                mask = CrossSeriesMasker(0.75, "off")(2, len(SERIES), net.num_patches, present=present,
                                                      generator=trainer._mask_generator)
                mask.visible[:, 3] = False
                mask.hidden_series[:, 3] = True
                mask.scored[:, 3] = True
            opt.zero_grad(set_to_none=True)
            ddp(x, mask).loss.backward()
            if step == 0:  # DDP's gradient vs. the mean of the two ranks' own gradients
                own = torch.autograd.grad(reference(x, mask).loss,
                                          [p for p in reference.parameters() if p.requires_grad])
                own = torch.cat([g.flatten() for g in own])
                gathered = [torch.zeros_like(own) for _ in range(world_size)]
                dist.all_gather(gathered, own)
                result["grad_mean_of_ranks"] = torch.stack(gathered).mean(0)
                result["grad_ddp"] = torch.cat([p.grad.flatten() for p in trainable])
            opt.step()
        result["weights"] = torch.cat([p.detach().flatten() for p in net.parameters()])

        # (e) the classifier's per-epoch validation: each rank predicts its share of 5 cases, all ranks get all 5
        seen: list[str] = []

        def predict(keys: list[str]) -> np.ndarray:
            seen.extend(keys)
            return np.array([[float(k), float(rank)] for k in keys]).reshape(len(keys), 2)

        result["sharded"], result["sharded_seen"] = predict_sharded([str(k) for k in range(5)], predict), seen

        # (d) every rank calls save_checkpoint (nnU-Net's on_epoch_end does); only rank 0 may write
        state = SimpleNamespace(local_rank=dist.get_rank(), disable_checkpointing=False, optimizer=opt,
                                grad_scaler=None, logger=trainer.logger, _best_ema=None, current_epoch=0,
                                my_init_kwargs={}, inference_allowed_mirroring_axes=None)
        save_trainer_checkpoint(state, net, os.path.join(os.path.dirname(outs[rank]), "checkpoint_latest.pth"),
                                written_by=rank)
        dist.barrier()
        torch.save(result, outs[rank])
    finally:
        dist.destroy_process_group()
