"""The paper's pretraining ablations (section IV.C, Tables VII and VIII) and the channel-fused MAE baseline.

Each is one switch on :class:`CSMPretrainer`; the names are what users pass to ``nnUNetv2_train -tr``.
"""

from csm_nnunet.trainers.csm_pretrainer import CSMPretrainer


class CSMPretrainer_SamePositionMask(CSMPretrainer):
    """"Random patch-mask x": one patch mask shared by all series of a case."""

    same_position = True


class CSMPretrainer_SeriesMaskNoRecon(CSMPretrainer):
    """"Series-mask o": whole series are hidden but their reconstruction is not scored."""

    series_masking = "no_reconstruct"


class CSMPretrainer_NoSeriesMask(CSMPretrainer):
    """"Series-mask x": intra-series masking only, no whole series hidden."""

    series_masking = "off"


class CSMPretrainer_Mask50(CSMPretrainer):
    """Mask ratio 50% instead of 87.5%."""

    mask_ratio = 0.5


class CSMPretrainer_LR5e3(CSMPretrainer):
    """Peak learning rate 5e-3 instead of the paper's 1e-3 (beyond the paper). Why: at CPU scale (tiny8, 1600
    steps) the encoder's query/key projections hardly move from their initialisation under 1e-3, so its attention
    stays uniform (docs/experiments.md); this tests whether a faster optimiser lets the attention form."""

    peak_lr = 5e-3


class MAEPretrainer(CSMPretrainer):
    """Baseline MAE: all series fused into one token per patch (MONAI/nnssl style), patch masking only."""

    fused_tokens = True
    series_masking = "off"


class CSMPretrainer_NormPix(CSMPretrainer):
    """Per-patch normalised reconstruction targets (MAE practice; not a paper row, an option to measure)."""

    norm_pix_loss = True
