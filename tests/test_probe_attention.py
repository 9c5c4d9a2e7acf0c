"""benchmarks/probe_attention.py: the attention it reports must be the attention the network computes."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
probe = pytest.importorskip("probe_attention")


@pytest.mark.parametrize("preset,patch", [("tiny8", (32, 16, 16)), ("PrimusS", (16, 16, 16))])
def test_recomputed_attention_reproduces_each_blocks_output(preset, patch):
    """The weights, applied to the block's own values, give the attention module's output (plain ViT blocks and
    Primus blocks with rotary codes and separate q/k/v projections)."""
    from csm_nnunet.network import rope_for

    torch.manual_seed(0)
    net = probe.pe.build_encoder(["t1", "t1ce", "t2"], patch, preset, 8, False)
    x, _, groups = net._prepare_inputs(torch.randn(1, 3, *patch), None)
    attn = net.eva.blocks[1].attn
    outputs = []
    hook = attn.register_forward_hook(lambda _m, _a, out: outputs.append(out))
    with probe.captured_inputs(net.eva.blocks) as inputs:
        net.forward_encoder(x, groups, (2,))
    hook.remove()
    h, n = inputs[1], net.num_patches
    rope = rope_for(net.eva, torch.arange(3 * n)[None] % n)
    w = probe.attention_weights(attn, h, rope)
    B, T, C = h.shape
    if attn.qkv is not None:
        bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = torch.nn.functional.linear(h, attn.qkv.weight, bias if bias is not None else attn.qkv.bias)
        v = qkv.reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)[2]
    else:
        v = attn.v_proj(h).reshape(B, T, attn.num_heads, -1).transpose(1, 2)
    rebuilt = attn.proj(attn.norm((w @ v).transpose(1, 2).reshape(B, T, C)))
    torch.testing.assert_close(rebuilt, outputs[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w.sum(-1), torch.ones(B, attn.num_heads, T))


def zero_query_key(blocks: torch.nn.ModuleList) -> None:
    """Zero every block's query and key projections: every attention logit is then 0 (uniform attention)."""
    for blk in blocks:
        with torch.no_grad():
            if blk.attn.qkv is not None:
                blk.attn.qkv.weight[: 2 * blk.attn.qkv.weight.shape[1]].zero_()
            else:
                for proj in (blk.attn.q_proj, blk.attn.k_proj):
                    proj.weight.zero_()
            for bias in (blk.attn.q_bias, blk.attn.k_bias, getattr(blk.attn.q_proj, "bias", None),
                         getattr(blk.attn.k_proj, "bias", None)):
                if bias is not None:
                    bias.zero_()


def test_relations_split_every_query_and_zero_logits_measure_uniform():
    masks = probe.relation_masks(3, (2, 3, 2))
    T = 3 * 12
    parts = sum(masks[r].int() for r in probe.RELATIONS[:4])
    assert bool((parts == 1).all())  # every (query, key) pair in exactly one of the four relations
    assert masks["same position, other series"].sum(-1).unique().tolist() == [2]
    assert bool((masks["same series, neighbour positions"] <= masks["same series, other positions"]).all())
    # with zero query/key projections every logit is 0: the measured masses must be uniform attention's
    torch.manual_seed(0)
    net = probe.pe.build_encoder(["a", "b", "c"], (16, 24, 16), "tiny8", 8, False).eval()
    zero_query_key(net.eva.blocks)
    blocks = probe.attention_mass(net, np.random.default_rng(0).normal(size=(2, 3, 16, 24, 16)).astype(np.float32),
                                  masks)
    for block in blocks:
        assert block["same position, other series"] == pytest.approx(2 / T, abs=1e-4)
        assert block["same series, other positions"] == pytest.approx(11 / T, abs=1e-4)
        assert block["largest weight"] == pytest.approx(1 / T, abs=1e-4)
        assert block["most-attended key"] == pytest.approx(1 / T, abs=1e-4)


def test_decoder_attention_of_a_pretraining_checkpoint():
    from csm_nnunet.network import CSMMaskedAutoencoder

    torch.manual_seed(0)
    net = CSMMaskedAutoencoder(["a", "b", "c", "d"], (16, 16, 24), "tiny8")
    checkpoint = {"csm_network": net.config(), "network_weights": net.state_dict()}
    images = np.random.default_rng(0).normal(size=(2, 4, 16, 16, 24)).astype(np.float32)
    blocks, _ = probe.masked_attention(checkpoint, images)
    assert len(blocks) == net.preset.decoder_depth
    for block in blocks:
        assert 0.0 <= block["visible, same position, other series"] <= block["any visible"] <= 1.0
        assert 0.0 < block["uniform: any visible"] < 0.5  # 87.5 % of each series hidden, some series whole


@pytest.mark.parametrize("kwargs,partners", [({}, 0.125 * 8 / 6), ({"mask_ratio": 0.5}, 0.5 * 8 / 6),
                                             ({"same_position": True}, 8 / 6),
                                             ({"series_masking": "off"}, 0.125 * 3)])
def test_mask_pairing_counts_same_position_partners_as_the_masks_give_them(kwargs, partners):
    """4 series, 64 patches: k ~ U{1,2,3} series hidden, a fraction f of each shown series kept, so a visible token
    has f * (shown - 1) partners; pooled over visible tokens (weight shown = 4 - k): f * (3*2 + 2*1 + 1*0) / 6.
    With one mask for all series (same position) f = 1; with no series hidden, 3 partners at f."""
    from csm_nnunet.masking import CrossSeriesMasker

    stats = probe.mask_pairing(CrossSeriesMasker(**kwargs), 4, 64, draws=3000)
    assert stats["visible partners"] == pytest.approx(partners, rel=0.05)
    if kwargs.get("same_position"):  # a hidden position is hidden in every shown series: only hidden series fetch
        assert 0.0 < stats["hidden with a visible partner"] < 0.2
    else:
        assert 0.0 < stats["hidden with a visible partner"] < 1.0


def test_encoder_attention_on_training_masks_is_uniform_without_logits_and_matches_its_masks():
    """On the visible tokens of training-style masks: zero query/key projections give exactly uniform attention
    (entropy 1, largest weight 1x, same-position mass = its uniform share); trained-looking random weights give a
    largest weight above uniform. Same-position masks (SamePositionMask) show every visible position in all shown
    series, so the uniform same-position share is larger than under independent masks."""
    from csm_nnunet.network import CSMMaskedAutoencoder

    torch.manual_seed(0)
    net = CSMMaskedAutoencoder(["a", "b", "c", "d"], (16, 16, 24), "tiny8")
    images = np.random.default_rng(0).normal(size=(3, 4, 16, 16, 24)).astype(np.float32)
    checkpoint = {"csm_network": net.config(), "network_weights": net.state_dict()}
    for block in probe.masked_attention(checkpoint, images)[1]:
        assert block["largest weight x uniform"] > 1.0 and 0.0 < block["entropy / log(visible)"] < 1.0
    zero_query_key(net.eva.blocks)
    shares = {}
    for same_position in (False, True):
        checkpoint = {"csm_network": net.config(), "network_weights": net.state_dict(),
                      "csm_masking": {"mask_ratio": 0.5, "same_position": same_position}}
        _, blocks = probe.masked_attention(checkpoint, images)
        assert len(blocks) == net.preset.depth
        for block in blocks:
            assert block["largest weight x uniform"] == pytest.approx(1.0, abs=1e-4)
            assert block["entropy / log(visible)"] == pytest.approx(1.0, abs=1e-4)
            assert block["same position, other series"] == pytest.approx(
                block["uniform: same position, other series"], abs=1e-4)
        shares[same_position] = blocks[0]["uniform: same position, other series"]
    assert shares[True] > shares[False] > 0.0


def test_weight_growth_is_one_for_a_fresh_network_and_sees_a_grown_projection():
    from csm_nnunet.network import CSMMaskedAutoencoder

    torch.manual_seed(3)
    net = CSMMaskedAutoencoder(["a", "b"], (16, 16, 16), "tiny8")
    checkpoint = {"csm_network": net.config(), "network_weights": net.state_dict()}
    growth = probe.weight_growth(checkpoint)
    assert len(growth) == net.preset.depth
    for block in growth:  # another draw of the same initialisation: the RMS ratios are 1 up to sampling noise
        assert set(block) >= {"query", "key", "value", "attention output", "mlp in", "mlp out"}
        assert all(0.9 < v < 1.1 for v in block.values()), block
    with torch.no_grad():
        attn = net.eva.blocks[1].attn
        (attn.k_proj.weight if attn.qkv is None else attn.qkv.weight).mul_(3.0)
    grown = probe.weight_growth({"csm_network": net.config(), "network_weights": net.state_dict()})[1]
    assert 2.7 < grown["key"] < 3.3 and 0.9 < grown["query"] < (3.3 if attn.qkv is not None else 1.1)
