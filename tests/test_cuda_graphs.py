"""The CUDA-graph inference route of the segmentation network: its graph-safe forward (all tokens, absent series
masked) must equal the compact one, and the graph cache must never outlive what it captured.

The graph replay itself needs a GPU; ``test_graph_replay_equals_eager_on_cuda`` runs where one is present (it ran
on an H100 through the ``device`` tool, see docs/benchmarks.md "Segmentation inference on a GPU")."""

import copy
import pickle

import pytest
import torch

from csm_nnunet.cuda_graphs import graphs_allowed
from csm_nnunet.segmentation import CSMSegmentationNetwork

PATCH = (32, 48, 32)


def make(preset: str = "tiny", num_series: int = 4, patch=PATCH, **kw) -> CSMSegmentationNetwork:
    torch.manual_seed(0)
    kw.setdefault("base_channels", 8)
    return CSMSegmentationNetwork(num_series, 3, patch, preset, **kw).eval()


@pytest.mark.parametrize("preset,patch,fusion", [("tiny", PATCH, "attention"), ("tiny", PATCH, "concat"),
                                                 ("PrimusS", (32, 32, 32), "attention")])
def test_all_token_route_equals_the_compact_route(preset, patch, fusion):
    """Same logits whether absent series' tokens are gathered out (compact) or kept and masked from attention;
    for a complete case, a case missing one series and a case with one series left (PrimusS: rotary codes)."""
    net = make(preset, patch=patch, fusion=fusion, deep_supervision=True)
    x = torch.randn(3, 4, *patch)
    x[1, 2] = 0.0  # missing series, by the raw-data convention
    x[2, :3] = 0.0
    with torch.no_grad():
        compact = net.forward_eager(x, compact=True)
        masked = net.forward_eager(x, compact=False)
        alone = net.forward_eager(x[1:2], compact=True)
    for a, b in zip(compact, masked):
        assert torch.allclose(a, b, atol=2e-4), float((a - b).abs().max())
    # and the route does not change what a missing series means: case 1 alone equals case 1 in the batch
    assert torch.allclose(masked[0][1], alone[0][0], atol=2e-4)


def test_all_token_route_runs_every_token_through_the_encoder():
    net = make()
    seen = []
    hook = net.eva.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    x = torch.randn(1, 4, *PATCH)
    x[:, 1] = 0.0
    with torch.no_grad():
        net.forward_eager(x, compact=False)
        net.forward_eager(x, compact=True)
    hook.remove()
    assert seen == [(1, 4 * net.num_patches, 96), (1, 3 * net.num_patches, 96)]


def test_cpu_forward_takes_no_graph_and_equals_the_eager_forward():
    net = make()
    x = torch.randn(1, 4, *PATCH)
    assert not net._graphs.usable(x, training=False)  # a CPU tensor
    with torch.no_grad():
        out = net(x)
        assert torch.equal(out, net.forward_eager(x))
    assert len(net._graphs) == 0


def test_graphs_are_dropped_when_the_network_trains_or_moves_and_never_copied():
    net = make()
    net._graphs._entries["fake"] = (torch.zeros(1), None, torch.zeros(1))  # stands in for a captured graph
    net.eval()
    assert len(net._graphs) == 1  # eval keeps them (nnU-Net's predictor calls eval() once)
    assert len(copy.deepcopy(net)._graphs) == 0
    assert len(pickle.loads(pickle.dumps(net))._graphs) == 0
    net.to("cpu")  # nnU-Net's predictor moves the network to its device before every case: nothing moves
    assert len(net._graphs) == 1
    net.train()
    assert len(net._graphs) == 0
    net._graphs._entries["fake"] = (torch.zeros(1), None, torch.zeros(1))
    net.to(torch.float64)  # the parameters move: the graphs would read freed memory
    assert len(net._graphs) == 0


def test_environment_switch_turns_graphs_off_and_names_a_bad_value(monkeypatch):
    assert graphs_allowed({}) and graphs_allowed({"CSM_CUDA_GRAPHS": "1"})
    assert not graphs_allowed({"CSM_CUDA_GRAPHS": "0"}) and not graphs_allowed({"CSM_CUDA_GRAPHS": "off"})
    with pytest.raises(ValueError, match="CSM_CUDA_GRAPHS='maybe' must be 1 .* or 0"):
        graphs_allowed({"CSM_CUDA_GRAPHS": "maybe"})
    monkeypatch.setenv("CSM_CUDA_GRAPHS", "0")
    assert make()._graphs.disabled  # read when the network is built (nnUNetv2_predict builds it per process)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16])
def test_graph_replay_equals_eager_on_cuda(amp):
    """On a GPU under inference mode and autocast, as nnU-Net's predictor runs it: the replayed graph gives the
    eager logits for new inputs (complete and with a series missing), outputs are copies the caller may modify,
    and deep supervision gets its own graph."""
    net = make().cuda()
    xs = [torch.randn(1, 4, *PATCH, device="cuda") for _ in range(3)]
    xs[2][:, 0] = 0.0
    with torch.inference_mode(), torch.autocast("cuda", dtype=amp):
        for x in xs:
            graphed = net(x)
            eager = net.forward_eager(x)
            assert torch.allclose(graphed.float(), eager.float(), atol=3e-2, rtol=3e-2)
        assert len(net._graphs) == 1 and not net._graphs.disabled
        reference = net(xs[0])
        first = net(xs[0])
        first += 100.0  # nnU-Net's predictor accumulates into the returned tensor: it must be a copy
        assert float((net(xs[0]).float() - reference.float()).abs().max()) < 1.0
        net.to("cuda")  # as the predictor does before every case: the graph stays
        assert len(net._graphs) == 1
        net.deep_supervision = True
        outs = net(xs[1])
        assert isinstance(outs, list) and len(outs) == net.num_levels and len(net._graphs) == 2
    with torch.no_grad():  # no inference mode: another graph
        net.deep_supervision = False
        net(xs[0])
    assert len(net._graphs) == 2  # at most max_graphs kept
    net.train()
    assert len(net._graphs) == 0
