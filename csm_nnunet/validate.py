"""Input checks shared by the planner, the trainers and the commands: a malformed input is refused with a message that
names the file (or dataset.json field) and the fix, before anything is written.

Why one module: the same mistakes reach us through several doors (``nnUNetv2_plan_and_preprocess -pl CSMPlanner``,
``nnUNetv2_train`` on data planned without our planner, ``csm_nnunet classify`` / ``reconstruct`` on new cases), and
nnU-Net's own reaction is often far from the cause: a missing channel file ends in an ``IndexError`` after the whole
dataset was fingerprinted, series on different origins only print a warning, a 4D file becomes extra channels, and a
NaN voxel turns a whole channel into NaN at normalisation and the loss into NaN many steps later.
docs/reliability.md lists every malformed input and where it is caught.

Checks (see :func:`check_case_images`): every series of a case is a readable **3D** image on the **same voxel grid**
(size, spacing, origin, direction; CSM cuts all series into the same tokens, so they must be voxel-aligned) with
**finite** voxels. Voxels are read with nnU-Net's reader for the dataset when one is given, so the check sees what
nnU-Net will see: SimpleITK's NIfTI reader (nnU-Net's default for ``.nii.gz``) already returns NaN/Inf voxels as 0,
while ``.mha``/``.nrrd`` files and ``NibabelIO`` datasets keep them.

All-zero or constant series are **accepted**: an all-zero series is how a missing acquisition is stored (README
"Missing series"), and nnU-Net's z-score normalisation maps a constant series to zeros (``std`` is clamped), which
the networks treat as absent; the loss stays finite (tested in tests/test_bad_inputs.py).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os.path import isdir, isfile, join

import numpy as np

#: file endings whose header SimpleITK reads (geometry checks); other formats get the existence and voxel checks only
SITK_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".gipl", ".gipl.gz")
MISSING_SERIES_KEY = "missing_series"
# Origins may differ by header rounding (float32 qform/sform) but not by a real shift: more than this fraction of a
# voxel means the arrays are not voxel-aligned, and nnU-Net would still stack them as if they were.
ORIGIN_TOLERANCE_VOXELS = 0.1
DIRECTION_TOLERANCE = 1e-3
SPACING_RTOL = 1e-4


class InputError(ValueError):
    """A malformed input; the message names the file or field and the fix."""


@dataclass(frozen=True)
class Grid:
    """Voxel grid of an image as SimpleITK reports it (x, y, z order)."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def differences(self, other: Grid) -> list[str]:
        """Human-readable list of what differs from ``other`` (empty when the grids match within tolerance)."""
        out = []
        if self.size != other.size:
            out.append(f"size {list(self.size)} vs {list(other.size)}")
        if not np.allclose(self.spacing, other.spacing, rtol=SPACING_RTOL, atol=0):
            out.append(f"spacing {_fmt(self.spacing)} vs {_fmt(other.spacing)}")
        elif np.any(np.abs(np.subtract(self.origin, other.origin)) >
                    ORIGIN_TOLERANCE_VOXELS * np.asarray(other.spacing)):
            out.append(f"origin {_fmt(self.origin)} vs {_fmt(other.origin)}")
        if not np.allclose(self.direction, other.direction, atol=DIRECTION_TOLERANCE, rtol=0):
            out.append(f"direction {_fmt(self.direction)} vs {_fmt(other.direction)}")
        return out


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _name(path: str, series: str | None) -> str:
    return f"{path} (series {series!r})" if series is not None else path


def _reason(exc: Exception) -> str:
    """The informative line of a (multi-line) SimpleITK/ITK exception, without source paths and object ids."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    line = next((ln for ln in lines if "ERROR" in ln), lines[-1] if lines else type(exc).__name__)
    line = re.sub(r"^.*?ERROR:\s*", "", line)
    return re.sub(r"\w+\(0x[0-9a-fA-F]+\):\s*", "", line)


def _check_gzip_complete(path: str) -> None:
    """ITK's NIfTI reader fills a truncated ``.nii.gz`` with zeros without an error; the gzip stream says so."""
    import gzip
    import zlib

    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    except (EOFError, OSError, zlib.error) as e:
        raise InputError(f"{path} is truncated or damaged ({e}); its reader would fill the missing voxels with "
                         f"zeros. Copy it again") from None


def image_grid(path: str, series: str | None = None) -> Grid:
    """Grid of ``path`` from its header (no voxels read); an :class:`InputError` for a missing, unreadable or
    non-3D file."""
    import SimpleITK as sitk

    if not isfile(path):
        raise InputError(f"{_name(path, series)} does not exist")
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise InputError(f"cannot read {_name(path, series)} ({_reason(e)}): the file is damaged or not an image; "
                         f"copy it again or convert it (e.g. to .nii.gz)") from None
    grid = Grid(tuple(int(s) for s in reader.GetSize()), tuple(float(s) for s in reader.GetSpacing()),
                tuple(float(s) for s in reader.GetOrigin()), tuple(float(s) for s in reader.GetDirection()))
    dim = len(grid.size)
    if reader.GetNumberOfComponents() > 1:
        raise InputError(f"{_name(path, series)} has {reader.GetNumberOfComponents()} values per voxel (a vector, RGB "
                         f"or multi-volume image, size {list(grid.size)}): give one scalar 3D file per series "
                         f"(<case>_0000, <case>_0001, ...; nnU-Net would read the extra values as channels)")
    if dim == 2:
        raise InputError(f"{_name(path, series)} is a 2D image (size {list(grid.size)}): csm-nnunet's ViTs cut 3D "
                         f"volumes into 3D tokens; give a 3D volume per series")
    if dim == 4:
        raise InputError(f"{_name(path, series)} is a 4D image (size {list(grid.size)}): give one 3D file per series "
                         f"(<case>_0000, <case>_0001, ...; nnU-Net would read the 4th axis as extra channels). Split "
                         f"it, e.g. with SimpleITK's image[:, :, :, t]")
    if dim != 3:
        raise InputError(f"{_name(path, series)} has {dim} dimensions (size {list(grid.size)}); a 3D volume is "
                         f"expected")
    return grid


def count_nonfinite(path: str, reader_class=None) -> tuple[int, int]:
    """``(non-finite voxels, all voxels)`` of ``path`` as ``reader_class`` (an nnU-Net ``BaseReaderWriter``) reads
    it, or as SimpleITK reads it when no reader is given."""
    if path.endswith(".gz"):
        _check_gzip_complete(path)
    try:
        if reader_class is not None:
            data, _ = reader_class().read_images([path])
        else:
            import SimpleITK as sitk

            data = sitk.GetArrayFromImage(sitk.ReadImage(path))
    except Exception as e:  # a header that reads but truncated voxel data, or a reader's own complaint
        raise InputError(f"cannot read the voxels of {path} ({_reason(e)}): the file is damaged (truncated?); copy "
                         f"it again") from None
    data = np.asarray(data)
    if not np.issubdtype(data.dtype, np.floating):
        return 0, int(data.size)
    return int(data.size - np.count_nonzero(np.isfinite(data))), int(data.size)


def check_case_images(files: Sequence[str], series_names: Sequence[str] | None = None, label: str | None = None,
                      reader_class=None, check_voxels: bool = True) -> Grid | None:
    """Check the series files of one case (in channel order); return the case's grid (None for non-SimpleITK
    formats, whose geometry nnU-Net's own reader checks).

    Raises :class:`InputError` naming the file when a file is missing or unreadable, is not 3D, lies on another grid
    than the first series (or, for ``label``, than the images), or (``check_voxels``) holds NaN/Inf voxels.
    """
    names = list(series_names) if series_names is not None else [None] * len(files)
    if len(names) != len(files):
        raise InputError(f"{len(files)} files {list(files)} for {len(names)} series {names}: give one file per series")
    reference: Grid | None = None
    for f, s in zip(files, names):
        if not isfile(f):
            raise InputError(f"{_name(f, s)} does not exist")
        if not f.endswith(SITK_ENDINGS):
            continue
        grid = image_grid(f, s)
        if reference is None:
            reference = grid
            continue
        diff = grid.differences(reference)
        if diff:
            raise InputError(f"{_name(f, s)} is not on the voxel grid of {_name(files[0], names[0])}: "
                             f"{'; '.join(diff)}. Every series of a case must share one grid (CSM takes the same "
                             f"tokens from every series); resample/register the series onto the first one")
    if label is not None and reference is not None and label.endswith(SITK_ENDINGS):
        diff = image_grid(label).differences(reference)
        if diff:
            raise InputError(f"label file {label} is not on the voxel grid of its images ({files[0]}): "
                             f"{'; '.join(diff)}; resample the label onto the images (nearest neighbour)")
    if check_voxels:
        for f, s in zip(files, names):
            bad, total = count_nonfinite(f, reader_class)
            if bad:
                raise InputError(f"{_name(f, s)} has {bad} NaN/Inf voxel(s) of {total}: nnU-Net's normalisation would "
                                 f"turn the whole series into NaN and training would diverge; replace them (e.g. "
                                 f"with 0 or the background value) and run again")
    return reference


def check_missing_series(dataset_json: Mapping, series_names: Sequence[str], case_ids: Sequence[str] | None = None,
                         source: str = "dataset.json") -> list[str]:
    """Validate dataset.json ``missing_series`` ({case: [series names]}); return warnings (cases the dataset does
    not have, when ``case_ids`` is given).

    A name that is not a series would silently show an all-zero image to the encoder as if it were data, and a case
    with every series missing has nothing to learn from: both are :class:`InputError`.
    """
    missing = dataset_json.get(MISSING_SERIES_KEY)
    if not missing:
        return []
    if not isinstance(missing, Mapping) or not all(isinstance(v, (list, tuple)) for v in missing.values()):
        raise InputError(f"{source}: {MISSING_SERIES_KEY!r} must map case ids to lists of series names, e.g. "
                         f"{{\"case_007\": [\"T1ce\"]}}")
    names = [str(s) for s in series_names]
    for case, listed in missing.items():
        unknown = [str(s) for s in listed if str(s) not in names]
        if unknown:
            raise InputError(f"{source}: {MISSING_SERIES_KEY}[{case!r}] names {unknown}, which are not series of this "
                             f"dataset (channel_names: {names}); use those names")
        if names and set(map(str, listed)) >= set(names):
            raise InputError(f"{source}: {MISSING_SERIES_KEY}[{case!r}] lists every series {names}: the case has no "
                             f"image data; remove the case from the dataset")
    if case_ids is None:
        return []
    extra = sorted(set(missing) - set(case_ids))
    if not extra:
        return []
    return [f"{source}: {MISSING_SERIES_KEY} names {len(extra)} case(s) the dataset does not have, ignored: "
            f"{extra[:10]}{' ...' if len(extra) > 10 else ''}"]


def _series_names(dataset_json: Mapping, source: str) -> list[str]:
    names = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not isinstance(names, Mapping) or not names:
        raise InputError(f"{source} has no 'channel_names': csm-nnunet keys its series embedding by them; add e.g. "
                         f"\"channel_names\": {{\"0\": \"T1\", \"1\": \"T2\"}}")
    try:
        keys = sorted(names, key=int)
    except ValueError:
        raise InputError(f"{source}: 'channel_names' keys must be channel numbers \"0\", \"1\", ..., got "
                         f"{list(names)}") from None
    if [int(k) for k in keys] != list(range(len(keys))):
        raise InputError(f"{source}: 'channel_names' must number the channels 0..{len(keys) - 1}, got {keys}")
    return [str(names[k]) for k in keys]


_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def raw_training_cases(folder: str, dataset_json: Mapping) -> dict[str, tuple[list[str], str]]:
    """``{case: ([image per channel], label file)}`` of a raw nnU-Net dataset, with every channel file present.

    Unlike nnU-Net's own listing, which takes whatever ``<case>_XXXX`` files exist, a missing or surplus channel file
    is an :class:`InputError` naming it.
    """
    source = join(folder, "dataset.json")
    names = _series_names(dataset_json, source)
    ending = dataset_json.get("file_ending")
    if not ending:
        raise InputError(f"{source} has no 'file_ending' (e.g. \".nii.gz\"); nnU-Net needs it to find the images")
    if "dataset" in dataset_json:  # explicit file lists (nnU-Net's alternative to imagesTr/labelsTr)
        out = {}
        for case, entry in dataset_json["dataset"].items():
            images = [f if os.path.isabs(f) else join(folder, f) for f in map(os.path.expandvars, entry["images"])]
            label = os.path.expandvars(entry["label"])
            if len(images) != len(names):
                raise InputError(f"{source}: dataset[{case!r}] lists {len(images)} image(s) but channel_names lists "
                                 f"{len(names)} series {names}; give one image per series")
            out[case] = (images, label if os.path.isabs(label) else join(folder, label))
        if not out:
            raise InputError(f"{source}: 'dataset' lists no cases: the dataset is empty")
        return out
    images_dir, labels_dir = join(folder, "imagesTr"), join(folder, "labelsTr")
    if not isdir(images_dir):
        raise InputError(f"{images_dir} is missing: nnU-Net's raw layout keeps the training images there")
    channels: dict[str, dict[int, str]] = {}
    for f in sorted(os.listdir(images_dir)):
        if not f.endswith(ending):
            continue
        m = _CHANNEL.match(f[: -len(ending)])
        if m is None:
            raise InputError(f"{join(images_dir, f)}: expected <case>_XXXX{ending} (XXXX = the 4-digit channel "
                             f"number, nnU-Net's naming); rename it")
        channels.setdefault(m["case"], {})[int(m["channel"])] = join(images_dir, f)
    if not channels:
        raise InputError(f"no training images (*{ending}) in {images_dir}: the dataset is empty; add "
                         f"<case>_0000{ending} ... per case (or fix 'file_ending' in dataset.json)")
    out = {}
    for case, found in channels.items():
        for c in range(len(names)):
            if c not in found:
                raise InputError(f"case {case!r} has no file for channel {c} ({names[c]!r}): "
                                 f"{join(images_dir, f'{case}_{c:04d}{ending}')} is missing. A series that was not "
                                 f"acquired is stored as an all-zero image and listed in dataset.json "
                                 f"'missing_series' (README 'Missing series')")
        extra = sorted(c for c in found if c >= len(names))
        if extra:
            raise InputError(f"case {case!r} has {found[extra[0]]}, but dataset.json channel_names lists "
                             f"{len(names)} series {names} (channels 0..{len(names) - 1}); remove the file or add "
                             f"the series to channel_names")
        label = join(labels_dir, case + ending)
        if not isfile(label):
            raise InputError(f"{label} is missing: nnU-Net's planning needs a label file per training case; for "
                             f"images without annotations run `csm_nnunet prepare-unlabeled {folder}`")
        out[case] = ([found[c] for c in range(len(names))], label)
    return out


def check_raw_dataset(folder: str, dataset_json: Mapping | None = None, reader_class=None,
                      check_voxels: bool = True, log=print) -> list[str]:
    """Check a whole raw training dataset (every case, see :func:`raw_training_cases` and
    :func:`check_case_images`, and dataset.json ``missing_series``); returns the case ids.

    Reads every image once (the voxel check), as nnU-Net's fingerprinting does.
    """
    source = join(folder, "dataset.json")
    if dataset_json is None:
        if not isfile(source):
            raise InputError(f"{source} is missing; write a dataset.json (channel_names, labels, numTraining, "
                             f"file_ending) as nnU-Net documents")
        with open(source) as f:
            dataset_json = json.load(f)
    names = _series_names(dataset_json, source)
    cases = raw_training_cases(folder, dataset_json)
    for note in check_missing_series(dataset_json, names, list(cases), source=source):
        warnings.warn(note, stacklevel=2)
        if log is not None:
            log(f"csm-nnunet WARNING: {note}")
    for files, label in cases.values():
        check_case_images(files, names, label=label, reader_class=reader_class, check_voxels=check_voxels)
    return sorted(cases)


def check_finite_batch(data, keys: Sequence[str] | None = None, where: str = "the preprocessed data") -> None:
    """Refuse a training/validation batch with NaN/Inf voxels, naming the cases, before it reaches the optimiser
    (data planned without CSMPlanner is not checked at planning time)."""
    import torch

    x = data if isinstance(data, torch.Tensor) else torch.as_tensor(np.asarray(data))
    if not x.is_floating_point() or bool(torch.isfinite(x).all()):
        return
    bad = (~torch.isfinite(x)).reshape(x.shape[0], -1).any(1).tolist()
    keys = list(keys) if keys is not None else [f"#{i}" for i in range(x.shape[0])]
    cases = sorted({str(k) for k, b in zip(keys, bad) if b})
    raise InputError(f"NaN/Inf voxels in case(s) {cases} of {where}: their raw images hold NaN/Inf values (nnU-Net's "
                     f"normalisation spreads one over the whole series). Fix those images and run "
                     f"nnUNetv2_plan_and_preprocess again (with -pl CSMPlanner, planning names the file)")


def check_trainable_cases(preprocessed_folder: str, fold: int | str, splits_file: str) -> list[str]:
    """The preprocessed case ids of a training run; refuse an empty dataset, and a fold that nnU-Net's automatic
    5-fold split cannot make (fewer than 5 cases and no ``splits_final.json``), before nnU-Net creates the output
    folder. Returns the case ids."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    cases = []
    if isdir(preprocessed_folder):
        try:
            cases = list(infer_dataset_class(preprocessed_folder).get_identifiers(preprocessed_folder))
        except Exception:  # no case files of a known format: nnU-Net cannot infer the dataset class
            cases = []
    if not cases:
        raise InputError(f"no preprocessed cases in {preprocessed_folder}; run nnUNetv2_plan_and_preprocess for this "
                         f"dataset, plans and configuration first")
    if str(fold) != "all" and not isfile(splits_file) and len(cases) < 5:
        raise InputError(f"fold {fold}: the dataset has {len(cases)} case(s), and nnU-Net's automatic 5-fold split "
                         f"needs at least 5. Train fold 'all' (every case for training and validation), or write "
                         f"your own split to {splits_file}")
    return cases


def torch_file_problem(path: str) -> str | None:
    """Why ``path`` cannot be a checkpoint written by ``torch.save`` (None when it may be one): cheap checks of the
    file itself, to name the damaged file among several after ``torch.load`` failed."""
    import zipfile

    if not isfile(path):
        return "does not exist"
    size = os.path.getsize(path)
    if size == 0:
        return "is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:1] == b"\x80":  # the legacy (pre-zip) pickle format
        return None
    if not zipfile.is_zipfile(path):
        return (f"is not a complete torch checkpoint ({size} bytes, no zip directory at its end: truncated, or not a "
                f"torch file)")
    return None


def check_3d_configuration(patch_size: Sequence[int], configuration: str) -> None:
    """Refuse a 2D configuration: the ViTs cut 3D tokens. Checked from the plans, so a user who asks for ``2d`` hears
    this rather than that the (unneeded) 2d preprocessing is missing."""
    if len(patch_size) != 3:
        raise ValueError(f"configuration {configuration!r} has patch size {list(patch_size)}: csm-nnunet's ViTs are "
                         f"3D only (2D is not supported). Train the 3d_fullres configuration.")


def check_training_setup(plans: Mapping, configuration: str, fold: int | str, dataset_json: Mapping,
                         series_names: Sequence[str]) -> list[str]:
    """What a trainer can check before nnU-Net creates its output folder: dataset.json ``missing_series`` and the
    preprocessed cases for ``fold`` (see :func:`check_missing_series`, :func:`check_trainable_cases`), and that the
    configuration is 3D. Returns the preprocessed case ids ([] when ``nnUNet_preprocessed`` is not set)."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    check_missing_series(dataset_json, series_names, source="the preprocessed dataset.json")
    pm = PlansManager(dict(plans))
    cm = pm.get_configuration(configuration)
    check_3d_configuration(cm.patch_size, configuration)
    if not nnUNet_preprocessed:
        return []  # nnU-Net itself says that the variable is missing
    base = join(nnUNet_preprocessed, pm.dataset_name)
    return check_trainable_cases(join(base, cm.data_identifier), fold, join(base, "splits_final.json"))
