"""csm-nnunet: Cross-Series Masking (CSM) pretraining for multi-series MRI, as an nnU-Net v2 plugin.

The method lives here (masking, network, loss), independent of nnU-Net; ``csm_nnunet.trainers`` and
``csm_nnunet.planners`` are the thin nnU-Net glue.
"""

import os as _os

__version__ = "0.1.0"

# Installed, trainers/ and planners/ live inside this package (pyproject maps them there). In a source checkout
# they sit beside it; let `csm_nnunet.trainers` resolve there too, so `python -m csm_nnunet` run from a checkout
# (where the checkout shadows the installed package) behaves like the installed one.
_repo = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "trainers")) and _os.path.isfile(
        _os.path.join(_repo, "trainers", "__init__.py")):
    __path__.append(_repo)
