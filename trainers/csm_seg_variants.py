"""Variants of :class:`CSMSegTrainer` for the experiments (issue #3 quality baseline, paper-style comparisons).

Each is a class attribute away from the default, so a comparison changes one thing.
"""

from __future__ import annotations

from csm_nnunet.trainers.csm_seg_trainer import CSMSegTrainer


class CSMSegTrainer_FusedTokens(CSMSegTrainer):
    """Channel-fused-token ViT with the same encoder width/depth, fusion and decoder: one token per patch carrying
    every series as channels. The baseline that per-series tokens must match from scratch. Missing series are zeros
    inside the token (it cannot drop them); from pretrained weights it loads only ``MAEPretrainer`` checkpoints."""

    fused_tokens = True


class CSMSegTrainer_ConcatFusion(CSMSegTrainer):
    """Series fusion by concatenation in series order plus a projection instead of attention pooling."""

    fusion = "concat"


class CSMSegTrainer_LayerDecay(CSMSegTrainer):
    """Layer-wise lr decay 0.75 (MAE fine-tuning practice): deeper encoder blocks move more than the stem."""

    layer_decay = 0.75


class CSMSegTrainer_InstanceNormFusion(CSMSegTrainer):
    """The series fusion standardises each channel of a tap over the patch positions (per case and series) instead of
    LayerNorm-ing each token: pretrained taps keep their token-to-token differences (docs/experiments.md, "linear
    probes")."""

    fusion_norm = "instance"


class CSMSegTrainer_NoSeriesDropout(CSMSegTrainer):
    """No random series dropout in fine-tuning (default: 20 % of cases lose 1..s-1 series). Dropout buys robustness
    to missing series at inference; on complete data it also shows the network labels whose evidence was removed
    (the synthetic enhancing rim is defined by T1ce - T1), which this variant measures the cost of."""

    series_dropout = 0.0


class CSMSegTrainer_SeriesDropout10(CSMSegTrainer):
    """Series dropout on 10 % of training cases instead of 20 %: between the default, which keeps a network working
    without FLAIR, and no dropout, which gave scratch +0.02 / +0.03 / +0.20 Dice on complete data (docs/experiments.md,
    "Without series dropout"). Measures whether half the dropout keeps most of both."""

    series_dropout = 0.1


class CSMSegTrainer_DecoderFirst(CSMSegTrainer):
    """The encoder stays frozen for the first 20 % of the epochs while the fresh fusion and decoder learn on the
    pretrained features, then everything trains (linear-probe-then-fine-tune). Tests whether CSM-initialised runs lose
    their pretrained features to the random decoder's early gradients (docs/experiments.md, "Decoder first")."""

    encoder_freeze_fraction = 0.2


class CSMSegTrainer_NoSeriesDropout_DecoderFirst(CSMSegTrainer_NoSeriesDropout):
    """:class:`CSMSegTrainer_DecoderFirst` without series dropout, to compare with the ``*-nodrop`` runs."""

    encoder_freeze_fraction = 0.2


class CSMSegTrainer_FusedTokens_NoSeriesDropout_DecoderFirst(CSMSegTrainer_NoSeriesDropout_DecoderFirst):
    """The channel-fused-token network (``MAEPretrainer`` weights) fine-tuned with the recipe that brought CSM level
    with scratch at 10 % labels (no series dropout, encoder frozen for the first 20 % of the epochs), so CSM and MAE
    pretraining are compared under the same fine-tuning."""

    fused_tokens = True


class CSMSegTrainer_NoSeriesDropout_SamePositionBias(CSMSegTrainer_NoSeriesDropout):
    """A learned attention bias between the series tokens of one position (beyond the paper, see
    :class:`csm_nnunet.segmentation.SeriesTokenEncoder`), to compare with the ``*-nodrop`` runs."""

    same_position_bias = True


class CSMSegTrainer_NoSeriesDropout_DecoderFirst_SamePositionBias(CSMSegTrainer_NoSeriesDropout_DecoderFirst):
    """:class:`CSMSegTrainer_NoSeriesDropout_DecoderFirst` with the same-position attention bias (it is not an
    encoder tensor, so it trains from the first step while the pretrained encoder is held)."""

    same_position_bias = True
