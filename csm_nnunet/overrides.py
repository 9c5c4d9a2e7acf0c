"""Environment overrides for short runs (CI, demos, evaluation) without code changes.

Every csm-nnunet trainer reads these after setting its paper-scale defaults and prints what it changed, so a log
always says whether a run was shortened.
"""

from __future__ import annotations

import os
from collections.abc import Callable

# variable -> (trainer attribute, parser)
ENV_OVERRIDES: dict[str, tuple[str, Callable[[str], object]]] = {
    "CSM_NUM_EPOCHS": ("num_epochs", int),
    "CSM_ITERS_PER_EPOCH": ("num_iterations_per_epoch", int),
    "CSM_VAL_ITERS": ("num_val_iterations_per_epoch", int),
    "CSM_PRESET": ("preset", str),
    "CSM_MASK_SEED": ("mask_seed", int),  # pretrainers: seed of the mask stream (other seeds = other masks)
    "CSM_LR": ("initial_lr", float),  # peak learning rate (after warm-up)
    "CSM_CROP": ("crop_size", int),  # classifier: edge of the ROI-centred crop (default: the plans' patch size)
}


def read_env_overrides(environ: dict[str, str] | None = None) -> dict[str, object]:
    """Parse the ``CSM_*`` variables that are set; a malformed value raises naming the variable and the fix."""
    from csm_nnunet.network import PRESETS

    environ = os.environ if environ is None else environ
    out: dict[str, object] = {}
    for var, (attr, parse) in ENV_OVERRIDES.items():
        raw = environ.get(var)
        if raw is None or raw == "":
            continue
        try:
            value = parse(raw)
        except ValueError:
            raise ValueError(f"environment variable {var}={raw!r} is not a valid {parse.__name__}; "
                             f"unset it or give e.g. {var}=2") from None
        if isinstance(value, int) and value < 1:
            raise ValueError(f"environment variable {var}={raw!r} must be >= 1")
        if isinstance(value, float) and not 0 < value < 1:
            raise ValueError(f"environment variable {var}={raw!r} must be a learning rate in (0, 1), e.g. 1e-4")
        if var == "CSM_PRESET" and value not in PRESETS:
            raise ValueError(f"environment variable CSM_PRESET={raw!r} is not a preset; "
                             f"choose one of {sorted(PRESETS)}")
        out[attr] = value
    return out


def apply_env_overrides(trainer: object, log: Callable[..., None], skip: tuple[str, ...] = ()
                        ) -> dict[str, object]:
    """Set the overridden attributes on ``trainer`` and log each change; attributes in ``skip`` are left alone (and
    the log says they were ignored)."""
    changes = read_env_overrides()
    for attr in skip:
        if changes.pop(attr, None) is not None:
            log(f"csm-nnunet: the {attr} override is ignored by {type(trainer).__name__}")
    for attr, value in changes.items():
        log(f"csm-nnunet: {attr} = {value!r} (from environment, default was {getattr(trainer, attr, None)!r})")
        setattr(trainer, attr, value)
    return changes
