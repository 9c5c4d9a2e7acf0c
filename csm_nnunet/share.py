"""``csm_nnunet export-encoder`` / ``import-encoder``: a pretrained CSM encoder as one self-describing file.

A pretraining run's ``checkpoint_final.pth`` carries the optimizer, the reconstruction decoder and the whole plans, and
says nothing a colleague on another machine can check before fine-tuning with it. The encoder archive (a zip) holds
only what :func:`csm_nnunet.adapt.load_pretrained_checkpoint` uses, plus what is needed to judge whether it fits:

* ``encoder_weights.pt``: ``torch.save`` of ``{key: CPU tensor}`` for the encoder keys
  (:func:`csm_nnunet.segmentation.is_encoder_key`: per-series patch embedding, series embedding, ``eva.*``); it loads
  with ``torch.load(..., weights_only=True)``, so reading a shared file runs no pickled code;
* ``csm_encoder.json``: format version, csm-nnunet/torch/nnunetv2 versions, ``csm_network`` (the network config the
  adaptation needs: preset, token size, series names, pretraining patch size, fused or not), masking settings, the
  plans name/configuration and a fingerprint of the preprocessing (spacing, patch size, normalisation, channel names),
  the source trainer and epoch, and the sha256 of ``encoder_weights.pt``.

``import-encoder`` checks all of that (a zip, both members, a known format version, the fields, the sha256, plain
tensors that fit the config) and writes a checkpoint that ``nnUNetv2_train ... -pretrained_weights`` reads through
the usual adaptation; ``-pretrained_weights encoder.zip`` also works directly (same checks). Every refusal names the
file and the fix, and nothing is left half-written (temporary file + rename).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from os.path import basename, dirname, isdir, isfile, join
from typing import Any, NamedTuple

import torch

import csm_nnunet
from csm_nnunet.segmentation import EVA_PREFIX, PER_SERIES_ENCODER_KEYS, is_encoder_key

FORMAT = "csm-nnunet-encoder"
#: Bump when the layout or the meaning of a field changes; readers refuse versions newer than theirs.
FORMAT_VERSION = 1
METADATA_MEMBER = "csm_encoder.json"
WEIGHTS_MEMBER = "encoder_weights.pt"
REQUIRED_METADATA = ("format", "format_version", "csm_nnunet_version", "torch_version", "nnunetv2_version",
                     "csm_network", "preset", "token_size", "series_names", "masking", "plans", "source", "weights")
#: ``csm_network`` fields that :func:`csm_nnunet.adapt.adapt_encoder_state` reads.
REQUIRED_NETWORK = ("series_names", "patch_size", "preset", "token_size")
REQUIRED_TENSORS = (*PER_SERIES_ENCODER_KEYS, EVA_PREFIX + "pos_embed")
PRETRAINERS = "CSMPretrainer, a CSMPretrainer_* ablation or MAEPretrainer"


class ShareError(ValueError):
    """A file that cannot be exported or imported; the message names the file, the reason and the fix."""


# ---------------------------------------------------------------------------------------------------- export
def resolve_checkpoint(model: str, checkpoint: str = "checkpoint_final.pth", fold: str | None = None) -> str:
    """The checkpoint file meant by ``model``: a checkpoint file, a fold folder, or a model folder
    (``.../CSMPretrainer__<plans>__<configuration>``; its only fold, or ``fold_<fold>``)."""
    if isfile(model):
        return model
    if not isdir(model):
        raise ShareError(f"{model} does not exist; pass a pretraining model folder "
                         f"($nnUNet_results/DatasetXXX/CSMPretrainer__<plans>__3d_fullres), a fold folder or a "
                         f"checkpoint file")
    has_checkpoints = any(n.startswith("checkpoint_") and n.endswith(".pth") for n in os.listdir(model))
    if has_checkpoints or basename(os.path.normpath(model)).startswith("fold_"):
        fold_folder = model
    else:
        folds = sorted(n[len("fold_"):] for n in os.listdir(model) if n.startswith("fold_") and isdir(join(model, n)))
        if not folds:
            raise ShareError(f"{model} has no fold_* folder and no checkpoint: it is not an nnU-Net model folder (or "
                             f"the run has not saved a checkpoint yet); pass $nnUNet_results/DatasetXXX/"
                             f"CSMPretrainer__<plans>__3d_fullres")
        if fold is None and len(folds) > 1:
            raise ShareError(f"{model} holds folds {folds}; pick one with -f (pretraining usually trains 'all')")
        fold = folds[0] if fold is None else str(fold)
        if fold not in folds:
            raise ShareError(f"{model} has no fold_{fold} (it has folds {folds}); pass -f with one of them")
        fold_folder = join(model, f"fold_{fold}")
    path = join(fold_folder, checkpoint)
    if not isfile(path):
        found = sorted(n for n in os.listdir(fold_folder) if n.startswith("checkpoint_") and n.endswith(".pth"))
        unfinished = ("" if "checkpoint_final.pth" in found else
                      " (the run has not finished: resume it with nnUNetv2_train ... --c, or export what it saved)")
        hint = (f"; it has {', '.join(found)}{unfinished}: pass e.g. -chk {found[0]}" if found
                else "; has the pretraining saved a checkpoint yet?")
        raise ShareError(f"no {checkpoint} in {fold_folder}{hint}")
    return path


def _load_pretraining_checkpoint(path: str) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)  # a local nnU-Net checkpoint (numpy inside)
    except Exception as e:  # noqa: BLE001 -- torch raises many types for a damaged file; each means the same
        raise ShareError(f"cannot read {path} ({type(e).__name__}: {e}); the file is truncated or corrupt: copy it "
                         f"again or export another checkpoint with -chk (checkpoint_best.pth, "
                         f"checkpoint_latest.pth)") from None
    if not isinstance(ckpt, Mapping) or "network_weights" not in ckpt:
        raise ShareError(f"{path} is not an nnU-Net checkpoint (no 'network_weights'); pass the folder of a "
                         f"{PRETRAINERS} run")
    if "csm_network" not in ckpt:
        trainer = str(ckpt.get("trainer_name", "an unknown trainer"))
        what = ("a fine-tuned csm-nnunet model, not a pretraining one" if trainer.startswith("CSM")
                else "not a csm-nnunet pretraining model")
        raise ShareError(f"{path} was written by {trainer}: {what} (no 'csm_network' encoder config). export-encoder "
                         f"takes the model folder of a {PRETRAINERS} run, e.g. $nnUNet_results/DatasetXXX/"
                         f"CSMPretrainer__nnUNetCSMPlans__3d_fullres"
                         + ("; export the pretraining run this model was fine-tuned from"
                            if trainer.startswith("CSM") else ""))
    return dict(ckpt)


def plans_fingerprint(plans: Mapping, configuration: str, dataset_json: Mapping) -> dict[str, Any]:
    """What fixes the preprocessing the encoder saw, and its sha256 (canonical JSON): equal fingerprints mean the
    same spacing, patch size, normalisation and series; a different one is allowed (the adaptation resamples the
    position table and matches series by name) but is worth knowing before fine-tuning."""
    from csm_nnunet.trainer_utils import channel_names_of

    conf = plans.get("configurations", {}).get(configuration)
    if conf is None:
        raise ShareError(f"the plans {plans.get('plans_name')!r} have no configuration {configuration!r}")
    try:
        channel_names = channel_names_of(dict(dataset_json))
    except ValueError as e:
        raise ShareError(f"the run's dataset.json: {e}") from None
    fields = {"configuration": configuration,
              "spacing": [float(s) for s in conf.get("spacing", [])],
              "patch_size": [int(p) for p in conf.get("patch_size", [])],
              "normalization_schemes": list(conf.get("normalization_schemes", [])),
              "use_mask_for_norm": [bool(u) for u in conf.get("use_mask_for_norm", [])],
              "transpose_forward": list(plans.get("transpose_forward", [])),
              "channel_names": channel_names}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return {"plans_name": plans.get("plans_name"), "dataset_name": plans.get("dataset_name"), **fields,
            "sha256": digest}


def _plans_of(ckpt: Mapping, path: str) -> tuple[dict, str, dict]:
    """Plans, configuration and dataset.json the run trained with: nnU-Net keeps them in the checkpoint's
    ``init_args``; the model folder's plans.json/dataset.json (and its name) are the fallback."""
    init = ckpt.get("init_args") or {}
    if all(k in init for k in ("plans", "configuration", "dataset_json")):
        return init["plans"], str(init["configuration"]), init["dataset_json"]
    model_folder = dirname(dirname(os.path.abspath(path)))
    files = [join(model_folder, n) for n in ("plans.json", "dataset.json")]
    parts = basename(model_folder).split("__")
    if not all(isfile(f) for f in files) or len(parts) != 3:
        raise ShareError(f"{path} does not record its plans (no init_args) and {model_folder} is not a model folder "
                         f"with plans.json and dataset.json; pass the checkpoint inside its nnU-Net results folder")
    with open(files[0]) as f, open(files[1]) as g:
        return json.load(f), parts[2], json.load(g)


def _version(package: str) -> str | None:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return None


def _serialize(tensors: Mapping[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(dict(tensors), buffer)
    return buffer.getvalue()


def export_encoder(model: str, output: str, checkpoint: str = "checkpoint_final.pth", fold: str | None = None,
                   log: Callable[[str], object] | None = print) -> dict:
    """Write the encoder archive of a pretraining run to ``output``; returns its metadata."""
    from csm_nnunet.adapt import _strip_wrappers

    output = os.fspath(output)
    if isdir(output):
        raise ShareError(f"-o {output} is a folder; pass a file name such as {join(output, 'encoder.zip')}")
    path = resolve_checkpoint(os.fspath(model), checkpoint, fold)
    ckpt = _load_pretraining_checkpoint(path)
    config = dict(ckpt["csm_network"])
    missing_cfg = [k for k in REQUIRED_NETWORK if k not in config]
    if missing_cfg:
        raise ShareError(f"{path}: 'csm_network' lacks {missing_cfg}; the checkpoint was written by an older or "
                         f"modified trainer; pretrain again with this csm-nnunet")
    # clone(): a view would make torch.save write its whole storage (the full network) into the archive
    encoder = {k: v.detach().cpu().clone() for k, v in _strip_wrappers(ckpt["network_weights"]).items()
               if is_encoder_key(k)}
    missing = [k for k in REQUIRED_TENSORS if k not in encoder]
    if missing:
        raise ShareError(f"{path} lacks the encoder tensors {missing}; the checkpoint is incomplete or was written "
                         f"by a different network")
    plans, configuration, dataset_json = _plans_of(ckpt, path)
    weights = _serialize(encoder)
    init = ckpt.get("init_args") or {}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "csm_nnunet_version": csm_nnunet.__version__,
        "torch_version": torch.__version__,
        "nnunetv2_version": _version("nnunetv2"),
        "csm_network": config,
        "preset": config["preset"].get("name"),
        "token_size": int(config["token_size"]),
        "series_names": [str(s) for s in config["series_names"]],
        "masking": ckpt.get("csm_masking"),
        "plans": plans_fingerprint(plans, configuration, dataset_json),
        "source": {"trainer": ckpt.get("trainer_name"), "epoch": ckpt.get("current_epoch"),
                   "fold": None if init.get("fold") is None else str(init["fold"]),
                   "checkpoint": basename(path)},
        "weights": {"member": WEIGHTS_MEMBER, "sha256": hashlib.sha256(weights).hexdigest(),
                    "num_tensors": len(encoder), "num_parameters": int(sum(v.numel() for v in encoder.values()))},
    }
    folder = dirname(os.path.abspath(output))
    tmp = output + ".tmp"
    try:
        os.makedirs(folder, exist_ok=True)
        with zipfile.ZipFile(tmp, "w") as zf:  # metadata first: a reader lists the archive without the weights
            zf.writestr(METADATA_MEMBER, json.dumps(meta, indent=2), compress_type=zipfile.ZIP_DEFLATED)
            zf.writestr(WEIGHTS_MEMBER, weights, compress_type=zipfile.ZIP_STORED)  # float tensors barely compress
        os.replace(tmp, output)
    except OSError as e:
        raise ShareError(f"cannot write {output} ({e.strerror or e}); choose a writable -o") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if log is not None:
        log(describe(meta, output) + f"\n  exported from {path}\n  written: {output}")
    return meta


# ---------------------------------------------------------------------------------------------------- import
@dataclass
class EncoderArchive:
    """A validated encoder archive: its metadata and the encoder tensors (CPU)."""

    path: str
    metadata: dict
    weights: dict[str, torch.Tensor]

    def checkpoint(self) -> dict:
        """What :func:`csm_nnunet.adapt.load_pretrained_checkpoint` reads (``network_weights`` + ``csm_network``),
        plus the metadata under ``csm_encoder`` so an imported file still says where it came from."""
        return {"network_weights": self.weights, "csm_network": self.metadata["csm_network"],
                "csm_masking": self.metadata["masking"], "trainer_name": self.metadata["source"].get("trainer"),
                "csm_encoder": self.metadata}


def is_encoder_archive(path: str) -> bool:
    """Whether ``path`` is meant as an encoder archive: a ``.zip`` name (validated, with clear errors, by
    :func:`read_encoder_archive`) or any zip holding our metadata member. A torch checkpoint is a zip too, but
    without that member."""
    path = os.fspath(path)
    if path.lower().endswith(".zip"):
        return True
    try:
        with zipfile.ZipFile(path) as zf:
            return METADATA_MEMBER in zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def _fix(path: str) -> str:
    return f"get an intact copy of {basename(path)} or export it again with `csm_nnunet export-encoder`"


def _check_metadata(meta: Any, path: str) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ShareError(f"{path}: {METADATA_MEMBER} does not describe a csm-nnunet encoder (format "
                         f"{meta.get('format') if isinstance(meta, dict) else type(meta).__name__!r}); {_fix(path)}")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ShareError(f"{path} has an unknown format_version {version!r}; {_fix(path)}")
    if version > FORMAT_VERSION:
        raise ShareError(f"{path} has format version {version}, written by csm-nnunet "
                         f"{meta.get('csm_nnunet_version', '?')}; this csm-nnunet {csm_nnunet.__version__} reads "
                         f"format version <= {FORMAT_VERSION}: upgrade csm-nnunet (pip install -U csm-nnunet) on this "
                         f"machine, or export with the csm-nnunet version installed here")
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    missing += [f"csm_network.{k}" for k in REQUIRED_NETWORK if k not in (meta.get("csm_network") or {})]
    if not isinstance(meta.get("weights"), dict) or "sha256" not in meta["weights"]:
        missing.append("weights.sha256")
    if not isinstance(meta.get("source"), dict):
        missing.append("source.trainer")
    if missing:
        raise ShareError(f"{path}: {METADATA_MEMBER} lacks the fields {missing}; {_fix(path)}")
    cfg = meta["csm_network"]
    if [str(s) for s in cfg["series_names"]] != meta["series_names"] or int(cfg["token_size"]) != meta["token_size"]:
        raise ShareError(f"{path}: series_names/token_size disagree with csm_network in {METADATA_MEMBER}; "
                         f"{_fix(path)}")


def _check_tensors(weights: Any, meta: dict, path: str) -> None:
    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in weights.items()):
        raise ShareError(f"{path}: {WEIGHTS_MEMBER} is not a dict of tensors; {_fix(path)}")
    missing = [k for k in REQUIRED_TENSORS if k not in weights]
    foreign = sorted(k for k in weights if not is_encoder_key(k))
    if missing or foreign:
        raise ShareError(f"{path}: {WEIGHTS_MEMBER} " + (f"lacks the encoder tensors {missing}" if missing else
                                                          f"holds non-encoder tensors {foreign[:5]}")
                         + f"; {_fix(path)}")
    cfg = meta["csm_network"]
    groups = 1 if cfg.get("fused") else len(cfg["series_names"])
    dim = cfg["preset"].get("embed_dim") if isinstance(cfg["preset"], dict) else None
    shape = tuple(weights["patch_embed_bias"].shape)
    if shape != (groups, dim):
        raise ShareError(f"{path}: patch_embed_bias has shape {list(shape)} but csm_network describes "
                         f"[{groups}, {dim}] (series {cfg['series_names']}, preset {cfg['preset']}); {_fix(path)}")


def read_encoder_archive(path: str) -> EncoderArchive:
    """Open and validate an encoder archive (see the module docstring); any problem is a :class:`ShareError`."""
    path = os.fspath(path)
    if not isfile(path):
        raise ShareError(f"encoder archive {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise ShareError(f"{path} is not a readable zip archive (truncated download, corrupt, or another kind of "
                         f"file); {_fix(path)}")
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            absent = [m for m in (METADATA_MEMBER, WEIGHTS_MEMBER) if m not in names]
            if absent:
                torch_file = any(n.endswith("data.pkl") for n in names)
                raise ShareError(f"{path} has no {' and no '.join(absent)}: it is not a (complete) csm-nnunet encoder "
                                 f"archive"
                                 + (" but a torch checkpoint (pass a pretraining checkpoint to -pretrained_weights "
                                    "directly, or export its model folder with `csm_nnunet export-encoder`)"
                                    if torch_file else f"; {_fix(path)}"))
            raw_meta = zf.read(METADATA_MEMBER)  # read() checks each member's CRC-32
            raw_weights = zf.read(WEIGHTS_MEMBER)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise ShareError(f"{path} is corrupt ({type(e).__name__}: {e}); {_fix(path)}") from None
    try:
        meta = json.loads(raw_meta)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShareError(f"{path}: {METADATA_MEMBER} is not valid JSON ({e}); {_fix(path)}") from None
    _check_metadata(meta, path)
    digest = hashlib.sha256(raw_weights).hexdigest()
    if digest != meta["weights"]["sha256"]:
        raise ShareError(f"{path}: the sha256 of {WEIGHTS_MEMBER} is {digest[:16]}... but the metadata records "
                         f"{str(meta['weights']['sha256'])[:16]}...: the weights were modified or damaged after "
                         f"export; do not use this file, {_fix(path)}")
    try:
        weights = torch.load(io.BytesIO(raw_weights), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- the unpickler raises many types; all mean "not plain tensors"
        lines = str(e).splitlines() or [""]
        reason = next((ln.strip() for ln in lines if "Unsupported global" in ln), lines[0].strip())
        reason = reason.split(" Please use")[0][:200]  # not torch's advice to allowlist what the file pickled
        raise ShareError(f"{path}: {WEIGHTS_MEMBER} does not load as plain tensors ({type(e).__name__}: {reason}); "
                         f"{_fix(path)}") from None
    _check_tensors(weights, meta, path)
    return EncoderArchive(path, meta, weights)


def describe(meta: Mapping, path: str) -> str:
    """Readable summary of an archive's metadata (printed by both commands and in the fine-tuning log)."""
    cfg, preset = meta["csm_network"], meta["csm_network"]["preset"]
    src, plans, masking = meta["source"], meta["plans"] or {}, meta.get("masking")
    t = meta["token_size"]
    lines = [
        f"csm-nnunet encoder {path} (format {meta['format_version']}; csm-nnunet {meta['csm_nnunet_version']}, "
        f"torch {meta['torch_version']}, nnunetv2 {meta['nnunetv2_version']})",
        f"  preset {meta['preset']} (width {preset.get('embed_dim')}, depth {preset.get('depth')}, heads "
        f"{preset.get('num_heads')}), token {t}^3, "
        + ("channel-fused tokens" if cfg.get("fused") else "one token per series and patch")
        + f", pretraining patch {cfg['patch_size']}",
        f"  series: {', '.join(meta['series_names'])}",
        f"  source: {src.get('trainer')}, epoch {src.get('epoch')}, fold {src.get('fold')}, "
        f"{src.get('checkpoint')}",
        "  masking: " + (", ".join(f"{k}={v}" for k, v in masking.items()) if isinstance(masking, Mapping)
                         else "not recorded"),
        f"  plans: {plans.get('plans_name')} / {plans.get('configuration')} of {plans.get('dataset_name')}, spacing "
        f"{plans.get('spacing')}, patch {plans.get('patch_size')}, normalization {plans.get('normalization_schemes')}"
        f", fingerprint {str(plans.get('sha256'))[:12]}",
        f"  weights: {meta['weights'].get('num_tensors')} encoder tensors, {meta['weights'].get('num_parameters')} "
        f"parameters, sha256 {str(meta['weights']['sha256'])[:12]}",
    ]
    return "\n".join(lines)


def import_encoder(archive: str, out_dir: str | None = None, log: Callable[[str], object] | None = print) -> str:
    """Validate ``archive`` and write ``<out_dir>/<archive name>.pth`` for ``-pretrained_weights``; returns its path."""
    from csm_nnunet.trainer_utils import save_checkpoint_atomically

    archive = os.fspath(archive)
    loaded = read_encoder_archive(archive)
    out_dir = dirname(os.path.abspath(archive)) if out_dir is None else os.fspath(out_dir)
    if isfile(out_dir):
        raise ShareError(f"-o {out_dir} is a file; pass the folder to write the imported checkpoint into")
    stem = basename(archive)
    stem = stem[:-4] if stem.lower().endswith(".zip") else stem
    output = join(out_dir, stem + ".pth")
    if os.path.abspath(output) == os.path.abspath(archive):
        output = join(out_dir, stem + "_imported.pth")
    try:
        os.makedirs(out_dir, exist_ok=True)
        save_checkpoint_atomically(loaded.checkpoint(), output)
    except OSError as e:
        raise ShareError(f"cannot write {output} ({e.strerror or e}); choose a writable -o folder") from None
    if log is not None:
        log(describe(loaded.metadata, archive) + f"\n  sha256 verified; written: {output}\n  fine-tune with: "
            f"nnUNetv2_train DATASET 3d_fullres FOLD -tr CSMSegTrainer -p PLANS -pretrained_weights {output}")
    return output


# ---------------------------------------------------------------------------------------------------- CLI
class Command(NamedTuple):
    """One sub-command of ``csm_nnunet`` (see :data:`csm_nnunet.cli.COMMANDS`, ``module:attribute``)."""

    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="pretraining model folder ($nnUNet_results/DatasetXXX/CSMPretrainer__<plans>__"
                                      "3d_fullres), a fold folder or a checkpoint file")
    parser.add_argument("-o", dest="output", required=True, help="archive to write, e.g. encoder.zip")
    parser.add_argument("-chk", dest="checkpoint", default="checkpoint_final.pth",
                        help="checkpoint in the fold folder (default checkpoint_final.pth)")
    parser.add_argument("-f", dest="fold", default=None, help="fold of the pretraining run (default: its only fold)")


def _add_import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("archive", help="encoder archive written by `csm_nnunet export-encoder`")
    parser.add_argument("-o", dest="out_dir", default=None,
                        help="folder for <archive name>.pth (default: the archive's folder)")


def _run(name: str, action: Callable[[], object]) -> int:
    try:
        action()
    except ShareError as e:
        print(f"csm_nnunet {name}: error: {e}", file=sys.stderr)
        return 1
    return 0


def _run_export(args: argparse.Namespace) -> int:
    return _run("export-encoder", lambda: export_encoder(args.model, args.output, args.checkpoint, args.fold))


def _run_import(args: argparse.Namespace) -> int:
    return _run("import-encoder", lambda: import_encoder(args.archive, args.out_dir))


export_command = Command(_add_export_arguments, _run_export)
import_command = Command(_add_import_arguments, _run_import)
