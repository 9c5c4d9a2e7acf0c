"""Discovery shim package installed as ``nnunetv2.experiment_planning.csm_nnunet_plugin``.

Makes ``nnUNetv2_plan_and_preprocess -pl CSMPlanner`` find csm-nnunet's planner after a plain ``pip install``.
Imported during other planner lookups too, so it must stay cheap and must never raise. Not named ``csm_nnunet``:
nnU-Net puts ``experiment_planning/`` itself on ``sys.path`` during the lookup, where that name would shadow the real
package.
"""
