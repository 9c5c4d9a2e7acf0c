"""``csm_nnunet doctor``: is this installation usable, and if not, what is the fix?

Checks, each printed as OK/FAIL with the fix:
* versions of nnunetv2, torch, torchvision, timm, dynamic-network-architectures against the tested range;
* that torchvision imports beside torch (timm, and so dynamic-network-architectures, needs it);
* that nnU-Net's own, unmodified class lookups find our trainers and planner (the discovery shims are installed
  into nnU-Net's search folders by ``pip install``; an nnU-Net reinstall or a different environment loses them).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md

TESTED = {"nnunetv2": ("2.8", "2.9"), "torch": ("2.1", None)}
TRAINERS = ("CSMPretrainer", "CSMPretrainer_SamePositionMask", "CSMPretrainer_SeriesMaskNoRecon",
            "CSMPretrainer_NoSeriesMask", "CSMPretrainer_Mask50", "CSMPretrainer_NormPix", "MAEPretrainer",
            "CSMSegTrainer", "CSMSegTrainer_FusedTokens", "nnUNetTrainer_CSMBudget")
PLANNERS = ("CSMPlanner",)
REINSTALL = "pip install --force-reinstall --no-deps csm-nnunet  (or, from a checkout: pip install --no-deps .)"


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def check_versions() -> list[tuple[bool, str, str]]:
    results = []
    for dist in ("nnunetv2", "torch", "torchvision", "timm", "dynamic-network-architectures", "batchgeneratorsv2",
                 "csm-nnunet"):
        try:
            v = md.version(dist)
        except md.PackageNotFoundError:
            results.append((False, f"{dist} not installed", f"pip install -c constraints.txt {dist}"))
            continue
        ok, fix = True, ""
        if dist in TESTED:
            lo, hi = TESTED[dist]
            vt = _version_tuple(v)
            if vt < _version_tuple(lo) or (hi is not None and vt >= _version_tuple(hi)):
                ok, fix = False, f"csm-nnunet is tested with {dist} >= {lo}" + (f", < {hi}" if hi else "") + \
                    f": pip install '{dist}>={lo}" + (f",<{hi}'" if hi else "'")
        results.append((ok, f"{dist} {v}", fix))
    return results


def check_torchvision() -> tuple[bool, str, str]:
    try:
        import timm  # noqa: F401
        import torch
        import torchvision  # noqa: F401
    except Exception as exc:  # an ABI mismatch shows as an operator registration error
        return (False, f"torch/torchvision/timm do not import together: {exc!r:.200}",
                "install a matching pair, e.g. pip install torch==2.14.1 torchvision==0.29.1 (constraints.txt)")
    return True, f"torch {torch.__version__} + torchvision {torchvision.__version__} + timm import together", ""


_LOOKUP_SCRIPT = """
import json, os, sys, warnings
warnings.simplefilter("ignore")
out = []
try:
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
except Exception as exc:
    print(json.dumps([[False, "nnunetv2 does not import: %r" % exc, "pip install 'nnunetv2>=2.8,<2.9'"]]))
    sys.exit(0)
for name in sys.argv[1].split(","):
    try:
        cls = recursive_find_trainer_class_by_name(name)
        out.append([cls.__module__.startswith("csm_nnunet."), "nnUNetv2_train -tr %s -> %s" % (name, cls.__module__)])
    except Exception as exc:
        out.append([False, "nnUNetv2_train -tr %s: not found (%s)" % (name, str(exc)[:100])])
for name in sys.argv[2].split(","):
    cls = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "experiment_planning"), name,
                                      "nnunetv2.experiment_planning")
    out.append([cls is not None and cls.__module__.startswith("csm_nnunet."),
                "nnUNetv2_plan_and_preprocess -pl %s -> %s" % (name, getattr(cls, "__module__", "not found"))])
print(json.dumps(out))
"""


def check_discovery() -> list[tuple[bool, str, str]]:
    """Run nnU-Net's own lookups in a fresh interpreter started outside any checkout, exactly as its console
    scripts do: an already-imported ``csm_nnunet`` in this process would hide a broken installation."""
    import json
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run([sys.executable, "-c", _LOOKUP_SCRIPT, ",".join(TRAINERS), ",".join(PLANNERS)],
                              capture_output=True, text=True, cwd=cwd, timeout=300)
    try:
        rows = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return [(False, f"class lookup crashed: {proc.stderr.strip()[-300:]}", REINSTALL)]
    return [(bool(ok), what, "" if ok else REINSTALL) for ok, what, *_ in rows]


def run_checks() -> list[tuple[bool, str, str]]:
    return [*check_versions(), check_torchvision(), *check_discovery()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="print only failures")


def run(args: argparse.Namespace) -> int:
    results = run_checks()
    failed = [r for r in results if not r[0]]
    for ok, what, fix in results:
        if ok and args.quiet:
            continue
        print(f"[{'OK' if ok else 'FAIL'}] {what}" + (f"\n       fix: {fix}" if not ok and fix else ""))
    print(f"csm_nnunet doctor: {len(results) - len(failed)} ok, {len(failed)} failed")
    return 1 if failed else 0
