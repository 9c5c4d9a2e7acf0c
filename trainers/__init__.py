"""nnU-Net trainers of csm-nnunet (installed as ``csm_nnunet.trainers``; found by ``nnUNetv2_train -tr`` through
the discovery shim ``nnunetv2.training.nnUNetTrainer.csm_nnunet_plugin``)."""

from csm_nnunet.trainers.csm_pretrainer import CSMPretrainer
from csm_nnunet.trainers.csm_pretrainer_ablations import (
    CSMPretrainer_Mask50,
    CSMPretrainer_NormPix,
    CSMPretrainer_NoSeriesMask,
    CSMPretrainer_SamePositionMask,
    CSMPretrainer_SeriesMaskNoRecon,
    MAEPretrainer,
)
from csm_nnunet.trainers.csm_seg_trainer import CSMSegTrainer

__all__ = [
    "CSMPretrainer",
    "CSMPretrainer_Mask50",
    "CSMPretrainer_NoSeriesMask",
    "CSMPretrainer_NormPix",
    "CSMPretrainer_SamePositionMask",
    "CSMPretrainer_SeriesMaskNoRecon",
    "CSMSegTrainer",
    "MAEPretrainer",
]
