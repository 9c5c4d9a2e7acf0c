"""``python -m csm_nnunet ...`` is the same as the ``csm_nnunet`` console script."""

from csm_nnunet.cli import main

raise SystemExit(main())
