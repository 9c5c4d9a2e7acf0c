"""Sharing a pretrained encoder: ``csm_nnunet export-encoder`` / ``import-encoder`` (csm_nnunet/share.py).

Unit tests build a tiny pretraining checkpoint in a fake nnU-Net model folder (fast); one end-to-end test exports the
session's pretrained model through the console scripts, imports it and fine-tunes CSMSegTrainer from it on a copy of
the dataset under another id (another dataset, as on another machine).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from e2e_helpers import SEG, fold_dir, log_text, run, train

import csm_nnunet
from csm_nnunet.adapt import load_pretrained_checkpoint
from csm_nnunet.classification import CSMClassificationNetwork
from csm_nnunet.cli import main as cli
from csm_nnunet.network import CSMMaskedAutoencoder
from csm_nnunet.segmentation import CSMSegmentationNetwork, is_encoder_key
from csm_nnunet.share import (
    FORMAT_VERSION,
    METADATA_MEMBER,
    WEIGHTS_MEMBER,
    ShareError,
    export_encoder,
    plans_fingerprint,
    read_encoder_archive,
)

SERIES = ["T1", "T1ce", "T2", "FLAIR"]
PATCH = (32, 32, 32)
PLANS = {"plans_name": "nnUNetCSMPlans", "dataset_name": "Dataset123_Src", "transpose_forward": [0, 1, 2],
         "configurations": {"3d_fullres": {"patch_size": list(PATCH), "spacing": [1.0, 1.0, 1.0],
                                           "normalization_schemes": ["ZScoreNormalization"] * 4,
                                           "use_mask_for_norm": [False] * 4}}}
DATASET_JSON = {"channel_names": {str(i): n for i, n in enumerate(SERIES)}, "labels": {"background": 0, "a": 1},
                "numTraining": 4, "file_ending": ".nii.gz"}


@pytest.fixture(scope="module")
def mae() -> CSMMaskedAutoencoder:
    torch.manual_seed(3)
    net = CSMMaskedAutoencoder(SERIES, PATCH, "tiny")
    with torch.no_grad():  # away from any initialisation a fresh fine-tuning network could share
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net


def model_folder(root: Path, mae: CSMMaskedAutoencoder | None, trainer: str = "CSMPretrainer_Mask50",
                 folds: tuple[str, ...] = ("all",), checkpoint: str = "checkpoint_final.pth") -> Path:
    """``root/<trainer>__nnUNetCSMPlans__3d_fullres`` as nnU-Net writes it; ``mae=None``: a non-CSM checkpoint."""
    folder = root / f"{trainer}__nnUNetCSMPlans__3d_fullres"
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(PLANS))
    (folder / "dataset.json").write_text(json.dumps(DATASET_JSON))
    for fold in folds:
        ckpt = {"network_weights": {"conv.weight": torch.ones(2, 2)}, "trainer_name": trainer, "current_epoch": 7,
                "init_args": {"plans": PLANS, "configuration": "3d_fullres", "fold": fold,
                              "dataset_json": DATASET_JSON}, "optimizer_state": {}}
        if mae is not None:
            ckpt.update(network_weights=mae.state_dict(), csm_network=mae.config(),
                        csm_masking={"mask_ratio": 0.5, "series_masking": "reconstruct", "same_position": False})
        (folder / f"fold_{fold}").mkdir()
        torch.save(ckpt, folder / f"fold_{fold}" / checkpoint)
    return folder


def seg_net() -> CSMSegmentationNetwork:
    torch.manual_seed(4)
    net = CSMSegmentationNetwork(len(SERIES), 3, PATCH, "tiny", base_channels=8)
    net.series_names = list(SERIES)
    return net


def assert_encoder_equal(net: torch.nn.Module, mae: CSMMaskedAutoencoder) -> None:
    ref = mae.state_dict()
    keys = [k for k in net.state_dict() if is_encoder_key(k)]
    assert keys
    for k in keys:
        assert torch.equal(net.state_dict()[k], ref[k]), k


@pytest.fixture()
def archive(tmp_path, mae) -> Path:
    out = tmp_path / "shared" / "encoder.zip"
    assert cli(["export-encoder", str(model_folder(tmp_path / "results", mae)), "-o", str(out)]) == 0
    return out


# ------------------------------------------------------------------------------------------------ export
def test_export_holds_only_the_encoder_and_the_metadata(archive, mae):
    with zipfile.ZipFile(archive) as zf:
        assert zf.namelist() == [METADATA_MEMBER, WEIGHTS_MEMBER]
        meta, raw = json.loads(zf.read(METADATA_MEMBER)), zf.read(WEIGHTS_MEMBER)
    weights = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    ref = mae.state_dict()
    assert set(weights) == {k for k in ref if is_encoder_key(k)}  # no decoder, no mask tokens
    assert "decoder_pred.weight" not in weights and "encoder_mask_token" not in weights
    assert all(torch.equal(weights[k], ref[k]) for k in weights)
    assert meta["format_version"] == FORMAT_VERSION and meta["csm_nnunet_version"] == csm_nnunet.__version__
    assert meta["torch_version"] == torch.__version__ and meta["nnunetv2_version"]
    assert meta["csm_network"] == mae.config()
    assert (meta["preset"], meta["token_size"], meta["series_names"]) == ("tiny", 16, SERIES)
    assert meta["masking"]["mask_ratio"] == 0.5
    assert meta["source"] == {"trainer": "CSMPretrainer_Mask50", "epoch": 7, "fold": "all",
                              "checkpoint": "checkpoint_final.pth"}
    assert meta["plans"]["plans_name"] == "nnUNetCSMPlans" and meta["plans"]["configuration"] == "3d_fullres"
    assert meta["plans"]["channel_names"] == SERIES and meta["plans"]["spacing"] == [1.0, 1.0, 1.0]
    assert meta["weights"]["sha256"] == hashlib.sha256(raw).hexdigest()
    assert meta["weights"]["num_tensors"] == len(weights)


def test_plans_fingerprint_changes_with_the_preprocessing():
    base = plans_fingerprint(PLANS, "3d_fullres", DATASET_JSON)
    assert base == plans_fingerprint(json.loads(json.dumps(PLANS)), "3d_fullres", DATASET_JSON)
    other = json.loads(json.dumps(PLANS))
    other["configurations"]["3d_fullres"]["spacing"] = [2.0, 1.0, 1.0]
    renamed = {**DATASET_JSON, "channel_names": {"0": "T1", "1": "T1POST", "2": "T2", "3": "FLAIR"}}
    assert plans_fingerprint(other, "3d_fullres", DATASET_JSON)["sha256"] != base["sha256"]
    assert plans_fingerprint(PLANS, "3d_fullres", renamed)["sha256"] != base["sha256"]


def test_fold_folder_and_checkpoint_path_are_accepted_and_several_folds_need_f(tmp_path, mae, capsys):
    folder = model_folder(tmp_path / "results", mae, folds=("0", "1"))
    out = tmp_path / "e.zip"
    assert cli(["export-encoder", str(folder), "-o", str(out)]) == 1
    assert "holds folds ['0', '1']; pick one with -f" in capsys.readouterr().err and not out.exists()
    digests = []
    for args in ([str(folder), "-f", "1"], [str(folder / "fold_1")], [str(folder / "fold_1" / "checkpoint_final.pth")]):
        assert cli(["export-encoder", *args, "-o", str(out)]) == 0
        meta = read_encoder_archive(str(out)).metadata
        assert meta["source"]["fold"] == "1"
        digests.append(meta["weights"]["sha256"])
    assert len(set(digests)) == 1


# ------------------------------------------------------------------------------------------------ import
def test_import_writes_a_checkpoint_both_fine_tuning_networks_load(archive, mae, tmp_path, capsys):
    out_dir = tmp_path / "other_machine"
    assert cli(["import-encoder", str(archive), "-o", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert "preset tiny" in printed and "token 16^3" in printed and "series: T1, T1ce, T2, FLAIR" in printed
    assert "source: CSMPretrainer_Mask50, epoch 7" in printed and "sha256 verified" in printed
    imported = out_dir / "encoder.pth"
    assert sorted(p.name for p in out_dir.iterdir()) == ["encoder.pth"]
    ckpt = torch.load(imported, map_location="cpu", weights_only=True)  # plain data: safe to load
    assert ckpt["csm_network"] == mae.config() and set(ckpt["network_weights"]) == {
        k for k in mae.state_dict() if is_encoder_key(k)}
    logs: list[str] = []
    net = seg_net()
    report = load_pretrained_checkpoint(imported, net, SERIES, log=logs.append)
    assert_encoder_equal(net, mae)
    assert report.series_matched == {"T1": 0, "T1ce": 1, "T2": 2, "FLAIR": 3}
    assert "source: CSMPretrainer_Mask50" in logs[0]  # the log says where the encoder came from
    # the archive itself works as -pretrained_weights, for segmentation and classification networks alike
    torch.manual_seed(5)
    classifier = CSMClassificationNetwork(len(SERIES), 2, PATCH, "tiny", series_names=SERIES)
    load_pretrained_checkpoint(archive, classifier, SERIES, log=logs.append)
    assert_encoder_equal(classifier, mae)
    assert "series: T1, T1ce, T2, FLAIR" in logs[-2] and "pretrained encoder adaptation" in logs[-1]


def test_fused_mae_encoder_is_shared_and_split_per_series_on_loading(tmp_path):
    torch.manual_seed(6)
    fused = CSMMaskedAutoencoder(SERIES, PATCH, "tiny", fused=True)
    out = tmp_path / "mae.zip"
    export_encoder(str(model_folder(tmp_path / "results", fused, trainer="MAEPretrainer")), str(out), log=None)
    loaded = read_encoder_archive(str(out))
    assert loaded.metadata["csm_network"]["fused"] is True
    assert loaded.weights["patch_embed_weight"].shape[0] == 1  # one token group: all series as channels
    net = seg_net()
    report = load_pretrained_checkpoint(out, net, SERIES, log=None)
    assert any("fused" in n for n in report.notes) and "eva.norm.weight" in report.loaded
    assert torch.equal(net.state_dict()["eva.norm.weight"], fused.state_dict()["eva.norm.weight"])


# ------------------------------------------------------------------------------------------------ refusals
def _rezip(path: Path, meta: dict | None = None, weights: bytes | None = None, members: tuple[str, ...] = (
        METADATA_MEMBER, WEIGHTS_MEMBER)) -> None:
    with zipfile.ZipFile(path) as zf:
        old_meta, old_weights = json.loads(zf.read(METADATA_MEMBER)), zf.read(WEIGHTS_MEMBER)
    content = {METADATA_MEMBER: json.dumps(old_meta if meta is None else meta),
               WEIGHTS_MEMBER: old_weights if weights is None else weights}
    with zipfile.ZipFile(path, "w") as zf:
        for m in members:
            zf.writestr(m, content[m])


def _meta(path: Path) -> dict:
    with zipfile.ZipFile(path) as zf:
        return json.loads(zf.read(METADATA_MEMBER))


def _tensors_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class NotATensor:
    """A pickled object: ``weights_only=True`` must refuse it (no code from a shared file runs)."""


def _not_a_zip(p: Path) -> None:
    p.write_text("not an archive")


def _truncated(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flipped_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the stored weights: the CRC-32 no longer matches
    p.write_bytes(bytes(data))


def _tampered(p: Path) -> None:
    with zipfile.ZipFile(p) as zf:
        weights = torch.load(io.BytesIO(zf.read(WEIGHTS_MEMBER)), weights_only=True)
    weights["eva.norm.weight"] = weights["eva.norm.weight"] + 1  # a consistent zip, but not what was exported
    _rezip(p, weights=_tensors_bytes(weights))


def _newer_version(p: Path) -> None:
    _rezip(p, meta={**_meta(p), "format_version": FORMAT_VERSION + 1, "csm_nnunet_version": "9.0.0"})


def _missing_fields(p: Path) -> None:
    meta = _meta(p)
    del meta["series_names"], meta["plans"]
    _rezip(p, meta=meta)


def _no_weights_member(p: Path) -> None:
    _rezip(p, members=(METADATA_MEMBER,))


def _torch_checkpoint(p: Path) -> None:
    torch.save({"network_weights": {}}, p)


def _pickled_object(p: Path) -> None:
    raw = _tensors_bytes({"eva.norm.weight": NotATensor()})
    meta = _meta(p)
    meta["weights"]["sha256"] = hashlib.sha256(raw).hexdigest()
    _rezip(p, meta=meta, weights=raw)


@pytest.mark.parametrize("damage, message", [
    (_not_a_zip, "is not a readable zip archive"),
    (_truncated, "is not a readable zip archive"),
    (_flipped_byte, "is corrupt (BadZipFile: Bad CRC-32"),
    (_tampered, "the weights were modified or damaged after export"),
    (_newer_version, f"has format version {FORMAT_VERSION + 1}, written by csm-nnunet 9.0.0; this csm-nnunet "
                     f"{csm_nnunet.__version__} reads format version <= {FORMAT_VERSION}: upgrade csm-nnunet"),
    (_missing_fields, "csm_encoder.json lacks the fields ['series_names', 'plans']"),
    (_no_weights_member, "has no encoder_weights.pt: it is not a (complete) csm-nnunet encoder archive"),
    (_torch_checkpoint, "but a torch checkpoint"),
    (_pickled_object, "encoder_weights.pt does not load as plain tensors"),
])
def test_import_refuses_damaged_or_foreign_archives(archive, tmp_path, capsys, damage, message):
    damage(archive)
    out_dir = tmp_path / "imported"
    assert cli(["import-encoder", str(archive), "-o", str(out_dir)]) == 1
    err = capsys.readouterr().err
    assert message in err and str(archive) in err, err
    assert "export-encoder" in err or "upgrade" in err, err  # names the fix
    assert not out_dir.exists(), "nothing may be written for a refused archive"
    with pytest.raises(ValueError) as refused:  # -pretrained_weights encoder.zip refuses it the same way
        load_pretrained_checkpoint(archive, seg_net(), SERIES, log=None)
    assert message in str(refused.value)


@pytest.mark.parametrize("case, message", [
    ("seg", "was written by CSMSegTrainer: a fine-tuned csm-nnunet model, not a pretraining one"),
    ("nnunet", "was written by nnUNetTrainer: not a csm-nnunet pretraining model"),
    ("unfinished", "no checkpoint_final.pth in"),
    ("corrupt", "the file is truncated or corrupt"),
    ("absent", "does not exist; pass a pretraining model folder"),
    ("empty", "has no fold_* folder and no checkpoint"),
])
def test_export_refuses_what_is_not_a_pretraining_model(tmp_path, mae, capsys, case, message):
    root = tmp_path / "results"
    if case == "seg":
        model = model_folder(root, None, trainer="CSMSegTrainer")
    elif case == "nnunet":
        model = model_folder(root, None, trainer="nnUNetTrainer")
    elif case == "unfinished":
        model = model_folder(root, mae, checkpoint="checkpoint_latest.pth")
    elif case == "corrupt":
        model = model_folder(root, mae)
        ckpt = model / "fold_all" / "checkpoint_final.pth"
        ckpt.write_bytes(ckpt.read_bytes()[:5000])
    elif case == "absent":
        model = root / "nothing_here"
    else:
        model = root / "empty"
        model.mkdir(parents=True)
    out = tmp_path / "out" / "encoder.zip"
    assert cli(["export-encoder", str(model), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert message in err and str(model) in err, err
    if case in ("seg", "nnunet"):
        assert "CSMPretrainer__nnUNetCSMPlans__3d_fullres" in err  # what to pass instead
    if case == "unfinished":
        assert "has not finished" in err and "-chk checkpoint_latest.pth" in err
    assert not out.parent.exists(), "nothing may be written for a refused model"


def test_failed_write_keeps_the_previous_archive(archive, tmp_path, mae, monkeypatch, capsys):
    before = archive.read_bytes()
    original = zipfile.ZipFile.writestr

    def full_disk(self, name, data, *args, **kwargs):
        if str(getattr(name, "filename", name)) == WEIGHTS_MEMBER:
            raise OSError(28, "No space left on device")
        return original(self, name, data, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "writestr", full_disk)
    other = model_folder(tmp_path / "results2", mae)
    assert cli(["export-encoder", str(other), "-o", str(archive)]) == 1
    assert "cannot write" in capsys.readouterr().err
    assert archive.read_bytes() == before and sorted(p.name for p in archive.parent.iterdir()) == ["encoder.zip"]
    with pytest.raises(ShareError, match="is a folder"):
        export_encoder(str(other), str(tmp_path), log=None)


# ------------------------------------------------------------------------------------------------ end to end
SHARE_ID, SHARE_NAME = 984, "Dataset984_CSMShareTarget"


def test_exported_encoder_fine_tunes_on_another_dataset(synthetic, pretrained, tmp_path):
    """export-encoder on the pretraining model folder -> import-encoder elsewhere -> CSMSegTrainer
    ``-pretrained_weights <imported>`` on a copy of the dataset under another id, through the console scripts."""
    env = synthetic
    archive = tmp_path / "to_share" / "encoder.zip"
    run(["csm_nnunet", "export-encoder", str(pretrained.parent.parent), "-o", str(archive)], env)
    out_dir = tmp_path / "other_machine"
    proc = run(["csm_nnunet", "import-encoder", str(archive), "-o", str(out_dir)], env)
    assert "series: T1, T1ce, T2, FLAIR" in proc.stdout and "sha256 verified" in proc.stdout, proc.stdout
    imported = out_dir / "encoder.pth"
    source = torch.load(pretrained, map_location="cpu", weights_only=False)["network_weights"]
    weights = torch.load(imported, map_location="cpu", weights_only=True)["network_weights"]
    assert set(weights) == {k for k in source if is_encoder_key(k)}
    assert all(torch.equal(weights[k], source[k]) for k in weights)

    # another dataset: the preprocessed synthetic set under a new id (nnU-Net names results by plans' dataset_name)
    pre = Path(env["nnUNet_preprocessed"])
    target = pre / SHARE_NAME
    shutil.copytree(pre / "Dataset990_CSMSynth", target)
    plans_file = target / "nnUNetCSMPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["dataset_name"] = SHARE_NAME
    plans_file.write_text(json.dumps(plans))
    # one validation case keeps nnU-Net's final validation short (fold "all" would predict every case)
    (target / "splits_final.json").write_text(json.dumps([{"train": ["brain_000", "brain_001", "brain_003"],
                                                           "val": ["brain_002"]}]))
    train(env, SHARE_ID, "CSMSegTrainer", "nnUNetCSMPlans", SEG, ("-pretrained_weights", str(imported)), fold="0")
    text = log_text(fold_dir(env, SHARE_NAME, "CSMSegTrainer", "nnUNetCSMPlans", fold="0"))
    assert "source: CSMPretrainer_Mask50" in text, text[-3000:]
    assert f"loaded    ({len(weights)}):" in text and "T1ce <- pretrained #1" in text, text[-3000:]
