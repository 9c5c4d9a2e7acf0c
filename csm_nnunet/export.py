"""``csm_nnunet export-primus``: a CSM-pretrained encoder as ``-pretrained_weights`` for nnU-Net's own Primus trainers.

nnU-Net's ``load_pretrained_weights`` asserts that every key of the target network except ``.seg_layers.`` is in the
file with the same shape, so we write a *complete* Primus state dict:

* ``eva.blocks.*``, ``eva.norm.*``: copied (the ``Primus*`` presets build exactly Primus' Eva blocks);
* ``eva.pos_embed``: resampled (trilinear over the token grid) when the target patch grid differs;
* ``down_projection.proj``: Primus embeds all channels in one convolution. Our encoder embeds each series with its
  own projection ``W_s x_s + b_s`` plus a series embedding ``e_s``. One convolution over the stacked channels computes
  a sum over channels, so each target channel ``c`` (matched to a pretrained series by channel name) gets
  ``W_s / n`` and the bias is ``mean_s(b_s + e_s)``: the *mean* of the per-series tokens, which keeps the token scale
  the encoder was trained on (a plain sum would grow it with the number of series). Channels without a pretrained
  series get zero weights (reported); a fused MAEPretrainer checkpoint maps its channels directly;
* ``up_projection.*`` (the decoder) and everything else: the freshly initialised values of the target network.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from os.path import isdir, isfile, join

import torch

CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_best.pth", "checkpoint_latest.pth")


@dataclass
class ExportReport:
    copied: list[str] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    channels: dict[str, str] = field(default_factory=dict)  # target channel -> pretrained series (or "zero")

    def format(self) -> str:
        blocks = sum(k.startswith("eva.blocks.") for k in self.copied)
        other = [k for k in self.copied if not k.startswith("eva.blocks.")]
        return "\n".join([
            "csm-nnunet export-primus:",
            f"  copied    ({len(self.copied)}): {blocks} eva.blocks.* tensors, {', '.join(other) or '-'}",
            f"  resampled ({len(self.resampled)}): {', '.join(self.resampled) or '-'}",
            f"  fresh     ({len(self.fresh)}): modules {', '.join(sorted({k.split('.')[0] for k in self.fresh}))}",
            "  channels: " + ", ".join(f"{c} <- {s}" for c, s in self.channels.items()),
        ])


def find_checkpoint(model: str) -> str:
    """A checkpoint file, a fold folder, or a trainer folder with exactly one fold (fold_all preferred)."""
    if isfile(model):
        return model
    if not isdir(model):
        raise FileNotFoundError(f"{model!r} is neither a checkpoint file nor a model folder")
    folders = [model]
    if not any(isfile(join(model, c)) for c in CHECKPOINT_NAMES):
        folds = sorted(f for f in os.listdir(model) if f.startswith("fold_") and isdir(join(model, f)))
        if "fold_all" in folds:
            folds = ["fold_all"]
        if not folds:
            raise FileNotFoundError(f"no checkpoint and no fold_* folder in {model!r}: has the pretraining finished?")
        if len(folds) != 1:
            raise ValueError(f"{model!r} holds folds {folds}; pass the fold folder you want to export")
        folders = [join(model, folds[0])]
    for name in CHECKPOINT_NAMES:
        if isfile(join(folders[0], name)):
            return join(folders[0], name)
    raise FileNotFoundError(f"no {' / '.join(CHECKPOINT_NAMES)} in {folders[0]!r}: has the pretraining finished?")


def primus_state_from_csm(checkpoint: dict, target: torch.nn.Module, target_series: list[str]
                          ) -> tuple[dict[str, torch.Tensor], ExportReport]:
    """Build a full state dict for the Primus network ``target`` from a CSM pretraining checkpoint."""
    from csm_nnunet.adapt import _resample_pos_embed

    if "csm_network" not in checkpoint or "network_weights" not in checkpoint:
        raise ValueError("not a csm-nnunet pretraining checkpoint (needs 'csm_network' and 'network_weights')")
    cfg, src = checkpoint["csm_network"], checkpoint["network_weights"]
    preset = cfg["preset"]
    if not preset.get("primus_blocks"):
        raise ValueError(f"the checkpoint was pretrained with preset {preset['name']!r}, whose blocks are not "
                         f"Primus blocks; pretrain with CSM_PRESET=PrimusS/PrimusB/PrimusM/PrimusL to export")
    state = {k: v.detach().clone() for k, v in target.state_dict().items()}
    D, depth = int(preset["embed_dim"]), int(preset["depth"])
    t = int(cfg["token_size"])
    want = (target.embed_dim, len(target.eva.blocks), target.eva.blocks[0].attn.num_heads,
            tuple(target.down_projection.proj.kernel_size))
    have = (D, depth, int(preset["num_heads"]), (t, t, t))
    if want != have:
        raise ValueError(f"target network has width/depth/heads/token {want} but the checkpoint {have} "
                         f"(preset {preset['name']}); pretrain with the preset matching the trainer "
                         f"(nnUNet_Primus_S/B/M/L_Trainer <-> CSM_PRESET=PrimusS/B/M/L)")
    report = ExportReport()
    for k, v in src.items():
        if (k.startswith("eva.blocks.") or k.startswith("eva.norm.")) and k in state:
            if state[k].shape != v.shape:
                raise ValueError(f"{k}: checkpoint shape {list(v.shape)} != target {list(state[k].shape)}")
            state[k] = v.to(state[k].dtype)
            report.copied.append(k)
    pos = src["eva.pos_embed"]
    src_grid = [p // t for p in cfg["patch_size"]]
    n_dst = state["eva.pos_embed"].shape[1]
    dst_grid = _target_grid(target, n_dst)
    if list(dst_grid) == list(src_grid):
        state["eva.pos_embed"] = pos.clone()
        report.copied.append("eva.pos_embed")
    else:
        state["eva.pos_embed"] = _resample_pos_embed(pos, src_grid, dst_grid)
        report.resampled.append(f"eva.pos_embed {src_grid} -> {list(dst_grid)}")

    w = torch.zeros_like(state["down_projection.proj.weight"])  # [D, C, t, t, t]
    names = list(cfg["series_names"])
    if cfg.get("fused"):
        fused = src["patch_embed_weight"][0].reshape(D, len(names), t, t, t)
        bias = src["patch_embed_bias"][0] + src["series_embed"][0]
        for c, name in enumerate(target_series):
            if name in names:
                w[:, c] = fused[:, names.index(name)]
                report.channels[name] = f"fused channel {names.index(name)}"
            else:
                report.channels[name] = "zero (no pretrained series of that name)"
    else:
        matched = [(c, names.index(n)) for c, n in enumerate(target_series) if n in names]
        if not matched:
            raise ValueError(f"no target channel {target_series} matches a pretrained series {names} by name")
        n = len(matched)
        for c, j in matched:
            w[:, c] = src["patch_embed_weight"][j].reshape(D, t, t, t) / n
            report.channels[target_series[c]] = names[j]
        for name in target_series:
            report.channels.setdefault(name, "zero (no pretrained series of that name)")
        bias = torch.stack([src["patch_embed_bias"][j] + src["series_embed"][j] for _, j in matched]).mean(0)
    state["down_projection.proj.weight"] = w
    state["down_projection.proj.bias"] = bias.to(w.dtype)
    report.copied += ["down_projection.proj.weight (folded)", "down_projection.proj.bias (folded)"]
    done = {k for k in report.copied if k in state} | {"eva.pos_embed", "down_projection.proj.weight",
                                                       "down_projection.proj.bias"}
    report.fresh = [k for k in state if k not in done]
    return state, report


def _target_grid(target: torch.nn.Module, num_tokens: int) -> list[int]:
    rope = getattr(target.eva, "rope", None)
    grid = list(getattr(rope, "feat_shape", []) or [])
    if len(grid) == 3 and grid[0] * grid[1] * grid[2] == num_tokens:
        return grid
    raise ValueError("cannot read the target Primus token grid (needs rotary position embedding)")


def export_primus(model: str, trainer_name: str, dataset: str, configuration: str = "3d_fullres",
                  plans: str = "nnUNetPlans", output: str = "primus_pretrained.pth",
                  log: Callable[[str], object] = print) -> ExportReport:
    """Write ``output`` for ``nnUNetv2_train DATASET CONFIGURATION FOLD -tr TRAINER -p PLANS -pretrained_weights``."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from csm_nnunet.trainer_utils import channel_names_of, save_checkpoint_atomically

    ckpt_path = find_checkpoint(model)
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    name = maybe_convert_to_dataset_name(dataset)
    if nnUNet_preprocessed is None:
        raise RuntimeError("nnUNet_preprocessed is not set; export needs the target dataset's plans")
    plans_file = join(nnUNet_preprocessed, name, plans + ".json")
    if not isfile(plans_file):
        raise FileNotFoundError(f"{plans_file} not found: plan dataset {name} first or pass -p with its plans name")
    dataset_json = load_json(join(nnUNet_preprocessed, name, "dataset.json"))
    pm = PlansManager(plans_file)
    cm = pm.get_configuration(configuration)
    trainer = recursive_find_trainer_class_by_name(trainer_name)
    net = trainer.build_network_architecture(pm, cm, determine_num_input_channels(pm, cm, dataset_json),
                                             pm.get_label_manager(dataset_json).num_segmentation_heads, False)
    if not hasattr(net, "eva") or not hasattr(net, "down_projection"):
        raise ValueError(f"{trainer_name} does not build a Primus network; use nnUNet_Primus_S/B/M/L_Trainer")
    state, report = primus_state_from_csm(checkpoint, net, channel_names_of(dataset_json))
    net.load_state_dict(state, strict=True)  # proves the file is complete and shaped for the target
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    save_checkpoint_atomically({"network_weights": state, "trainer_name": trainer_name,
                                "csm_export": {"source": ckpt_path, "channels": report.channels}}, output)
    log(report.format() + f"\n  written: {output}")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="pretraining model folder (trainer or fold folder) or checkpoint file")
    parser.add_argument("--trainer", required=True, help="target nnU-Net trainer, e.g. nnUNet_Primus_B_Trainer")
    parser.add_argument("-d", required=True, help="target dataset name or id")
    parser.add_argument("-c", default="3d_fullres", help="configuration (default 3d_fullres)")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier of the target (default nnUNetPlans)")
    parser.add_argument("-o", required=True, help="output .pth for -pretrained_weights")


def run(args: argparse.Namespace) -> int:
    export_primus(args.model, args.trainer, args.d, args.c, args.p, args.o)
    return 0
