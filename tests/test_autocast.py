"""Every network runs forward and backward under autocast, as the trainers run them on a GPU.

CI has no GPU, so mixed precision is exercised with CPU autocast, which casts the same ops (linear, matmul, conv,
attention) to the lower precision. A dtype mismatch between an autocast result and a float32 buffer (written with
``index_put``, ``scatter``, ``where``) fails here exactly as on CUDA; the first GPU benchmark found one such bug in
the pretraining network's patch embedding, which no CPU float32 test could see.
"""

import pytest
import torch

from csm_nnunet.classification import CSMClassificationNetwork
from csm_nnunet.masking import CrossSeriesMasker
from csm_nnunet.network import CSMMaskedAutoencoder
from csm_nnunet.segmentation import CSMSegmentationNetwork

SERIES = ["T1", "T1ce", "T2", "FLAIR"]
PATCH = (32, 32, 32)
DTYPES = [torch.bfloat16, torch.float16]


def _check_grads(net: torch.nn.Module) -> None:
    grads = [p.grad for p in net.parameters() if p.requires_grad and p.grad is not None]
    assert grads, "no parameter received a gradient"
    assert all(g.dtype == torch.float32 for g in grads), "parameters must stay float32 under autocast"
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["sparse", "dense", "fused", "absent"])
def test_pretraining_network_under_autocast(dtype: torch.dtype, kind: str) -> None:
    torch.manual_seed(0)
    net = CSMMaskedAutoencoder(SERIES, PATCH, "tiny8", sparse_encoder=kind != "dense", fused=kind == "fused")
    x = torch.randn(3, 4, *PATCH)
    present = torch.ones(3, net.num_groups, dtype=torch.bool)
    if kind == "absent":
        present[1, 2] = False  # case 1 lacks a series: fewer tokens, padding and an attention mask
    # masks hide a different number of series per case, so the encoder batch is padded
    mask = CrossSeriesMasker(0.875)(3, net.num_groups, net.num_patches, present=present,
                                    generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=dtype):
        out = net(x, mask)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    _check_grads(net)
    with torch.autocast("cpu", dtype=dtype):
        recon = net.reconstruct(x, mask)
    assert recon.shape == x.shape and torch.isfinite(recon).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fusion,fusion_norm", [("attention", "layer"), ("concat", "layer"), ("attention", "instance")])
def test_segmentation_network_under_autocast(dtype: torch.dtype, fusion: str, fusion_norm: str) -> None:
    torch.manual_seed(0)
    net = CSMSegmentationNetwork(4, 3, PATCH, preset="tiny8", fusion=fusion, deep_supervision=True,
                                 series_names=SERIES, fusion_norm=fusion_norm)
    x = torch.randn(2, 4, *PATCH)
    present = torch.tensor([[True, True, True, True], [True, False, True, False]])  # padded encoder batch
    with torch.autocast("cpu", dtype=dtype):
        outs = net(x, present)
    assert outs[0].shape == (2, 3, *PATCH)
    sum(o.float().mean() for o in outs).backward()
    _check_grads(net)


@pytest.mark.parametrize("dtype", DTYPES)
def test_classification_network_under_autocast(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    net = CSMClassificationNetwork(4, 2, PATCH, preset="tiny8", series_names=SERIES)
    x = torch.randn(2, 4, *PATCH)
    present = torch.tensor([[True, True, True, True], [False, True, True, True]])
    with torch.autocast("cpu", dtype=dtype):
        logits = net(x, present)
    assert logits.shape == (2, 2)
    torch.nn.functional.cross_entropy(logits.float(), torch.tensor([0, 1])).backward()
    _check_grads(net)
