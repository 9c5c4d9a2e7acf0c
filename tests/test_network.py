"""Shapes, token counts and loss semantics of the series-tokenized masked autoencoder."""

import pytest
import torch

from csm_nnunet.masking import CrossSeriesMasker
from csm_nnunet.network import PRESETS, CSMMaskedAutoencoder, sincos_pos_embed_3d

SERIES = ["T1", "T1ce", "T2", "FLAIR"]


def make(patch=(32, 48, 32), **kw) -> CSMMaskedAutoencoder:
    torch.manual_seed(0)
    return CSMMaskedAutoencoder(SERIES, patch, "tiny", **kw)


def test_patchify_roundtrip_and_token_order():
    net = make()
    x = torch.randn(2, 4, 32, 48, 32)
    p = net.patchify(x)
    assert p.shape == (2, 4, 2 * 3 * 2, 16 ** 3)
    assert torch.equal(net.unpatchify(p), x)
    # token 1 of series 2 is the block at grid (0, 0, 1)
    assert torch.equal(p[1, 2, 1].reshape(16, 16, 16), x[1, 2, :16, :16, 16:32])
    fused = make(fused=True)
    assert fused.patchify(x).shape == (2, 1, 12, 4 * 16 ** 3)
    assert torch.equal(fused.unpatchify(fused.patchify(x)), x)


def test_encoder_sees_only_visible_tokens():
    net = make()
    x = torch.randn(3, 4, 32, 48, 32)
    mask = CrossSeriesMasker(0.5)(3, 4, net.num_patches, generator=torch.Generator().manual_seed(0))
    seen = []
    hook = net.eva.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    out = net(x, mask)
    hook.remove()
    expected = mask.visible.flatten(1).sum(1)
    assert torch.equal(out.num_visible, expected)
    assert seen[0] == (3, int(expected.max()), PRESETS["tiny"].embed_dim)
    assert out.pred.shape == (3, 4, 12, 16 ** 3) and out.loss.ndim == 0
    # the dense variant encodes every present token
    dense = make(sparse_encoder=False)
    seen.clear()
    hook = dense.eva.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    dense(x, mask)
    hook.remove()
    assert seen[0][1] == 4 * 12


def test_padding_does_not_change_a_case():
    """A case's encoding must not depend on how many tokens the other cases of the batch have."""
    net = make().eval()
    x = torch.randn(2, 4, 32, 48, 32)
    mask = CrossSeriesMasker(0.5)(2, 4, net.num_patches, generator=torch.Generator().manual_seed(1))
    assert mask.visible[0].sum() != mask.visible[1].sum(), "the two cases must differ in token count (padding)"
    with torch.no_grad():
        both = net(x, mask).pred[0]
        from csm_nnunet.masking import SeriesMask

        single = SeriesMask(*(t[:1] for t in (mask.visible, mask.scored, mask.hidden_series, mask.present)))
        alone = net(x[:1], single).pred[0]
    assert torch.allclose(both, alone, atol=1e-5)


def test_loss_counts_only_scored_tokens():
    net = make()
    x = torch.randn(2, 4, 32, 48, 32)
    mask = CrossSeriesMasker()(2, 4, net.num_patches, generator=torch.Generator().manual_seed(2))
    out = net(x, mask)
    per_token = ((out.pred - out.target) ** 2).mean(-1)
    assert torch.allclose(out.loss, per_token[mask.scored].mean(), rtol=1e-5)
    # scoring nothing gives zero loss rather than NaN
    assert net.forward_loss(out.target, out.pred, torch.zeros_like(mask.scored)).item() == 0.0


def test_norm_pix_targets_are_normalised_per_patch():
    net = make(norm_pix_loss=True)
    x = torch.randn(1, 4, 32, 48, 32) * 5 + 3
    t = net.target_patches(net.patchify(x))
    assert torch.allclose(t.mean(-1), torch.zeros(1), atol=1e-4)
    assert torch.allclose(t.std(-1), torch.ones(1), atol=1e-2)


def test_absent_series_do_not_influence_the_present_ones():
    net = make().eval()
    x = torch.randn(1, 4, 32, 48, 32)
    present = torch.tensor([[True, True, False, True]])
    mask = CrossSeriesMasker(0.5)(1, 4, net.num_patches, present=present, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = net(x, mask).pred
        x2 = x.clone()
        x2[:, 2] = 1000.0  # garbage in the absent series must not leak anywhere
        b = net(x2, mask).pred
    assert torch.allclose(a[:, [0, 1, 3]], b[:, [0, 1, 3]], atol=1e-5)


def test_overfits_one_batch():
    """The reconstruction loss must fall when the same batch is seen repeatedly (learning works at all)."""
    net = make()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    x = torch.randn(2, 4, 32, 48, 32, generator=torch.Generator().manual_seed(0)).cumsum(2).cumsum(3) / 30
    mask = CrossSeriesMasker()(2, 4, net.num_patches, generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = net(x, mask).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("name", ["PrimusS", "PrimusB", "PrimusM", "PrimusL"])
def test_primus_presets_match_nnunet_primus(name):
    from dynamic_network_architectures.architectures.primus import _PRIMUS_CONFIGS

    p = PRESETS[name]
    ref = _PRIMUS_CONFIGS[name[-1]]
    assert (p.embed_dim, p.depth, p.num_heads, p.token_size) == (ref["embed_dim"], ref["eva_depth"],
                                                                  ref["eva_numheads"], 8)


def test_primus_encoder_keys_load_into_nnunet_primus():
    """Our encoder's ``eva.*`` tensors have the names and shapes of nnU-Net's Primus encoder."""
    from dynamic_network_architectures.architectures.primus import Primus

    net = CSMMaskedAutoencoder(SERIES, (32, 32, 32), "PrimusS")
    primus = Primus(4, 396, (8, 8, 8), 3, 12, 6, (32, 32, 32), scale_attn_inner=True, init_values=0.1)
    ours = {k: v.shape for k, v in net.state_dict().items() if k.startswith("eva.")}
    theirs = {k: v.shape for k, v in primus.state_dict().items() if k.startswith("eva.")}
    assert ours == theirs


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="token size"):
        CSMMaskedAutoencoder(SERIES, (40, 48, 32), "tiny")
    with pytest.raises(ValueError, match=">= 8"):
        CSMMaskedAutoencoder(SERIES, (32, 32, 32), "tiny", token_size=4)
    with pytest.raises(ValueError, match="3D"):
        CSMMaskedAutoencoder(SERIES, (32, 32), "tiny")
    with pytest.raises(ValueError, match="unknown ViT preset"):
        CSMMaskedAutoencoder(SERIES, (32, 32, 32), "huge")
    net = make()
    with pytest.raises(ValueError, match="3 channels"):
        net.patchify(torch.randn(1, 3, 32, 48, 32))


def test_sincos_position_code_is_unique_per_token():
    pe = sincos_pos_embed_3d((3, 4, 5), 96)
    assert pe.shape == (60, 96)
    assert torch.cdist(pe, pe).add(torch.eye(60)).min() > 1e-3


def test_from_config_rebuilds_the_network_config_describes():
    """``from_config`` is ``config``'s inverse (reconstruct and the probes build checkpoints' networks with it)."""
    for kw in ({}, {"fused": True, "norm_pix_loss": True}, {"sparse_encoder": False}):
        net = CSMMaskedAutoencoder(SERIES, (32, 32, 32), "tiny", **kw)
        again = CSMMaskedAutoencoder.from_config(net.config())
        assert again.config() == net.config()
        assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
