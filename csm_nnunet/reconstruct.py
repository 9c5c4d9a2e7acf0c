"""``csm_nnunet reconstruct``: synthesise hidden or missing series of one case with a CSM pretraining model.

Cross-series masking trains the decoder to rebuild whole hidden series from the others, so the pretrained model is
also a cross-series synthesiser. This command runs it the way nnU-Net runs a segmentation model:

1. the model folder (``.../CSMPretrainer__<plans>__3d_fullres``) gives plans, dataset.json and the checkpoint
   (``csm_network`` rebuilds the network);
2. the case is preprocessed by the configuration's own preprocessor (transpose, crop to non-zero, resample,
   normalise); a series given as ``none`` (not acquired) enters as an all-zero image;
3. sliding windows of the pretraining patch size (nnU-Net's step computation and Gaussian weighting): in every
   window each shown series is fully visible, the hidden ones are fully masked, and the decoder predicts their tokens;
4. the prediction is taken back to the input's geometry (nnU-Net's probability resampling, the crop re-inserted, the
   transpose undone) and written with the geometry of the first given file. Intensities: z-score (and CT)
   normalisation is undone with the dataset fingerprint's foreground mean/std of that series (a missing series has no
   statistics of its own), so values are in the dataset's typical units, not a measurement.

Models trained with per-patch normalised targets (``CSMPretrainer_NormPix``) or fused tokens (``MAEPretrainer``) are
refused: the first predicts no absolute intensities, the second cannot hide a whole series.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from os.path import isdir, isfile, join

import numpy as np


class ReconstructError(ValueError):
    """A problem with the inputs of ``csm_nnunet reconstruct``; the message names the file or field and the fix."""


def _load_model(model_folder: str, fold: str, checkpoint: str):
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from csm_nnunet.network import CSMMaskedAutoencoder

    for name in ("plans.json", "dataset.json"):
        if not isfile(join(model_folder, name)):
            raise ReconstructError(f"{model_folder} has no {name}: -m must be a pretraining model folder "
                                   f"(.../CSMPretrainer__<plans>__3d_fullres)")
    path = join(model_folder, f"fold_{fold}", checkpoint)
    if not isfile(path):
        raise ReconstructError(f"{path} not found; pick the fold with -f (pretraining usually trains fold 'all')")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated/corrupt file: say which
        raise ReconstructError(f"{path} could not be read ({type(e).__name__}: {e}); the file is damaged") from None
    cfg = ckpt.get("csm_network") if isinstance(ckpt, dict) else None
    if cfg is None:
        raise ReconstructError(f"{path} is not a csm-nnunet pretraining checkpoint (no 'csm_network'); trainer "
                               f"{ckpt.get('trainer_name') if isinstance(ckpt, dict) else '?'}")
    if cfg.get("fused"):
        raise ReconstructError(f"{path} is a fused-token (MAEPretrainer) model: one token holds every series, so a "
                               f"whole series cannot be hidden and synthesised; use a CSMPretrainer model")
    if cfg.get("norm_pix_loss"):
        raise ReconstructError(f"{path} was trained with per-patch normalised targets (NormPix): it predicts patch "
                               f"shapes, not intensities; use a CSMPretrainer model without NormPix")
    net = CSMMaskedAutoencoder.from_config(cfg)
    net.load_state_dict(ckpt["network_weights"])
    return net.eval(), ckpt, load_json(join(model_folder, "plans.json")), load_json(join(model_folder, "dataset.json"))


def reconstruct(model_folder: str, inputs: list[str], hide: list[str], output: str, fold: str = "all",
                checkpoint: str = "checkpoint_final.pth", step: float = 0.5, device: str = "cpu",
                log=print) -> dict[str, str]:
    """Synthesise the ``hide`` series (names) of the case given by ``inputs`` (one file or ``none`` per series, in
    the model's channel order); returns ``{series name: written file}``."""
    import SimpleITK as sitk
    import torch
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from csm_nnunet.masking import SeriesMask
    from csm_nnunet.validate import check_case_images

    net, ckpt, plans, dataset_json = _load_model(model_folder, fold, checkpoint)
    names = list(net.series_names)
    if len(inputs) != len(names):
        raise ReconstructError(f"-i got {len(inputs)} entries but the model has {len(names)} series {names}: give one "
                               f"file per series in that order, 'none' for a series that was not acquired")
    unknown = [h for h in hide if h not in names]
    if unknown:
        raise ReconstructError(f"--hide {unknown}: not series of this model {names}")
    hidden = sorted({names.index(h) for h in hide} | {i for i, f in enumerate(inputs) if f.lower() == "none"})
    if not hidden:
        raise ReconstructError("nothing to synthesise: name series with --hide (or give 'none' for missing ones)")
    if len(hidden) == len(names):
        raise ReconstructError("every series is hidden or missing; at least one must be shown")
    given = [f for f in inputs if f.lower() != "none"]
    for f in given:
        if not isfile(f):
            raise ReconstructError(f"input file {f} does not exist")
    # 3D, one grid, finite voxels (as the dataset's nnU-Net reader sees them), before anything is computed or written
    check_case_images(given, [n for n, f in zip(names, inputs) if f.lower() != "none"],
                      reader_class=PlansManager(plans).image_reader_writer_class)
    ending = dataset_json.get("file_ending", ".nii.gz")
    if not output.endswith(ending):
        raise ReconstructError(f"-o {output}: the dataset's files end in {ending}; name the output <name>{ending}")
    out_dir = os.path.dirname(os.path.abspath(output))
    if not isdir(out_dir) or not os.access(out_dir, os.W_OK):
        raise ReconstructError(f"cannot write {output}: {out_dir} is not an existing, writable folder")

    pm = PlansManager(plans)
    cm = pm.get_configuration(ckpt["init_args"]["configuration"])
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        reference = sitk.ReadImage(given[0])
        for i, f in enumerate(inputs):
            if f.lower() == "none":  # not acquired: an all-zero image on the grid of a given series
                zero = sitk.Image(reference.GetSize(), sitk.sitkFloat32)
                zero.CopyInformation(reference)
                f = join(tmp, f"missing_{i:04d}{ending}")
                sitk.WriteImage(zero, f)
            files.append(f)
        data, _, props = cm.preprocessor_class(verbose=False).run_case(files, None, pm, cm, dataset_json)
    if "sitk_stuff" not in props:
        raise ReconstructError(f"the dataset's image reader {pm.image_reader_writer_class.__name__} keeps no "
                               f"SimpleITK geometry; reconstruct writes images for SimpleITK-read datasets only")
    data = data.astype(np.float32)
    data[hidden] = 0.0  # hidden series must not leak into the input

    # ---- sliding windows over the preprocessed case
    patch = tuple(net.patch_size)
    shape = data.shape[1:]
    pad = [max(0, p - s) for p, s in zip(patch, shape)]
    padded = np.pad(data, [(0, 0)] + [(q // 2, q - q // 2) for q in pad])
    steps = compute_steps_for_sliding_window(padded.shape[1:], patch, step)
    dev = torch.device(device)
    net = net.to(dev)
    gauss = compute_gaussian(patch, 1 / 8, 1, torch.float32, dev)
    acc = torch.zeros((len(names), *padded.shape[1:]), device=dev)
    weight = torch.zeros(padded.shape[1:], device=dev)
    S, N = len(names), net.num_patches
    shown = torch.ones(1, S, dtype=torch.bool)
    shown[0, hidden] = False
    mask = SeriesMask(visible=shown[:, :, None].expand(1, S, N).clone(), scored=~shown[:, :, None].expand(1, S, N),
                      hidden_series=~shown, present=torch.ones(1, S, dtype=torch.bool)).to(dev)
    windows = [(x, y, z) for x in steps[0] for y in steps[1] for z in steps[2]]
    log(f"csm_nnunet reconstruct: {len(windows)} windows of {list(patch)}, synthesising "
        f"{[names[h] for h in hidden]} from {[names[i] for i in range(S) if i not in hidden]}")
    with torch.no_grad():
        for x, y, z in windows:
            sl = (slice(x, x + patch[0]), slice(y, y + patch[1]), slice(z, z + patch[2]))
            window = torch.from_numpy(padded[(slice(None), *sl)]).to(dev)[None]
            recon = net.reconstruct(window, mask)[0]
            acc[(slice(None), *sl)] += recon * gauss
            weight[sl] += gauss
    pred = (acc / weight.clamp(min=1e-8)).cpu().numpy()
    pred = pred[(slice(None), *[slice(q // 2, q // 2 + s) for q, s in zip(pad, shape)])]

    # ---- back to the input's geometry: resample, re-insert the crop, undo the transpose
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

    spacing_t = [props["spacing"][i] for i in pm.transpose_forward]
    resampled = cm.resampling_fn_probabilities(pred[hidden], props["shape_after_cropping_and_before_resampling"],
                                               cm.spacing, spacing_t)
    resampled = np.asarray(resampled, dtype=np.float32)
    intensity = plans.get("foreground_intensity_properties_per_channel", {})
    written = {}
    stem = output[: -len(ending)]
    for j, h in enumerate(hidden):
        vol = resampled[j]
        scheme = cm.normalization_schemes[h] if h < len(cm.normalization_schemes) else ""
        stats = intensity.get(str(h))
        if scheme in ("ZScoreNormalization", "CTNormalization") and stats:
            vol = vol * float(stats["std"]) + float(stats["mean"])
        full = np.zeros(props["shape_before_cropping"], dtype=np.float32)
        full = insert_crop_into_image(full, vol, props["bbox_used_for_cropping"])
        full = np.asarray(full).transpose(pm.transpose_backward)
        img = sitk.GetImageFromArray(full)
        img.SetSpacing(props["sitk_stuff"]["spacing"])
        img.SetOrigin(props["sitk_stuff"]["origin"])
        img.SetDirection(props["sitk_stuff"]["direction"])
        target = output if len(hidden) == 1 else f"{stem}_{names[h]}{ending}"
        tmp_target = target[: -len(ending)] + ".tmp" + ending
        sitk.WriteImage(img, tmp_target, True)
        os.replace(tmp_target, target)
        written[names[h]] = target
        if inputs[h].lower() != "none":  # a hidden series that exists: say how close the synthesis is
            truth = sitk.GetArrayFromImage(sitk.ReadImage(inputs[h])).astype(np.float64)
            if truth.shape == full.shape and truth.std() > 0 and full.std() > 0:
                r = float(np.corrcoef(truth.ravel(), full.ravel())[0, 1])
                log(f"csm_nnunet reconstruct: {names[h]}: correlation with the given (hidden) image {r:.3f}")
    log(f"csm_nnunet reconstruct: wrote {', '.join(f'{k} -> {v}' for k, v in written.items())}")
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", dest="model", required=True,
                        help="pretraining model folder: $nnUNet_results/DatasetXXX/CSMPretrainer__<plans>__3d_fullres")
    parser.add_argument("-i", dest="inputs", nargs="+", required=True,
                        help="the case's files, one per series in the model's channel order; 'none' for a series "
                             "that was not acquired")
    parser.add_argument("--hide", nargs="*", default=[], help="series name(s) to hide and synthesise (missing "
                                                               "'none' series are synthesised anyway)")
    parser.add_argument("-o", dest="output", required=True, help="output file (<name><file ending>); with several "
                                                                  "synthesised series <name>_<series><ending> each")
    parser.add_argument("-f", dest="fold", default="all", help="fold of the pretraining run (default all)")
    parser.add_argument("-chk", dest="checkpoint", default="checkpoint_final.pth")
    parser.add_argument("--step", type=float, default=0.5, help="sliding-window step as a fraction of the patch")
    parser.add_argument("-device", default="cpu", choices=["cpu", "cuda", "mps"])


def run(args: argparse.Namespace) -> int:
    try:
        reconstruct(args.model, args.inputs, args.hide, args.output, args.fold, args.checkpoint, args.step,
                    args.device)
    except (ReconstructError, ValueError, OSError) as e:
        print(f"csm_nnunet reconstruct: error: {e}", file=sys.stderr)
        return 1
    return 0
