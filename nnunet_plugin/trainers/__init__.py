"""Discovery shim package installed as ``nnunetv2.training.nnUNetTrainer.csm_nnunet_plugin``.

nnU-Net 2.8 finds trainers by walking its own ``training/nnUNetTrainer`` folder; this package puts csm-nnunet's
trainers there so ``nnUNetv2_train -tr CSMPretrainer`` and ``nnUNetv2_predict`` work after a plain ``pip install``.
It is imported during lookups of other trainers too, so it must stay cheap and must never raise. It is not named
``csm_nnunet``: nnU-Net puts the searched folder on ``sys.path`` during a lookup, and a package of that name there
would shadow the real ``csm_nnunet``.
"""
