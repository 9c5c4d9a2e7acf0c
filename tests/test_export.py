"""export-primus: a CSM encoder pretrained with a Primus preset becomes -pretrained_weights that nnU-Net's own,
unmodified ``load_pretrained_weights`` accepts for its Primus networks."""

import pytest
import torch
from dynamic_network_architectures.architectures.primus import Primus
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

from csm_nnunet.export import find_checkpoint, primus_state_from_csm
from csm_nnunet.network import CSMMaskedAutoencoder

SERIES = ["T1", "T1ce", "T2", "FLAIR"]


def primus_s(channels: int, patch=(48, 32, 32)) -> Primus:
    # exactly what nnunetv2's nnUNet_Primus_S_Trainer builds
    return Primus(channels, 396, (8, 8, 8), 3, 12, 6, patch, drop_path_rate=0.2, scale_attn_inner=True,
                  init_values=0.1)


@pytest.fixture(scope="module")
def pretrained() -> dict:
    torch.manual_seed(0)
    net = CSMMaskedAutoencoder(SERIES, (32, 32, 32), "PrimusS")
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return {"csm_network": net.config(), "network_weights": net.state_dict(), "net": net}


def test_nnunet_loader_accepts_the_export_and_blocks_are_copied(pretrained, tmp_path):
    target = primus_s(2)
    state, report = primus_state_from_csm(pretrained, target, ["T1ce", "FLAIR"])
    path = tmp_path / "w.pth"
    torch.save({"network_weights": state}, path)
    fresh = primus_s(2)
    load_pretrained_weights(fresh, str(path))  # nnU-Net's own function: asserts every key and shape
    src = pretrained["network_weights"]
    got = fresh.state_dict()
    assert all(torch.equal(got[k], src[k]) for k in src if k.startswith("eva.blocks."))
    assert "eva.pos_embed [4, 4, 4] -> [6, 4, 4]" in report.resampled[0]
    assert report.channels == {"T1ce": "T1ce", "FLAIR": "FLAIR"}
    assert {k.split(".")[0] for k in report.fresh} == {"up_projection", "mask_token"}


def test_folded_patch_embedding_is_the_mean_of_series_tokens(pretrained):
    net = pretrained["net"]
    target = primus_s(2, (32, 32, 32))
    state, _ = primus_state_from_csm(pretrained, target, ["T1ce", "FLAIR"])
    target.load_state_dict(state)
    x = torch.randn(1, 2, 32, 32, 32)
    fused_tokens = target.down_projection(x).flatten(2).transpose(1, 2)[0]  # [N, D] in x-major order
    four = torch.zeros(1, 4, 32, 32, 32)
    four[:, 1], four[:, 3] = x[:, 0], x[:, 1]
    p = net.patchify(four)[0]
    per_series = [torch.nn.functional.linear(p[s], net.patch_embed_weight[s], net.patch_embed_bias[s])
                  + net.series_embed[s] for s in (1, 3)]
    assert torch.allclose(fused_tokens, (per_series[0] + per_series[1]) / 2, atol=1e-4)


def test_fused_mae_checkpoint_maps_channels_by_name():
    torch.manual_seed(1)
    mae = CSMMaskedAutoencoder(SERIES, (32, 32, 32), "PrimusS", fused=True)
    ckpt = {"csm_network": mae.config(), "network_weights": mae.state_dict()}
    state, report = primus_state_from_csm(ckpt, primus_s(2, (32, 32, 32)), ["FLAIR", "ADC"])
    w = state["down_projection.proj.weight"]
    assert torch.equal(w[:, 0], mae.patch_embed_weight[0].reshape(396, 4, 8, 8, 8)[:, 3])
    assert torch.count_nonzero(w[:, 1]) == 0 and report.channels["ADC"].startswith("zero")


def test_refuses_non_primus_presets_and_unmatched_series(pretrained, tmp_path):
    tiny = CSMMaskedAutoencoder(SERIES, (32, 32, 32), "tiny")
    with pytest.raises(ValueError, match="CSM_PRESET=PrimusS"):
        primus_state_from_csm({"csm_network": tiny.config(), "network_weights": tiny.state_dict()}, primus_s(2),
                              ["T1", "T2"])
    with pytest.raises(ValueError, match="matches a pretrained series"):
        primus_state_from_csm(pretrained, primus_s(2), ["DWI", "ADC"])
    bigger = Primus(2, 792, (8, 8, 8), 3, 12, 12, (32, 32, 32), scale_attn_inner=True, init_values=0.1)
    with pytest.raises(ValueError, match="preset matching the trainer"):
        primus_state_from_csm(pretrained, bigger, ["T1", "T2"])
    with pytest.raises(FileNotFoundError, match="has the pretraining finished"):
        find_checkpoint(str(tmp_path))
