"""Pure helpers of the trainers: env overrides, learning-rate schedule, patch fitting, dataset.json reading."""

import numpy as np
import pytest
import torch

from csm_nnunet.optim import WarmupCosineLR
from csm_nnunet.overrides import read_env_overrides
from csm_nnunet.trainer_utils import (
    channel_names_of,
    fit_patch_to_tokens,
    predict_sharded,
    save_checkpoint_atomically,
)


def test_env_overrides_parse_and_name_bad_values():
    env = {"CSM_NUM_EPOCHS": "3", "CSM_ITERS_PER_EPOCH": "2", "CSM_VAL_ITERS": "1", "CSM_PRESET": "tiny"}
    assert read_env_overrides(env) == {"num_epochs": 3, "num_iterations_per_epoch": 2,
                                       "num_val_iterations_per_epoch": 1, "preset": "tiny"}
    assert read_env_overrides({}) == {}
    assert read_env_overrides({"CSM_MASK_SEED": "7"}) == {"mask_seed": 7}
    assert read_env_overrides({"CSM_LR": "1e-4"}) == {"initial_lr": 1e-4}
    with pytest.raises(ValueError, match="CSM_LR='5' must be a learning rate"):
        read_env_overrides({"CSM_LR": "5"})
    with pytest.raises(ValueError, match="CSM_NUM_EPOCHS='two'"):
        read_env_overrides({"CSM_NUM_EPOCHS": "two"})
    with pytest.raises(ValueError, match="CSM_VAL_ITERS='0' must be >= 1"):
        read_env_overrides({"CSM_VAL_ITERS": "0"})
    with pytest.raises(ValueError, match="CSM_PRESET='huge' is not a preset"):
        read_env_overrides({"CSM_PRESET": "huge"})


def test_warmup_then_cosine_to_zero():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosineLR(opt, 1e-3, max_steps=100, warmup_steps=10)
    lrs = []
    for epoch in range(100):
        sched.step(epoch)
        lrs.append(opt.param_groups[0]["lr"])
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # warm-up rises
    assert lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then decays monotonically
    assert lrs[-1] < 1e-6


def test_frozen_encoder_groups_wait_then_ramp_into_the_same_cosine():
    enc, head = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [enc], "encoder": True, "lr_scale": 0.5}, {"params": [head]}], lr=1.0)
    sched = WarmupCosineLR(opt, 1e-3, max_steps=100, warmup_steps=5, frozen_steps=20)
    enc_lr, head_lr = [], []
    for epoch in range(100):
        sched.step(epoch)
        enc_lr.append(opt.param_groups[0]["lr"])
        head_lr.append(opt.param_groups[1]["lr"])
    assert enc_lr[:20] == [0.0] * 20 and head_lr[19] == pytest.approx(sched.lr_at(19))  # the head trains meanwhile
    assert all(0 < a < b for a, b in zip(enc_lr[20:25], enc_lr[21:26]))  # then the encoder warms up
    assert enc_lr[25:] == pytest.approx([0.5 * h for h in head_lr[25:]])  # and follows the schedule (its lr_scale)
    plain = WarmupCosineLR(torch.optim.AdamW([{"params": [enc], "encoder": True}], lr=1.0), 1e-3, 100, 5)
    plain.step(0)
    assert plain.optimizer.param_groups[0]["lr"] == pytest.approx(plain.lr_at(0))  # frozen_steps=0: no change


def test_fit_patch_to_tokens():
    assert fit_patch_to_tokens([64, 80, 64], 16) == (64, 80, 64)
    assert fit_patch_to_tokens([56, 72, 40], 16) == (48, 64, 32)
    with pytest.raises(ValueError, match=r"smaller than one token \(16\^3\) on axis \[1\]"):
        fit_patch_to_tokens([32, 8, 32], 16)
    with pytest.raises(ValueError, match="3D only"):
        fit_patch_to_tokens([128, 128], 16, "2d")


def test_channel_names_in_channel_order():
    assert channel_names_of({"channel_names": {"1": "T2", "0": "T1", "10": "X", "2": "F"}}) == ["T1", "T2", "F", "X"]
    assert channel_names_of({"modality": {"0": "CT"}}) == ["CT"]
    with pytest.raises(ValueError, match="channel_names"):
        channel_names_of({})


def test_checkpoint_written_atomically_with_cpu_tensors(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint_final.pth"
    save_checkpoint_atomically({"w": {"a": torch.ones(2)}, "epoch": 3}, str(target))
    assert torch.load(target, weights_only=False)["epoch"] == 3 and not list(tmp_path.glob("*.tmp"))

    def broken_save(obj, path):  # a crash while writing must leave the previous checkpoint intact
        open(path, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint_atomically({"epoch": 4}, str(target))
    monkeypatch.undo()
    assert torch.load(target, weights_only=False)["epoch"] == 3 and not list(tmp_path.glob("*.tmp"))


def test_configure_amp_dtype_prefers_bfloat16_on_cuda_and_leaves_cpu_alone(monkeypatch):
    from types import SimpleNamespace

    import pytest
    import torch

    from csm_nnunet.trainer_utils import configure_amp_dtype

    before = torch.get_autocast_dtype("cuda")
    logged: list[str] = []

    def trainer(device: str, **kw) -> SimpleNamespace:
        return SimpleNamespace(device=torch.device(device), print_to_log_file=logged.append, **kw)

    try:
        assert configure_amp_dtype(trainer("cpu")) is None and torch.get_autocast_dtype("cuda") == before
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        assert configure_amp_dtype(trainer("cuda")) == "bfloat16"
        assert torch.get_autocast_dtype("cuda") == torch.bfloat16 and "bfloat16" in logged[-1]
        assert configure_amp_dtype(trainer("cuda", amp_dtype="float16")) == "float16"
        assert torch.get_autocast_dtype("cuda") == torch.float16
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100
        assert configure_amp_dtype(trainer("cuda")) == "float16"
        with pytest.raises(ValueError, match="amp_dtype must be one of"):
            configure_amp_dtype(trainer("cuda", amp_dtype="fp8"))
    finally:
        torch.set_autocast_dtype("cuda", before)


def test_predict_sharded_without_a_process_group_predicts_everything_once():
    calls: list[list[str]] = []

    def predict(keys: list[str]) -> np.ndarray:
        calls.append(keys)
        return np.arange(2 * len(keys), dtype=float).reshape(len(keys), 2)

    out = predict_sharded(("a", "b", "c"), predict)
    assert calls == [["a", "b", "c"]] and out.shape == (3, 2)
