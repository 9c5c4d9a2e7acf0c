"""Shapes, missing-series semantics and learnability of the segmentation fine-tuning network."""

import pytest
import torch
import torch.nn.functional as F

from csm_nnunet.network import CSMMaskedAutoencoder
from csm_nnunet.segmentation import CSMSegmentationNetwork, is_encoder_key, make_fusion_norm

SERIES = ["T1", "T1ce", "T2", "FLAIR"]
PATCH = (32, 48, 32)


def make(num_series: int = 4, patch=PATCH, preset: str = "tiny", **kw) -> CSMSegmentationNetwork:
    torch.manual_seed(0)
    kw.setdefault("base_channels", 8)  # keep the full-resolution convolutions cheap on a 2-core CPU
    return CSMSegmentationNetwork(num_series, 3, patch, preset, **kw)


def test_output_shapes_with_and_without_deep_supervision():
    net = make()
    assert net.tap_depths == (1, 2, 3, 4) and net.num_levels == 4
    x = torch.randn(2, 4, *PATCH)
    with torch.no_grad():
        assert net(x).shape == (2, 3, *PATCH)
        net.decoder.deep_supervision = True  # what nnU-Net's set_deep_supervision_enabled toggles
        outs = net(x)
    assert isinstance(outs, list) and len(outs) == 4
    for out, scale in zip(outs, net.deep_supervision_scales()):
        assert out.shape == (2, 3, *(int(p * s) for p, s in zip(PATCH, scale)))
    assert [o.shape[2] for o in outs] == [32, 16, 8, 4]  # highest resolution first


def test_primus_token8_has_one_fewer_stage():
    net = make(num_series=2, patch=(32, 32, 32), preset="PrimusS", deep_supervision=True)
    assert net.num_levels == 3 and net.tap_depths == (4, 8, 12)
    with torch.no_grad():
        outs = net(torch.randn(1, 2, 32, 32, 32))
    assert [tuple(o.shape) for o in outs] == [(1, 3, 32, 32, 32), (1, 3, 16, 16, 16), (1, 3, 8, 8, 8)]


def test_encoder_keys_and_shapes_equal_the_pretraining_encoder():
    net = make(patch=(32, 32, 32))
    mae = CSMMaskedAutoencoder(SERIES, (32, 32, 32), "tiny")
    ours = {k: v.shape for k, v in net.state_dict().items() if is_encoder_key(k)}
    theirs = {k: v.shape for k, v in mae.state_dict().items() if is_encoder_key(k)}
    assert ours == theirs and sorted(net.encoder_state_keys()) == sorted(ours)
    assert not any(is_encoder_key(k) for k in net.state_dict() if k.startswith(("fusions.", "decoder.")))


@pytest.mark.parametrize("fusion,fusion_norm", [("attention", "layer"), ("concat", "layer"),
                                                ("attention", "instance"), ("concat", "instance")])
def test_absent_series_do_not_influence_the_output(fusion, fusion_norm):
    net = make(fusion=fusion, fusion_norm=fusion_norm).eval()
    x = torch.randn(1, 4, *PATCH)
    present = torch.tensor([[True, True, False, True]])
    x2 = x.clone()
    x2[:, 2] = torch.randn(*PATCH) * 1000.0
    x2[:, 2, :4] = float("nan")  # even non-finite garbage in a missing acquisition must not leak
    with torch.no_grad():
        a, b = net(x, present), net(x2, present)
        c = net(x)  # the same series present changes the output
    assert torch.isfinite(b).all()
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-3)


def test_encoder_drops_absent_tokens():
    net = make()
    seen = []
    hook = net.eva.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    with torch.no_grad():
        net(torch.randn(2, 4, *PATCH), torch.tensor([[True, False, False, True], [False, False, True, False]]))
    hook.remove()
    assert seen[0] == (2, 2 * net.num_patches, 96)  # the longest case: 2 series x 12 patches, no zero tokens


@pytest.mark.parametrize("fusion_norm", ["layer", "instance"])
def test_case_output_does_not_depend_on_batch_padding(fusion_norm):
    net = make(fusion_norm=fusion_norm).eval()
    x = torch.randn(2, 4, *PATCH)
    present = torch.tensor([[True, True, True, True], [False, True, False, False]])
    with torch.no_grad():
        both = net(x, present)
        first = net(x[:1], present[:1])
        second = net(x[1:], present[1:])
    assert torch.allclose(both[0], first[0], atol=1e-4)
    assert torch.allclose(both[1], second[0], atol=1e-4)


def test_instance_fusion_norm_keeps_what_layernorm_removes():
    """Tokens that differ only in how far they lie along one direction (how pretrained taps look: most variance on
    one axis): a per-token LayerNorm maps them all to one vector, the per-channel instance norm keeps them apart and
    in order. This is the difference behind ``fusion_norm="instance"``."""
    torch.manual_seed(0)
    direction = torch.randn(96)
    tokens = (torch.linspace(1.0, 5.0, 12)[:, None] * direction)[None, None]  # [B=1, S=1, N=12, D=96]
    with torch.no_grad():
        layer = make_fusion_norm("layer", 96)(tokens)[0, 0]
        inst = make_fusion_norm("instance", 96)(tokens)[0, 0]
    assert torch.allclose(layer[0], layer[-1], atol=1e-4)
    along = inst @ direction  # position along the direction after normalisation
    assert (along[1:] > along[:-1]).all() and float(along[-1] - along[0]) > 1.0
    with pytest.raises(ValueError, match="fusion_norm must be one of"):
        make(fusion_norm="batch")


@pytest.mark.parametrize("fusion_norm", ["layer", "instance"])
def test_overfits_a_synthetic_blob_segmentation(fusion_norm):
    """Cross-entropy must fall on a fixed 2-class blob task (gradients reach encoder, fusion and decoder).
    8^3 tokens on a 24^3 patch keep the full-resolution convolutions cheap."""
    torch.manual_seed(0)
    net = CSMSegmentationNetwork(2, 2, (24, 24, 24), "tiny", token_size=8, base_channels=8, fusion_norm=fusion_norm)
    grid = torch.stack(torch.meshgrid(*[torch.arange(24.0)] * 3, indexing="ij"))
    label = (((grid - torch.tensor([9.0, 13.0, 11.0])[:, None, None, None]) ** 2).sum(0) < 25).long()[None]
    g = torch.Generator().manual_seed(0)
    x = torch.stack([label[0] * 2.0 + 0.5 * torch.randn(24, 24, 24, generator=g),
                     torch.randn(24, 24, 24, generator=g)])[None]
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), label)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    assert net.patch_embed_weight.grad is not None and net.fusions[0].proj.weight.grad is not None
    assert net.fusions[0].norm.weight.grad is not None


@pytest.mark.parametrize("task", ["segmentation", "fused-segmentation", "classification"])
def test_frozen_encoder_start_moves_only_fusion_and_decoder(task: str):
    """The fine-tuning trainers' parameter groups and schedule with ``frozen_steps`` (``CSMSegTrainer_DecoderFirst``,
    its fused-token variant, ``CSMClassifierTrainer_HeadFirst``): an AdamW step (fused where available, weight decay
    on) during the frozen epochs leaves every encoder tensor bit-identical and changes the fresh parts (fusion/decoder,
    or the head); after the freeze the encoder moves too."""
    from csm_nnunet.classification import CSMClassificationNetwork
    from csm_nnunet.optim import WarmupCosineLR, adamw, finetune_param_groups

    x = torch.randn(2, 2, 32, 32, 32)
    if task.endswith("segmentation"):  # fused: the MAE encoder's one token per patch (mae-nodrop-decfirst)
        net = make(num_series=2, patch=(32, 32, 32), deep_supervision=False, fused_tokens=task.startswith("fused"))
        y = torch.randint(0, 3, (2, 32, 32, 32))
    else:
        torch.manual_seed(0)
        net, y = CSMClassificationNetwork(2, 2, (32, 32, 32), "tiny"), torch.tensor([0, 1])
    groups = finetune_param_groups(net, 0.01)
    assert {is_encoder_key(n) for n, _ in net.named_parameters()} == {True, False}
    enc_ids = {id(p) for g in groups if g["encoder"] for p in g["params"]}
    assert enc_ids == {id(p) for n, p in net.named_parameters() if is_encoder_key(n)}
    opt = adamw(groups, lr=1e-2)
    sched = WarmupCosineLR(opt, 1e-2, max_steps=4, warmup_steps=0, frozen_steps=1)
    for step in range(2):
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        sched.step(step)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        moved = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
        assert any(not is_encoder_key(n) for n in moved)
        if step == 0:
            assert not any(is_encoder_key(n) for n in moved), sorted(n for n in moved if is_encoder_key(n))
        else:
            assert "patch_embed_weight" in moved and any(n.startswith("eva.blocks.") for n in moved)


def test_bad_inputs_are_named():
    net = make()
    with pytest.raises(ValueError, match="S=4"):
        net(torch.randn(1, 3, *PATCH))
    with pytest.raises(ValueError, match="patch size"):
        net(torch.randn(1, 4, 32, 32, 32))
    with pytest.raises(ValueError, match="present must have shape"):
        net(torch.randn(1, 4, *PATCH), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"case\(s\) \[1\] .* no present series"):
        net(torch.randn(2, 4, *PATCH), torch.tensor([[True] * 4, [False] * 4]))
    with pytest.raises(ValueError, match="power of two"):
        CSMSegmentationNetwork(4, 3, (36, 36, 36), "tiny", token_size=12)
    with pytest.raises(ValueError, match="multiple of the token size"):
        CSMSegmentationNetwork(4, 3, (40, 48, 32), "tiny")
    with pytest.raises(ValueError, match="fusion must be one of"):
        CSMSegmentationNetwork(4, 3, PATCH, "tiny", fusion="mean")
    with pytest.raises(ValueError, match="series_names has 3 entries"):
        CSMSegmentationNetwork(4, 3, PATCH, "tiny", series_names=SERIES[:3])
    with pytest.raises(ValueError, match="unknown ViT preset"):
        CSMSegmentationNetwork(4, 3, PATCH, "huge")


def test_presence_is_inferred_from_all_zero_series():
    """nnU-Net's predictor passes only windows: a series that is zero everywhere while another is not is absent."""
    from csm_nnunet.segmentation import infer_present

    x = torch.randn(3, 4, 8, 8, 8)
    x[0, 2] = 0  # missing series
    x[1] = 0  # background window: nothing to tell apart, keep all
    x[2, 1, :4] = 0  # partly zero is still present
    assert infer_present(x).tolist() == [[True, True, False, True], [True] * 4, [True] * 4]


def test_fused_tokens_baseline_has_one_token_per_patch_and_the_same_decoder():
    series, fused = make(), make(fused_tokens=True)
    assert fused.num_groups == 1 and tuple(fused.patch_embed_weight.shape) == (1, 96, 4 * 16 ** 3)
    assert tuple(series.patch_embed_weight.shape) == (4, 96, 16 ** 3)
    # everything after the stem and the fusion has identical shapes: the comparison changes only the tokens
    dec = {k: v.shape for k, v in series.state_dict().items() if k.startswith(("decoder.", "eva.blocks."))}
    assert dec == {k: v.shape for k, v in fused.state_dict().items() if k.startswith(("decoder.", "eva.blocks."))}
    x = torch.randn(2, 4, *PATCH)
    with torch.no_grad():
        out = fused(x)
    assert out.shape == (2, 3, *PATCH)
    # the fused stem is one convolution over the stacked series (channel-major within a token)
    t = 16
    with torch.no_grad():
        taps = fused.forward_encoder(x, torch.ones(2, 1, dtype=torch.bool), fused.tap_depths)
        ref = F.conv3d(x, fused.patch_embed_weight[0].reshape(96, 4, t, t, t), fused.patch_embed_bias[0], stride=t)
    assert len(taps) == 4 and taps[0].shape == (2, 1, fused.num_patches, 96)
    patches = x.reshape(2, 4, 2, t, 3, t, 2, t).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(2, 12, 4 * t ** 3)
    emb = patches @ fused.patch_embed_weight[0].T + fused.patch_embed_bias[0]
    assert torch.allclose(emb.transpose(1, 2).reshape(2, 96, 2, 3, 2), ref, atol=1e-4)
    # a missing series is zeros inside the token (the paper's zero padding): an all-zero series equals its absence
    x0 = x.clone()
    x0[:, 1] = 0
    with torch.no_grad():
        assert torch.allclose(fused(x0), fused(x, torch.tensor([[True, False, True, True]] * 2)), atol=1e-5)


def test_same_position_bias_reaches_exactly_the_cross_series_pairs_of_each_block():
    """``same_position_bias``: every block's attention gets ``bias[block, head]`` between the tokens of one position
    in two series, nothing elsewhere, on top of the padding mask (absent series, shorter cases); at bias 0 the network
    is the one without it; gradients reach it; the CUDA-graph route (every token in place) agrees; it is a fresh
    (non-encoder) tensor without weight decay."""
    import math

    from csm_nnunet.optim import finetune_param_groups

    net = make(same_position_bias=True).eval()
    assert net.same_position_bias.shape == (4, 4) and not is_encoder_key("same_position_bias")
    assert torch.allclose(net.same_position_bias, torch.full((4, 4), math.log(net.num_patches)))
    groups = finetune_param_groups(net, 0.05)
    assert [g["weight_decay"] for g in groups if any(p is net.same_position_bias for p in g["params"])] == [0.0]
    with torch.no_grad():
        net.same_position_bias.copy_(torch.arange(16.0).reshape(4, 4))
    masks = []
    hooks = [blk.register_forward_pre_hook(lambda _m, _a, kw: masks.append(kw["attn_mask"]), with_kwargs=True)
             for blk in net.eva.blocks]
    x = torch.randn(2, 4, *PATCH)
    present = torch.tensor([[True, True, True, True], [True, False, True, False]])
    with torch.no_grad():
        out = net(x, present)
        alone = net(x[1:], present[1:])
    for hook in hooks:
        hook.remove()
    N = net.num_patches
    pos, series = torch.arange(4 * N) % N, torch.arange(4 * N) // N
    pairs = (pos[:, None] == pos[None]) & (series[:, None] != series[None])
    for depth, mask in enumerate(masks[:4]):
        assert mask.shape == (2, 4, 4 * N, 4 * N)
        for head in range(4):
            expected = torch.where(pairs, float(depth * 4 + head), 0.0)
            assert torch.equal(mask[0, head], expected)
            # the second case keeps series 0 and 2 (2N tokens first), then padding: -inf as keys
            assert torch.equal(mask[1, head, : 2 * N, : 2 * N], expected[: 2 * N, : 2 * N])
            assert bool(torch.isneginf(mask[1, head, :, 2 * N:]).all())
    assert torch.allclose(out[1], alone[0], atol=1e-4)  # a case's result does not depend on the batch
    with torch.no_grad():
        x2 = x.clone()
        x2[1, 1] = torch.randn(*PATCH) * 100  # an absent series' content must not matter, bias or not
        assert torch.allclose(net(x2, present)[1], out[1], atol=1e-4)
        taps = net.forward_encoder(*net._prepare_inputs(x, present)[::2], (2, 4))
        in_place = net.forward_encoder(*net._prepare_inputs(x, present)[::2], (2, 4), compact=False)
    for a, b in zip(taps, in_place):
        assert torch.allclose(a, b, atol=1e-4)
    # at bias 0 the same weights give the network without the bias
    plain = make()
    state = {k: v for k, v in net.state_dict().items() if k != "same_position_bias"}
    plain.load_state_dict(state)
    with torch.no_grad():
        net.same_position_bias.zero_()
        assert torch.allclose(net(x, present), plain.eval()(x, present), atol=1e-5)
    net.train()
    F.cross_entropy(net(x, present), torch.randint(0, 3, (2, *PATCH))).backward()
    assert net.same_position_bias.grad is not None and bool(net.same_position_bias.grad.abs().sum() > 0)
    with pytest.raises(ValueError, match="same_position_bias needs series tokens"):
        make(same_position_bias=True, fused_tokens=True)
