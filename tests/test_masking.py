"""Invariants of cross-series masking (paper III.B) on tensors alone."""

import warnings

import pytest
import torch

from csm_nnunet.masking import CrossSeriesMasker, num_kept


def draw(masker: CrossSeriesMasker, B: int = 64, S: int = 4, N: int = 64, seed: int = 0, present=None):
    return masker(B, S, N, present=present, generator=torch.Generator().manual_seed(seed))


def test_each_shown_series_keeps_its_own_ratio():
    m = draw(CrossSeriesMasker(0.875))
    shown = m.present & ~m.hidden_series
    kept = m.visible.sum(2)
    assert (kept[shown] == num_kept(64, 0.875)).all() and num_kept(64, 0.875) == 8
    assert (kept[~shown] == 0).all()
    # masked patches of shown series are exactly the scored ones there
    assert (m.scored.sum(2)[shown] == 64 - 8).all()


def test_masks_differ_across_series_and_same_position_shares_them():
    m = draw(CrossSeriesMasker(0.875, series_masking="off"))
    assert not (m.visible[:, 0] == m.visible[:, 1]).all(1).any(), "independent series must not share one mask"
    # independence: overlap of two series' visible sets is about chance level (8/64 * 8 tokens = 1 per case)
    overlap = (m.visible[:, 0] & m.visible[:, 1]).sum(1).float().mean().item()
    assert 0.5 < overlap < 1.6
    s = draw(CrossSeriesMasker(0.875, series_masking="off", same_position=True))
    assert (s.visible == s.visible[:, :1]).all()


def test_inter_series_hides_between_one_and_s_minus_one():
    for S in (2, 3, 4, 6):
        m = draw(CrossSeriesMasker(), B=400, S=S)
        k = m.hidden_series.sum(1)
        assert k.min() >= 1 and k.max() <= S - 1
        # k ~ U{1, S-1}: every value occurs
        assert set(k.tolist()) == set(range(1, S))
        # hidden series are scored entirely and never visible
        assert m.scored[m.hidden_series].all() and not m.visible[m.hidden_series].any()


def test_series_masking_modes():
    no_rec = draw(CrossSeriesMasker(series_masking="no_reconstruct"))
    assert no_rec.hidden_series.any()
    assert not no_rec.scored[no_rec.hidden_series].any(), "hidden series must not be scored in 'no_reconstruct'"
    off = draw(CrossSeriesMasker(series_masking="off"))
    assert not off.hidden_series.any()
    with pytest.raises(ValueError, match="series_masking"):
        CrossSeriesMasker(series_masking="sometimes")
    with pytest.raises(ValueError, match="mask_ratio"):
        CrossSeriesMasker(mask_ratio=1.0)


def test_single_series_warns_and_masks_patches_only():
    masker = CrossSeriesMasker()
    with pytest.warns(UserWarning, match="single series"):
        m = draw(masker, S=1)
    assert not m.hidden_series.any()
    assert (m.visible.sum(2) == 8).all()


def test_absent_series_are_never_visible_nor_scored_and_never_counted():
    present = torch.ones(200, 4, dtype=torch.bool)
    present[:, 2] = False
    present[::2, 0] = False  # half the cases have only two series
    m = draw(CrossSeriesMasker(), B=200, present=present)
    assert not m.visible[~present].any() and not m.scored[~present].any()
    assert not m.hidden_series[~present].any()
    k = m.hidden_series.sum(1)
    s = present.sum(1)
    assert (k >= 1).all() and (k <= s - 1).all()
    one = torch.zeros(3, 4, dtype=torch.bool)
    one[:, 1] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        single = draw(CrossSeriesMasker(), B=3, present=one)  # one present series: nothing to hide, no warning
    assert not single.hidden_series.any() and (single.visible[:, 1].sum(1) == 8).all()


def test_visible_never_scored_and_seed_reproducible():
    a = draw(CrossSeriesMasker(0.5), seed=3)
    b = draw(CrossSeriesMasker(0.5), seed=3)
    c = draw(CrossSeriesMasker(0.5), seed=4)
    assert not (a.visible & a.scored).any()
    assert torch.equal(a.visible, b.visible) and torch.equal(a.scored, b.scored)
    assert not torch.equal(a.visible, c.visible)


def test_bad_present_shape_is_rejected():
    with pytest.raises(ValueError, match="present must have shape"):
        CrossSeriesMasker()(2, 4, 8, present=torch.ones(2, 3, dtype=torch.bool))
