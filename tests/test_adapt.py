"""Adaptation of pretraining checkpoints (CSM and channel-fused MAE) into the segmentation network."""

import pytest
import torch
import torch.nn.functional as F

from csm_nnunet.adapt import adapt_encoder_state, load_pretrained_checkpoint
from csm_nnunet.network import CSMMaskedAutoencoder, ViTPreset, patchify_groups
from csm_nnunet.segmentation import CSMSegmentationNetwork, is_encoder_key

SERIES = ["T1", "T1ce", "T2", "FLAIR"]
PER_SERIES = ("patch_embed_weight", "patch_embed_bias", "series_embed")


def pretrained(fused: bool = False, patch=(32, 32, 32)) -> CSMMaskedAutoencoder:
    torch.manual_seed(1)
    mae = CSMMaskedAutoencoder(SERIES, patch, "tiny", fused=fused)
    with torch.no_grad():  # move every tensor away from any initialisation a fresh network could share
        for p in mae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return mae


def seg(series=SERIES, patch=(32, 32, 32), preset="tiny", **kw) -> CSMSegmentationNetwork:
    torch.manual_seed(2)
    return CSMSegmentationNetwork(len(series), 3, patch, preset, base_channels=8, **kw)


def test_same_series_copies_the_encoder_and_keeps_the_decoder_fresh():
    mae, net = pretrained(), seg()
    fresh = {k: v.clone() for k, v in net.state_dict().items()}
    # a torch.compile'd network's keys carry "_orig_mod."; adaptation must see through it
    state = {"_orig_mod." + k: v for k, v in mae.state_dict().items()}
    report = adapt_encoder_state(state, mae.config(), net, SERIES)
    net.load_state_dict(report.state_dict, strict=True)
    ref = mae.state_dict()
    for k, v in net.state_dict().items():
        if is_encoder_key(k):
            assert torch.equal(v, ref[k]), k
        else:
            assert torch.equal(v, fresh[k]), k
    assert sorted(report.loaded) == sorted(net.encoder_state_keys())
    assert report.resampled == [] and report.series_new == [] and report.series_unused == []
    assert sorted(report.fresh) == sorted(k for k in fresh if not is_encoder_key(k))
    assert report.series_matched == {"T1": 0, "T1ce": 1, "T2": 2, "FLAIR": 3}
    assert "decoder_pred.weight" in report.ignored and "encoder_mask_token" in report.ignored
    text = report.format()
    assert "loaded" in text and "T1ce <- pretrained #1" in text


def test_other_patch_grid_resamples_pos_embed():
    mae = pretrained()  # grid 2x2x2
    net = seg(patch=(48, 32, 32))  # grid 3x2x2
    report = adapt_encoder_state(mae.state_dict(), mae.config(), net, SERIES)
    assert report.resampled == ["eva.pos_embed"] and "eva.pos_embed" not in report.loaded
    net.load_state_dict(report.state_dict, strict=True)
    src = mae.eva.pos_embed.detach().reshape(2, 2, 2, -1)
    dst = net.eva.pos_embed.detach().reshape(3, 2, 2, -1)
    # trilinear (align_corners=False) from 2 to 3 samples x at -1/6 (clamped to 0), 1/2 and 7/6 (clamped to 1)
    assert torch.allclose(dst[0], src[0], atol=1e-6)
    assert torch.allclose(dst[1], (src[0] + src[1]) / 2, atol=1e-6)
    assert torch.allclose(dst[2], src[1], atol=1e-6)
    assert torch.equal(net.eva.blocks[0].attn.q_proj.weight, mae.eva.blocks[0].attn.q_proj.weight)
    # an equal grid copies the table bit for bit
    same = adapt_encoder_state(mae.state_dict(), mae.config(), seg(), SERIES)
    assert same.resampled == [] and torch.equal(same.state_dict["eva.pos_embed"], mae.eva.pos_embed)


def test_series_are_matched_by_name():
    mae = pretrained()
    target = ["T1ce", "FLAIR", "ADC"]
    net = seg(series=target)
    fresh = {k: net.state_dict()[k].clone() for k in PER_SERIES}
    report = adapt_encoder_state(mae.state_dict(), mae.config(), net, target)
    net.load_state_dict(report.state_dict, strict=True)
    assert report.series_matched == {"T1ce": 1, "FLAIR": 3}
    assert report.series_new == ["ADC"] and report.series_unused == ["T1", "T2"]
    for key in PER_SERIES:
        got, ref = net.state_dict()[key], mae.state_dict()[key]
        assert torch.equal(got[0], ref[1]) and torch.equal(got[1], ref[3]), key
        assert torch.equal(got[2], fresh[key][2]), key
        assert key in report.loaded
    text = report.format()
    assert "FLAIR <- pretrained #3" in text and "ADC" in text and "T2" in text
    # a renamed series can be paired explicitly
    renamed = adapt_encoder_state(mae.state_dict(), mae.config(), seg(series=["T1POST", "T2"]), ["T1POST", "T2"],
                                  series_map={"T1POST": "T1ce"})
    assert renamed.series_matched == {"T1POST": 1, "T2": 2}


def test_fused_checkpoint_is_split_per_series():
    mae = pretrained(fused=True)
    net = seg()
    fresh_series_embed = net.series_embed.detach().clone()
    report = adapt_encoder_state(mae.state_dict(), mae.config(), net, SERIES)
    net.load_state_dict(report.state_dict, strict=True)
    assert "series_embed" in report.fresh and "patch_embed_weight" in report.loaded
    assert torch.equal(net.series_embed, fresh_series_embed)
    assert any("bias / 4" in n for n in report.notes)
    # the fused stem as a convolution over the stacked channels ...
    x = torch.randn(2, 4, 32, 32, 32)
    t, D = 16, 96
    w = mae.patch_embed_weight.detach()[0].reshape(D, 4, t, t, t)
    fused = F.conv3d(x, w, mae.patch_embed_bias.detach()[0], stride=t)  # [B, D, 2, 2, 2]
    # ... equals the sum over series of the per-series projections
    with torch.no_grad():
        patches = patchify_groups(x, 4, t, net.grid)  # [B, S, N, t^3]
        per_series = torch.einsum("bsnp,sdp->bsnd", patches, net.patch_embed_weight) \
            + net.patch_embed_bias[None, :, None]
    summed = per_series.sum(1).transpose(1, 2).reshape(2, D, 2, 2, 2)
    assert torch.allclose(summed, fused, atol=1e-4)
    assert torch.allclose(net.patch_embed_bias, mae.patch_embed_bias.detach().expand(4, -1) / 4)


def test_different_encoder_raises():
    mae = pretrained()
    wide = ViTPreset("wide", 16, 192, 4, 4, 64, 2, 4)
    with pytest.raises(ValueError, match=r"embed_dim=96 \(preset 'tiny'\).*preset='tiny'"):
        adapt_encoder_state(mae.state_dict(), mae.config(), seg(preset=wide), SERIES)
    deep = ViTPreset("deep", 16, 96, 6, 4, 64, 2, 4)
    with pytest.raises(ValueError, match="depth=4"):
        adapt_encoder_state(mae.state_dict(), mae.config(), seg(preset=deep), SERIES)
    with pytest.raises(ValueError, match="token_size=16"):
        adapt_encoder_state(mae.state_dict(), mae.config(), seg(token_size=8), SERIES)
    with pytest.raises(ValueError, match="4 input series"):
        adapt_encoder_state(mae.state_dict(), mae.config(), seg(), SERIES[:3])
    state = {k: v for k, v in mae.state_dict().items() if k != "eva.norm.weight"}
    with pytest.raises(ValueError, match="lacks encoder tensor 'eva.norm.weight'"):
        adapt_encoder_state(state, mae.config(), seg(), SERIES)


def test_load_checkpoint_file_and_clear_errors(tmp_path):
    mae = pretrained()
    good = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": mae.state_dict(), "csm_network": mae.config(), "trainer_name": "CSMPretrainer"},
               good)
    net, logged = seg(), []
    report = load_pretrained_checkpoint(str(good), net, SERIES, log=logged.append)
    assert torch.equal(net.eva.pos_embed, mae.eva.pos_embed) and report.format() in logged

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_pretrained_checkpoint(str(truncated), seg(), SERIES, log=None)

    plain = tmp_path / "nnunet.pth"
    torch.save({"network_weights": mae.state_dict(), "trainer_name": "nnUNetTrainer"}, plain)
    with pytest.raises(ValueError, match="not a csm-nnunet pretraining checkpoint.*nnUNetTrainer"):
        load_pretrained_checkpoint(str(plain), seg(), SERIES, log=None)
    with pytest.raises(FileNotFoundError):
        load_pretrained_checkpoint(str(tmp_path / "missing.pth"), seg(), SERIES, log=None)


def test_fused_target_loads_only_a_fused_checkpoint_with_the_same_channels():
    mae = pretrained(fused=True)
    net = seg(fused_tokens=True)
    report = adapt_encoder_state(mae.state_dict(), mae.config(), net, SERIES)
    net.load_state_dict(report.state_dict, strict=True)
    ref = mae.state_dict()
    for k, v in net.state_dict().items():
        if is_encoder_key(k):
            assert torch.equal(v, ref[k]), k
    assert any("copied as is" in n for n in report.notes)
    with pytest.raises(ValueError, match="series-tokenized over"):
        adapt_encoder_state(pretrained().state_dict(), pretrained().config(), seg(fused_tokens=True), SERIES)
    reordered = SERIES[::-1]
    with pytest.raises(ValueError, match="same channels in the same order"):
        adapt_encoder_state(mae.state_dict(), mae.config(), seg(fused_tokens=True), reordered)
