"""nnU-Net experiment planners of csm-nnunet; installed as ``csm_nnunet.planners``.

``CSMPlanner`` (plans name ``nnUNetCSMPlans``) plans ViT-compatible 3D configurations; nnU-Net finds it by name
(``-pl CSMPlanner``) through the discovery shim ``nnunetv2.experiment_planning.csm_nnunet_plugin``.
"""

from .csm_planner import CSM_PLANS_NAME, CSMFingerprintExtractor, CSMPlanner

__all__ = ["CSMPlanner", "CSMFingerprintExtractor", "CSM_PLANS_NAME"]
