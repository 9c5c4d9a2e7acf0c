"""Classification network (pooling over present tokens) and the class-label convention / CSV import."""

import json
import warnings

import pytest
import torch

from csm_nnunet.adapt import adapt_encoder_state
from csm_nnunet.class_labels import ClassLabelError, import_labels, parse_labels_csv, read_class_labels
from csm_nnunet.classification import CSMClassificationNetwork
from csm_nnunet.network import CSMMaskedAutoencoder
from csm_nnunet.segmentation import is_encoder_key

SERIES = ["T2w", "ADC", "DWI"]
PATCH = (32, 32, 32)


def make(**kw) -> CSMClassificationNetwork:
    torch.manual_seed(0)
    return CSMClassificationNetwork(3, 2, PATCH, "tiny", series_names=SERIES, **kw)


def test_logits_shape_and_missing_series_are_dropped_not_zero_filled():
    net = make().eval()
    x = torch.randn(2, 3, *PATCH)
    with torch.no_grad():
        assert net(x).shape == (2, 2)
        present = torch.tensor([[True, False, True], [True, True, True]])
        noisy = x.clone()
        noisy[0, 1] = 1e3  # an absent series' content must not matter
        a, b = net(x, present), net(noisy, present)
    assert torch.allclose(a, b, atol=1e-5)
    # case 0 alone equals case 0 in the batch (padding is hidden from attention)
    with torch.no_grad():
        alone = net(x[:1], present[:1])
    assert torch.allclose(alone, a[:1], atol=1e-5)
    # an all-zero series is inferred absent, as in segmentation
    zeroed = x.clone()
    zeroed[0, 1] = 0
    with torch.no_grad():
        assert torch.allclose(net(zeroed)[0], a[0], atol=1e-5)
    with pytest.raises(ValueError, match=">= 2 classes"):
        CSMClassificationNetwork(3, 1, PATCH, "tiny")


def test_pretrained_encoder_loads_into_the_classifier():
    torch.manual_seed(1)
    mae = CSMMaskedAutoencoder(SERIES, PATCH, "tiny")
    net = make()
    head = net.head.weight.detach().clone()
    report = adapt_encoder_state(mae.state_dict(), mae.config(), net, SERIES)
    net.load_state_dict(report.state_dict, strict=True)
    ref = mae.state_dict()
    for k, v in net.state_dict().items():
        if is_encoder_key(k):
            assert torch.equal(v, ref[k]), k
    assert torch.equal(net.head.weight, head) and "head.weight" in report.fresh
    # the same-position attention bias is not in any pretraining checkpoint: it starts fresh, the rest loads
    biased = make(same_position_bias=True)
    start = biased.same_position_bias.detach().clone()
    report = adapt_encoder_state(mae.state_dict(), mae.config(), biased, SERIES)
    biased.load_state_dict(report.state_dict, strict=True)
    assert "same_position_bias" in report.fresh and torch.equal(biased.same_position_bias, start)
    assert torch.equal(biased.eva.blocks[0].attn.proj.weight, ref["eva.blocks.0.attn.proj.weight"])


def test_classifier_learns_a_cross_series_rule():
    """Class 1 iff the lesion region is bright in series 0 *and* dark in series 2: neither series alone decides."""
    torch.manual_seed(0)
    net = CSMClassificationNetwork(3, 2, (16, 16, 16), "tiny", token_size=8)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)

    def batch(n):
        a = torch.randint(0, 2, (n,), generator=g)
        b = torch.randint(0, 2, (n,), generator=g)
        x = torch.randn(n, 3, 16, 16, 16, generator=g) * 0.1
        x[:, 0] += (a * 2 - 1).float()[:, None, None, None]
        x[:, 2] += (b * 2 - 1).float()[:, None, None, None]
        return x, (a * (1 - b)).long()

    for _ in range(150):
        x, y = batch(16)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = batch(64)
    with torch.no_grad():
        acc = (net(x).argmax(1) == y).float().mean().item()
    assert acc > 0.9, acc


def test_read_class_labels_errors_name_the_field_and_the_fix():
    cases = ["a", "b", "c"]
    good = {"class_names": ["benign", "malignant"], "classification_labels": {"a": 0, "b": 1, "c": 1}}
    assert read_class_labels(good, cases) == ({"a": 0, "b": 1, "c": 1}, ["benign", "malignant"])
    with pytest.raises(ClassLabelError, match="no 'classification_labels'.*import-labels"):
        read_class_labels({}, cases)
    with pytest.raises(ClassLabelError, match=r"1 case\(s\) have no class label: \['c'\]"):
        read_class_labels({**good, "classification_labels": {"a": 0, "b": 1}}, cases)
    with pytest.raises(ClassLabelError, match="integer class ids 0..1"):
        read_class_labels({**good, "classification_labels": {"a": 0, "b": 1, "c": "1"}}, cases)
    with pytest.raises(ClassLabelError, match="integer class ids"):
        read_class_labels({**good, "classification_labels": {"a": 0, "b": 1, "c": 2}}, cases)
    with pytest.raises(ClassLabelError, match="integer class ids"):
        read_class_labels({**good, "classification_labels": {"a": 0, "b": 1, "c": 0.5}}, cases)
    with pytest.raises(ClassLabelError, match="every case has class 'benign'"):
        read_class_labels({**good, "classification_labels": {"a": 0, "b": 0, "c": 0}}, cases)
    with pytest.raises(ClassLabelError, match="two or more class names"):
        read_class_labels({**good, "class_names": ["only"]}, cases)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        labels, _ = read_class_labels({**good, "classification_labels": {"a": 0, "b": 1, "c": 1, "zz": 0}}, cases)
    assert "zz" not in labels and any("zz" in str(w.message) for w in caught)


def _dataset(tmp_path, cases=("p_001", "p_002", "p_003")):
    folder = tmp_path / "Dataset123_P"
    (folder / "imagesTr").mkdir(parents=True)
    for c in cases:
        for ch in range(3):
            (folder / "imagesTr" / f"{c}_{ch:04d}.nii.gz").write_bytes(b"")
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2w", "1": "ADC", "2": "DWI"},
                                                     "labels": {"background": 0, "lesion": 1},
                                                     "file_ending": ".nii.gz", "numTraining": len(cases)}))
    return folder


def test_import_labels_from_csv_with_names_or_ids(tmp_path, monkeypatch):
    folder = _dataset(tmp_path)
    # planned already: nnUNetv2_train reads the preprocessed copy of dataset.json, which must get the labels too
    planned = tmp_path / "preprocessed" / folder.name
    planned.mkdir(parents=True)
    (planned / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T2w"}, "labels": {"background": 0}}))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("case,label\np_001,benign\np_002,malignant\np_003,malignant\n")
    ds = import_labels(str(csv_path), str(folder), ["benign", "malignant"])
    copy = json.loads((planned / "dataset.json").read_text())
    assert copy["classification_labels"] == {"p_001": 0, "p_002": 1, "p_003": 1} and copy["labels"] == {"background": 0}
    on_disk = json.loads((folder / "dataset.json").read_text())
    assert on_disk["classification_labels"] == {"p_001": 0, "p_002": 1, "p_003": 1} == ds["classification_labels"]
    assert on_disk["class_names"] == ["benign", "malignant"] and on_disk["channel_names"]["1"] == "ADC"
    csv_path.write_text("p_001,1\np_002,0\np_003,2\n")
    assert parse_labels_csv(str(csv_path), None) == ({"p_001": 1, "p_002": 0, "p_003": 2}, ["0", "1", "2"])


def test_import_labels_refuses_bad_csvs_and_writes_nothing(tmp_path):
    folder = _dataset(tmp_path)
    before = (folder / "dataset.json").read_text()
    csv_path = tmp_path / "labels.csv"
    for text, match in [("p_001,benign\np_002,malignant\n", r"no class label: \['p_003'\]"),
                        ("p_001,benign\np_002,malignant\np_003,maybe\n", "not in the class names"),
                        ("p_001,0\np_001,1\np_003,1\n", "listed twice"),
                        ("p_001,0\np_002,0\np_003,0\n", "every case has class"),
                        ("p_001\n", "expected 'case,label'")]:
        csv_path.write_text(text)
        with pytest.raises(ClassLabelError, match=match):
            import_labels(str(csv_path), str(folder), ["benign", "malignant"] if "benign" in text else None)
        assert (folder / "dataset.json").read_text() == before
    csv_path.write_text("p_001,0\np_002,1\np_003,1\np_999,0\n")
    with pytest.warns(UserWarning, match="p_999"):
        import_labels(str(csv_path), str(folder))


# ---------------------------------------------------------------------------------------------------------------------
# Metrics, ROI crops and output files of CSMClassifierTrainer / csm_nnunet classify
# ---------------------------------------------------------------------------------------------------------------------
def test_metrics_agree_with_sklearn_and_hand_counts():
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from csm_nnunet.classification import classification_metrics

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 40)
    p1 = np.clip(0.3 * y + rng.uniform(0, 0.7, 40), 0, 1)
    probs = np.stack([1 - p1, p1], 1)
    m = classification_metrics(y, probs, ["benign", "malignant"])
    assert m["auc"] == pytest.approx(roc_auc_score(y, p1))
    pred = probs.argmax(1)
    tp, fn = ((pred == 1) & (y == 1)).sum(), ((pred == 0) & (y == 1)).sum()
    tn, fp = ((pred == 0) & (y == 0)).sum(), ((pred == 1) & (y == 0)).sum()
    assert m["sensitivity"] == pytest.approx(tp / (tp + fn)) and m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["accuracy"] == pytest.approx((pred == y).mean())
    assert m["n_per_class"] == {"benign": int((y == 0).sum()), "malignant": int((y == 1).sum())}
    assert np.array(m["confusion_matrix"]).sum() == 40 and m["positive_class"] == "malignant"

    three = rng.dirichlet(np.ones(3), 30)
    y3 = np.arange(30) % 3
    m3 = classification_metrics(y3, three, ["a", "b", "c"])
    assert m3["auc"] == pytest.approx(roc_auc_score(y3, three, multi_class="ovr", average="macro"))


def test_auc_undefined_for_one_class_is_reported_not_raised():
    import numpy as np

    from csm_nnunet.classification import classification_metrics

    m = classification_metrics([1, 1], np.array([[0.2, 0.8], [0.6, 0.4]]), ["benign", "malignant"])
    assert m["auc"] is None and "'malignant'" in m["auc_note"] and m["accuracy"] == 0.5
    assert m["specificity"] is None and m["sensitivity"] == 0.5
    with pytest.raises(ValueError, match="probabilities must be"):
        classification_metrics([0, 1], np.ones((2, 3)) / 3, ["a", "b"])


def test_roi_crop_is_centred_on_the_lesion_and_padded_at_borders():
    import numpy as np

    from csm_nnunet.classification import crop_around, resolve_roi_labels, roi_centre

    seg = np.zeros((1, 40, 40, 40), dtype=np.int16)
    seg[0, 30:36, 2:6, 10:14] = 2  # lesion near a border
    seg[0, 5:15, 5:15, 5:15] = 1  # organ outline: not the ROI
    data = np.zeros((2, 40, 40, 40), dtype=np.float32)
    data[:, 30:36, 2:6, 10:14] = 5.0
    centre = roi_centre((40, 40, 40), seg, [2])
    assert centre == (33, 4, 12)
    crop = crop_around(data, centre, (16, 16, 16))
    assert crop.shape == (2, 16, 16, 16)
    assert crop.sum() == data.sum()  # the whole lesion is inside, zero padding outside the image
    assert crop[0, 8, 8, 8] == 5.0
    assert roi_centre((40, 40, 40), None, [2]) == (20, 20, 20)
    assert roi_centre((40, 40, 40), np.zeros_like(seg), [2]) == (20, 20, 20)
    labels = {"labels": {"background": 0, "gland": 1, "lesion": 2}}
    assert resolve_roi_labels(labels) == [1, 2]
    assert resolve_roi_labels({**labels, "classification_roi_labels": ["lesion"]}) == [2]
    with pytest.raises(ValueError, match="'tumour' is not a foreground label"):
        resolve_roi_labels({**labels, "classification_roi_labels": ["tumour"]})


def test_predictions_csv_round_trips():
    import csv
    import io

    import numpy as np

    from csm_nnunet.classification import predictions_csv

    text = predictions_csv(["a", "b"], np.array([[0.9, 0.1], [0.25, 0.75]]), ["benign", "malignant"], [0, 0])
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows[1] == {"case": "b", "p_benign": "0.250000", "p_malignant": "0.750000", "predicted": "malignant",
                       "label": "benign"}


def test_series_dropout_never_drops_every_series():
    from csm_nnunet.trainer_utils import drop_random_series

    torch.manual_seed(0)
    x = torch.ones(64, 4, 2, 2, 2)
    out = drop_random_series(x, 1.0)
    kept = (out != 0).flatten(2).any(2).sum(1)
    assert kept.min() >= 1 and kept.max() <= 3 and torch.equal(x, torch.ones_like(x))  # input untouched
    assert drop_random_series(x, 0.0) is x


def test_layer_decay_scales_blocks_and_embeddings():
    from csm_nnunet.optim import finetune_param_groups

    net = make()
    groups = finetune_param_groups(net, 0.01, 0.5)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    depth = len(net.eva.blocks)
    assert scale_of[id(net.eva.blocks[depth - 1].mlp.fc1.weight)] == 0.5
    assert scale_of[id(net.patch_embed_weight)] == 0.5 ** (depth + 1)
    assert scale_of[id(net.head.weight)] == 1.0
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert wd[id(net.head.weight)] == 0.01 and wd[id(net.head.bias)] == 0.0 and wd[id(net.series_embed)] == 0.0


def test_centre_pooling_weights_and_both_poolings_build():
    from csm_nnunet.classification import centre_weights

    w = centre_weights((3, 3, 3), 0.5)
    assert w.shape == (27,) and torch.isclose(w.sum(), torch.tensor(1.0)) and int(w.argmax()) == 13
    assert 0.4 < float(w[13]) < 0.6  # about half the weight on the centre token at sigma 0.5
    assert torch.allclose(w, w.flip(0))  # symmetric about the centre
    even = centre_weights((2, 2, 2), 0.5)  # an even grid: the 8 tokens around the centre point weigh the same
    assert torch.allclose(even, torch.full((8,), 1 / 8))
    D = make().preset.embed_dim
    assert make().head.in_features == 3 * D and make(pooling="mean").head.in_features == D
    x = torch.randn(2, 3, *PATCH)
    with torch.no_grad():
        assert make(pooling="mean").eval()(x).shape == (2, 2)
    with pytest.raises(ValueError, match="pooling must be one of"):
        make(pooling="max")


def test_same_position_bias_variants_build_it_from_the_plans_they_write():
    """The variants set the attribute their ``__init__`` writes into the plans; the static builder nnU-Net's predictor
    calls reads it back from there (a model trained with the bias must be rebuilt with it)."""
    from types import SimpleNamespace

    from csm_nnunet.trainers import (
        CSMClassifierTrainer,
        CSMClassifierTrainer_SamePositionBias,
        CSMSegTrainer,
        CSMSegTrainer_NoSeriesDropout_DecoderFirst_SamePositionBias,
        CSMSegTrainer_NoSeriesDropout_SamePositionBias,
    )
    from csm_nnunet.trainers.csm_classifier_trainer import PLANS_KEY as CLS_KEY
    from csm_nnunet.trainers.csm_seg_trainer import PLANS_KEY as SEG_KEY

    assert CSMClassifierTrainer_SamePositionBias.same_position_bias and not CSMClassifierTrainer.same_position_bias
    assert CSMSegTrainer_NoSeriesDropout_SamePositionBias.same_position_bias
    assert CSMSegTrainer_NoSeriesDropout_DecoderFirst_SamePositionBias.encoder_freeze_fraction == 0.2
    for flag in (True, False):
        cls_cfg = {"preset": "tiny", "series_names": SERIES, "class_names": ["a", "b"], "same_position_bias": flag}
        cm = SimpleNamespace(configuration={CLS_KEY: cls_cfg}, patch_size=list(PATCH))
        net = CSMClassifierTrainer.build_network_architecture(None, cm, 3, 2, False)
        assert (net.same_position_bias is not None) == flag
        cm = SimpleNamespace(configuration={SEG_KEY: {"preset": "tiny", "same_position_bias": flag}},
                             patch_size=[32, 32, 32])
        assert (CSMSegTrainer.build_network_architecture(None, cm, 3, 2, False).same_position_bias is not None) == flag
