"""Re-export module that nnU-Net's lookup inspects (it reads attributes of plain modules, not of package
``__init__`` files). Must stay cheap and must never raise."""

try:
    from csm_nnunet.trainers import *  # noqa: F401,F403
except Exception as _exc:  # a broken plugin must not break nnU-Net's own trainers
    import warnings

    warnings.warn(f"csm-nnunet trainers could not be imported ({_exc!r}); run `csm_nnunet doctor` for the fix.",
                  stacklevel=2)
