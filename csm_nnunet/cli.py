"""The ``csm_nnunet`` command. Each sub-command lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int`` (or, for several commands in one module, ``"module:attribute"`` names an object with those two);
modules are imported only when their command runs, so ``--help`` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("csm_nnunet.demo", "the whole workflow on synthetic data in ~15 min on a CPU: pretrain, segment and "
                                "classify from CSM vs from scratch, a results table"),
    "doctor": ("csm_nnunet.doctor", "check that nnU-Net finds our classes, versions and the torch/torchvision pair"),
    "prepare-unlabeled": ("csm_nnunet.unlabeled",
                          "make a raw dataset without labelsTr plannable by nnU-Net (body-mask labels)"),
    "make-dataset": ("csm_nnunet.synthetic", "write a synthetic multi-series MRI-like dataset in nnU-Net raw format"),
    "export-primus": ("csm_nnunet.export", "turn a Primus-preset CSM encoder into -pretrained_weights for nnU-Net's "
                                           "own nnUNet_Primus_*_Trainer"),
    "import-labels": ("csm_nnunet.class_labels", "write per-case class labels from a CSV (case,label) into a raw "
                                                 "dataset's dataset.json"),
    "classify": ("csm_nnunet.classify", "class probabilities of raw cases from a CSMClassifierTrainer model folder "
                                        "(nnU-Net preprocessing, folds averaged) -> CSV"),
    "reconstruct": ("csm_nnunet.reconstruct", "synthesise hidden or missing series of a case with a CSM pretraining "
                                              "model (sliding window, written on the input's grid)"),
    "experiment": ("csm_nnunet.experiment", "compare fine-tuning arms (nnU-Net U-Net, fused-token ViT, CSM scratch/"
                                            "pretrained, Primus) on one split and budget; Dice, missing series"),
    "export-encoder": ("csm_nnunet.share:export_command", "write a pretraining run's encoder as one zip (weights, "
                                                          "preset, series, plans fingerprint, versions, sha256)"),
    "import-encoder": ("csm_nnunet.share:import_command", "check an encoder zip and write a checkpoint for "
                                                          "-pretrained_weights (the zip also works there directly)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="csm_nnunet", description=__doc__.split(".")[0] + ".")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.print_help()
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\ncsm_nnunet: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    name = argv[0]
    module_name, _, attribute = COMMANDS[name][0].partition(":")
    module = importlib.import_module(module_name)
    module = getattr(module, attribute) if attribute else module
    cmd_parser = argparse.ArgumentParser(prog=f"csm_nnunet {name}", description=COMMANDS[name][1])
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
