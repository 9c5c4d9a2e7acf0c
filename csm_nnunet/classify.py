"""``csm_nnunet classify``: class probabilities for raw cases from a ``CSMClassifierTrainer`` model folder.

The counterpart of ``nnUNetv2_predict`` for classification. It reuses nnU-Net's machinery end to end: the model
folder is opened by ``nnUNetPredictor.initialize_from_trained_model_folder`` (plans, dataset.json, trainer class and
fold checkpoints), the raw files are found with nnU-Net's ``<case>_XXXX<ending>`` convention and preprocessed by the
configuration's own preprocessor (``run_case``: transpose, crop to non-zero, resample, normalise), exactly as for
training. Each case gives one crop around the centre of its region of interest (``--masks``: a mask per case in the
labelsTr convention; without a mask the image centre, right for inputs that are lesion crops already); the
probabilities of the chosen folds are averaged. The CSV is written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
from os.path import isdir, isfile, join

import numpy as np


class ClassifyError(ValueError):
    """A problem with the inputs of ``csm_nnunet classify``; the message names the file and the fix."""


def _case_files(folder: str, file_ending: str, num_channels: int) -> dict[str, list[str]]:
    if not isdir(folder):
        raise ClassifyError(f"input folder {folder} does not exist")
    files = sorted(f for f in os.listdir(folder) if f.endswith(file_ending))
    cases: dict[str, dict[int, str]] = {}
    for f in files:
        stem = f[: -len(file_ending)]
        if len(stem) < 6 or stem[-5] != "_" or not stem[-4:].isdigit():
            raise ClassifyError(f"{join(folder, f)}: expected <case>_XXXX{file_ending} (XXXX = channel number, "
                                f"nnU-Net's naming)")
        cases.setdefault(stem[:-5], {})[int(stem[-4:])] = join(folder, f)
    if not cases:
        raise ClassifyError(f"no {file_ending} images in {folder}")
    out = {}
    for case, channels in cases.items():
        wanted = set(range(num_channels))
        if set(channels) != wanted:
            missing = sorted(wanted - set(channels))
            extra = sorted(set(channels) - wanted)
            raise ClassifyError(f"case {case!r} in {folder}: the model needs channels 0..{num_channels - 1}; missing "
                                f"{[f'{case}_{c:04d}{file_ending}' for c in missing]}"
                                f"{f', unexpected {extra}' if extra else ''}. A series that was not acquired is "
                                f"given as an all-zero image (README 'Missing series')")
        out[case] = [channels[c] for c in range(num_channels)]
    return out


def classify(input_folder: str, output_csv: str, model_folder: str, folds: list[str] | None = None,
             checkpoint: str = "checkpoint_final.pth", masks: str | None = None, device: str = "cpu",
             log=print) -> tuple[list[str], np.ndarray, list[str]]:
    """Classify every case of ``input_folder``; returns ``(cases, probabilities [n, K], class names)`` and writes
    ``output_csv`` (``case, p_<class>..., predicted``)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from csm_nnunet.classification import crop_around, predictions_csv, roi_centre
    from csm_nnunet.fileio import write_text_atomically
    from csm_nnunet.trainers.csm_classifier_trainer import PLANS_KEY

    for name in ("plans.json", "dataset.json"):
        if not isfile(join(model_folder, name)):
            raise ClassifyError(f"{model_folder} has no {name}: -m must be a trained model folder "
                                f"(.../CSMClassifierTrainer__<plans>__3d_fullres)")
    out_dir = os.path.dirname(os.path.abspath(output_csv))
    if not isdir(out_dir) or not os.access(out_dir, os.W_OK):
        raise ClassifyError(f"cannot write {output_csv}: {out_dir} is not an existing, writable folder")
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=False, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device(device), allow_tqdm=False)
    try:
        predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint)
    except FileNotFoundError as e:
        raise ClassifyError(f"{e}; train those folds first or pick others with -f") from None
    cm = predictor.configuration_manager
    cfg = cm.configuration.get(PLANS_KEY)
    if cfg is None:
        raise ClassifyError(f"{model_folder} was trained with {predictor.trainer_name}, not a CSMClassifierTrainer; "
                            f"use nnUNetv2_predict for segmentation models")
    class_names, roi_labels = list(cfg["class_names"]), list(cfg.get("roi_labels", []))
    ds = predictor.dataset_json
    file_ending = ds.get("file_ending", ".nii.gz")
    cases = _case_files(input_folder, file_ending, len(cfg["series_names"]))
    if masks is not None and not isdir(masks):
        raise ClassifyError(f"--masks {masks} is not a folder")
    preprocessor = cm.preprocessor_class(verbose=False)
    net = predictor.network
    net = getattr(net, "_orig_mod", net)  # nnUNet_compile=t wraps it; the fold weights have the plain key names
    net = net.to(predictor.device)
    net.eval()
    names = sorted(cases)
    probs = np.zeros((len(names), len(class_names)))
    centred = 0
    chunk = 16  # cases preprocessed and held at once
    for start in range(0, len(names), chunk):
        crops = []
        for case in names[start:start + chunk]:
            mask = join(masks, case + file_ending) if masks is not None else None
            if mask is not None and not isfile(mask):
                log(f"csm_nnunet classify: no mask {mask}; cropping {case} around the image centre")
                mask = None
            data, seg, _ = preprocessor.run_case(cases[case], mask, predictor.plans_manager, cm, ds)
            centred += mask is not None
            crops.append(crop_around(data, roi_centre(data.shape[1:], seg, roi_labels), cm.patch_size))
        x = torch.from_numpy(np.stack(crops)).to(predictor.device)
        with torch.no_grad():
            for params in predictor.list_of_parameters:
                net.load_state_dict(params)
                probs[start:start + len(crops)] += torch.softmax(net(x).float(), 1).cpu().numpy()
    probs /= len(predictor.list_of_parameters)
    write_text_atomically(output_csv, predictions_csv(names, probs, class_names))
    log(f"csm_nnunet classify: {len(names)} cases, {len(predictor.list_of_parameters)} fold(s) averaged, "
        f"{centred} crop(s) centred on a mask -> {output_csv}")
    return names, probs, class_names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", dest="input", required=True, help="folder of raw images <case>_XXXX<ending>")
    parser.add_argument("-o", dest="output", required=True, help="CSV to write (case, p_<class>..., predicted)")
    parser.add_argument("-m", dest="model", required=True,
                        help="model folder: $nnUNet_results/DatasetXXX/CSMClassifierTrainer__<plans>__3d_fullres")
    parser.add_argument("-f", dest="folds", nargs="+", default=None,
                        help="folds to ensemble (default: every fold with the checkpoint)")
    parser.add_argument("-chk", dest="checkpoint", default="checkpoint_final.pth",
                        help="checkpoint name (default checkpoint_final.pth; checkpoint_best.pth = best val AUC)")
    parser.add_argument("--masks", help="folder of ROI masks <case><ending> (labelsTr convention) to centre crops on")
    parser.add_argument("-device", default="cpu", choices=["cpu", "cuda", "mps"])


def run(args: argparse.Namespace) -> int:
    try:
        classify(args.input, args.output, args.model, args.folds, args.checkpoint, args.masks, args.device)
    except (ClassifyError, ValueError, OSError) as e:
        print(f"csm_nnunet classify: error: {e}", file=sys.stderr)
        return 1
    return 0
