"""``csm_nnunet classify``: class probabilities for raw cases from a ``CSMClassifierTrainer`` model folder.

The counterpart of ``nnUNetv2_predict`` for classification. It reuses nnU-Net's machinery end to end: the model
folder is opened by ``nnUNetPredictor.initialize_from_trained_model_folder`` (plans, dataset.json, trainer class and
fold checkpoints), the raw files are found with nnU-Net's ``<case>_XXXX<ending>`` convention and preprocessed by the
configuration's own preprocessor (``run_case``: transpose, crop to non-zero, resample, normalise), exactly as for
training. Each case gives one crop around the centre of its region of interest (``--masks``: a mask per case in the
labelsTr convention; without a mask the image centre, right for inputs that are lesion crops already); the
probabilities of the chosen folds are averaged. The CSV is written atomically. Every input case is checked first
(:func:`csm_nnunet.validate.check_case_images`: all channel files, 3D, one grid, finite voxels), before the model is
loaded, so a bad case is named without waiting for the other cases' predictions.
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


def _load_folds(predictor, model_folder: str, folds: list[str] | None, checkpoint: str) -> None:
    """``predictor.initialize_from_trained_model_folder`` with its failures turned into errors that name the fold
    checkpoint and the fix (nnU-Net raises torch's unpickling errors or a KeyError without naming the file)."""
    import pickle
    import zipfile

    from csm_nnunet.validate import torch_file_problem

    if folds is None:
        folds = predictor.auto_detect_available_folds(model_folder, checkpoint)
        if not folds:
            raise ClassifyError(f"no fold_<n>/{checkpoint} in {model_folder}; train a fold first, or name the "
                                f"checkpoint with -chk (e.g. checkpoint_best.pth)")
    paths = [join(model_folder, f"fold_{f}", checkpoint) for f in folds]
    try:
        predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint)
    except FileNotFoundError as e:
        raise ClassifyError(f"{e}; train those folds first or pick others with -f") from None
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, KeyError, TypeError) as e:
        named = [f"{p} {why}" for p in paths if (why := torch_file_problem(p))]
        detail = str(e) if len(str(e)) <= 300 else str(e)[:300] + " ..."  # a state-dict mismatch lists every key
        raise ClassifyError(f"cannot load the model's checkpoint(s) ({type(e).__name__}: {detail}): "
                            f"{'; '.join(named) if named else ', '.join(paths)}. A checkpoint is truncated or not an "
                            f"nnU-Net trainer checkpoint; copy it again, or pick other folds (-f) or -chk") from None


def classify(input_folder: str, output_csv: str, model_folder: str, folds: list[str] | None = None,
             checkpoint: str = "checkpoint_final.pth", masks: str | None = None, device: str = "cpu",
             log=print) -> tuple[list[str], np.ndarray, list[str]]:
    """Classify every case of ``input_folder``; returns ``(cases, probabilities [n, K], class names)`` and writes
    ``output_csv`` (``case, p_<class>..., predicted``)."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from csm_nnunet.classification import crop_around, predictions_csv, roi_centre
    from csm_nnunet.fileio import write_text_atomically
    from csm_nnunet.trainer_utils import channel_names_of
    from csm_nnunet.trainers.csm_classifier_trainer import PLANS_KEY
    from csm_nnunet.validate import check_case_images

    for name in ("plans.json", "dataset.json"):
        if not isfile(join(model_folder, name)):
            raise ClassifyError(f"{model_folder} has no {name}: -m must be a trained model folder "
                                f"(.../CSMClassifierTrainer__<plans>__3d_fullres)")
    out_dir = os.path.dirname(os.path.abspath(output_csv))
    if not isdir(out_dir) or not os.access(out_dir, os.W_OK):
        raise ClassifyError(f"cannot write {output_csv}: {out_dir} is not an existing, writable folder")
    # every input case is checked before the model is loaded (files named, nothing written)
    ds = load_json(join(model_folder, "dataset.json"))
    file_ending = ds.get("file_ending", ".nii.gz")
    series = channel_names_of(ds)
    cases = _case_files(input_folder, file_ending, len(series))
    if masks is not None and not isdir(masks):
        raise ClassifyError(f"--masks {masks} is not a folder")
    reader = PlansManager(load_json(join(model_folder, "plans.json"))).image_reader_writer_class
    for case, files in cases.items():
        mask = join(masks, case + file_ending) if masks is not None else None
        check_case_images(files, series, label=mask if mask is not None and isfile(mask) else None,
                          reader_class=reader)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=False, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device(device), allow_tqdm=False)
    _load_folds(predictor, model_folder, folds, checkpoint)
    cm = predictor.configuration_manager
    cfg = cm.configuration.get(PLANS_KEY)
    if cfg is None:
        raise ClassifyError(f"{model_folder} was trained with {predictor.trainer_name}, not a CSMClassifierTrainer; "
                            f"use nnUNetv2_predict for segmentation models")
    class_names, roi_labels = list(cfg["class_names"]), list(cfg.get("roi_labels", []))
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
