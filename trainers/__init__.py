"""nnU-Net trainers of csm-nnunet (installed as ``csm_nnunet.trainers``; found by ``nnUNetv2_train -tr`` through
the discovery shim ``nnunetv2.training.nnUNetTrainer.csm_nnunet_plugin``)."""

from csm_nnunet.trainers.budget import (
    nnUNet_Primus_B_Trainer_CSMBudget,
    nnUNet_Primus_S_Trainer_CSMBudget,
    nnUNetTrainer_CSMBudget,
)
from csm_nnunet.trainers.csm_classifier_trainer import (
    CSMClassifierTrainer,
    CSMClassifierTrainer_Balanced,
    CSMClassifierTrainer_FusedTokens,
    CSMClassifierTrainer_HeadFirst,
    CSMClassifierTrainer_LayerDecay,
    CSMClassifierTrainer_SamePositionBias,
)
from csm_nnunet.trainers.csm_pretrainer import CSMPretrainer
from csm_nnunet.trainers.csm_pretrainer_ablations import (
    CSMPretrainer_LR5e3,
    CSMPretrainer_Mask50,
    CSMPretrainer_NormPix,
    CSMPretrainer_NoSeriesMask,
    CSMPretrainer_SamePositionMask,
    CSMPretrainer_SeriesMaskNoRecon,
    MAEPretrainer,
)
from csm_nnunet.trainers.csm_seg_trainer import CSMSegTrainer
from csm_nnunet.trainers.csm_seg_variants import (
    CSMSegTrainer_ConcatFusion,
    CSMSegTrainer_DecoderFirst,
    CSMSegTrainer_FusedTokens,
    CSMSegTrainer_FusedTokens_NoSeriesDropout_DecoderFirst,
    CSMSegTrainer_InstanceNormFusion,
    CSMSegTrainer_LayerDecay,
    CSMSegTrainer_NoSeriesDropout,
    CSMSegTrainer_NoSeriesDropout_DecoderFirst,
    CSMSegTrainer_NoSeriesDropout_DecoderFirst_SamePositionBias,
    CSMSegTrainer_NoSeriesDropout_SamePositionBias,
    CSMSegTrainer_SeriesDropout10,
)

__all__ = [
    "CSMClassifierTrainer",
    "CSMClassifierTrainer_Balanced",
    "CSMClassifierTrainer_FusedTokens",
    "CSMClassifierTrainer_HeadFirst",
    "CSMClassifierTrainer_LayerDecay",
    "CSMClassifierTrainer_SamePositionBias",
    "CSMPretrainer",
    "CSMPretrainer_LR5e3",
    "CSMPretrainer_Mask50",
    "CSMPretrainer_NoSeriesMask",
    "CSMPretrainer_NormPix",
    "CSMPretrainer_SamePositionMask",
    "CSMPretrainer_SeriesMaskNoRecon",
    "CSMSegTrainer",
    "CSMSegTrainer_ConcatFusion",
    "CSMSegTrainer_DecoderFirst",
    "CSMSegTrainer_FusedTokens",
    "CSMSegTrainer_FusedTokens_NoSeriesDropout_DecoderFirst",
    "CSMSegTrainer_InstanceNormFusion",
    "CSMSegTrainer_LayerDecay",
    "CSMSegTrainer_NoSeriesDropout",
    "CSMSegTrainer_NoSeriesDropout_DecoderFirst",
    "CSMSegTrainer_NoSeriesDropout_DecoderFirst_SamePositionBias",
    "CSMSegTrainer_NoSeriesDropout_SamePositionBias",
    "CSMSegTrainer_SeriesDropout10",
    "MAEPretrainer",
    "nnUNetTrainer_CSMBudget",
    "nnUNet_Primus_B_Trainer_CSMBudget",
    "nnUNet_Primus_S_Trainer_CSMBudget",
]
