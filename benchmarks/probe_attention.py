#!/usr/bin/env python
"""Where do the series tokens look? Attention mass of frozen encoders by (series, position) relation.

Why: on the synthetic brain data the enhancing compartment and the benign/malignant class are readable only from
T1ce against T1 *at the same voxels*. A channel-fused token holds both in one input vector; a series token must
fetch the other series' token at its own position through attention, found only through the position code. The
experiments (docs/experiments.md) found the channel-fused classifier ahead of the series-tokenised one from scratch,
and CSM pretraining no better than scratch on the compartments. Cross-series masking hides a region in one series
while it stays visible in another, so reconstructing it should teach exactly that fetch: "same position, other
series". This script measures whether the pretrained (or fine-tuned) encoders attend that way, against randomly
initialised ones and against uniform attention.

For every encoder (``--checkpoint NAME=PATH`` pretraining checkpoints, ``--finetuned NAME=PATH`` nnU-Net fine-tuning
checkpoints whose encoder is read from ``network_weights``, ``--random N`` fresh encoders of the reference's preset)
it encodes every token of the held-out cases (one whole patch per case, all series present, eval mode) and, in each
block, recomputes the softmax attention of every head from that block's own query/key projections. Each query
token's attention is split by the key's relation to it:

* ``self``; ``same position, other series`` (the cross-series fetch); ``same series, other positions``;
  ``other series, other positions``; and ``same series, neighbour positions`` (the 26 grid neighbours, a subset of
  the third), each averaged over queries, heads and cases;
* ``same position, other series`` also for the single head that puts most on it (a head dedicated to the fetch
  is what a downstream head can use), and under uniform attention (``(S-1) / (S N)``);
* ``largest weight``: the mean over queries of the largest single attention weight (``1 / (S N)`` if uniform);
  ``most-attended key``: the share of all queries' attention that the one most-attended key receives (per head,
  then averaged): near ``largest weight`` when every query looks at the same token (an attention sink).

A channel-fused pretraining checkpoint (``MAEPretrainer``) is measured on its own ``N`` tokens (no "other series").
For pretraining checkpoints of series tokens it also measures, with masks drawn by the checkpoint's own masking
(``csm_masking``): the pretraining decoder (:func:`masked_attention`) and the encoder on the visible sets it
was trained on (the same function, one forward pass for both), how often those masks show one position in two series
(:func:`mask_pairing`), and how far each projection's weights grew from their initialisation (:func:`weight_growth`).

Usage (the 96-unlabelled-case folder of docs/experiments.md)::

    E=/work/exp_big; R=$E/results; F=Dataset901_CSMExpBrain/CSMPretrainer__nnUNetCSMPlans__3d_fullres/fold_1
    python benchmarks/probe_attention.py --preprocessed $E/preprocessed/Dataset901_CSMExpBrain --random 3 \\
        --checkpoint csm@1=$R/pretrain_CSMPretrainer_tiny8/$F/checkpoint_final.pth ... \\
        --out benchmarks/results/probe_attention_synthetic_cpu.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_pretrain as bp  # noqa: E402  (machine description, git state)
import probe_encoder as pe  # noqa: E402  (case loading, encoder construction: the linear probes' own)

from csm_nnunet.fileio import write_json_atomically  # noqa: E402
from csm_nnunet.masking import CrossSeriesMasker  # noqa: E402

RELATIONS = ("self", "same position, other series", "same series, other positions",
             "other series, other positions", "same series, neighbour positions")


def relation_masks(num_series: int, grid: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Boolean ``[T, T]`` (query, key) masks of each relation for ``T = S * N`` tokens in series-major order (the
    encoder's order with every series present)."""
    n = int(np.prod(grid))
    series = torch.arange(num_series * n) // n
    pos = torch.arange(num_series * n) % n
    coords = torch.stack(torch.unravel_index(pos, grid), 1)
    same_s, same_p = series[:, None] == series[None], pos[:, None] == pos[None]
    chebyshev = (coords[:, None] - coords[None]).abs().amax(-1)
    return {"self": same_s & same_p, "same position, other series": same_p & ~same_s,
            "same series, other positions": same_s & ~same_p, "other series, other positions": ~same_s & ~same_p,
            "same series, neighbour positions": same_s & (chebyshev == 1)}


def attention_weights(attn: torch.nn.Module, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention ``[B, H, T, T]`` of a timm ``EvaAttention`` on its (already normed) input ``x``, computed
    the way its forward computes it (fused qkv or separate projections, q/k norms, rotary codes)."""
    from timm.layers import apply_rot_embed_cat

    B, T, _ = x.shape
    H = attn.num_heads
    if attn.qkv is not None:
        bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = torch.nn.functional.linear(x, attn.qkv.weight, bias if bias is not None else attn.qkv.bias)
        q, k, _ = qkv.reshape(B, T, 3, H, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q = attn.q_proj(x).reshape(B, T, H, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(B, T, H, -1).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        half = getattr(attn, "rotate_half", False)
        q, k = apply_rot_embed_cat(q, rope, half=half), apply_rot_embed_cat(k, rope, half=half)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)


@torch.no_grad()
def attention_mass(net, images: np.ndarray, masks: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Per block: each relation's attention mass (mean over cases, heads, queries) and, for the cross-series fetch,
    the largest mean mass of any one head."""
    from csm_nnunet.network import rope_for

    depth = len(net.eva.blocks)
    sums = {r: torch.zeros(depth) for r in masks}
    per_head, top, sink = torch.zeros(depth, net.preset.num_heads), torch.zeros(depth), torch.zeros(depth)
    for i in range(len(images)):
        x, _, groups = net._prepare_inputs(torch.from_numpy(images[i: i + 1]), None)
        with captured_inputs(net.eva.blocks) as inputs:
            net.forward_encoder(x, groups, (depth,))
        n = net.num_patches
        rope = rope_for(net.eva, torch.arange(groups.shape[1] * n)[None] % n)
        for d, (blk, h) in enumerate(zip(net.eva.blocks, inputs)):
            w = attention_weights(blk.attn, h, rope)[0]  # [H, T, T]
            for r, m in masks.items():
                sums[r][d] += (w * m).sum(-1).mean().item()
            per_head[d] += (w * masks["same position, other series"]).sum(-1).mean(-1)
            top[d] += w.amax(-1).mean().item()
            sink[d] += w.mean(-2).amax(-1).mean().item()
    k = len(images)
    return [{**{r: round(float(sums[r][d] / k), 4) for r in masks},
             "same position, other series: best head": round(float(per_head[d].max() / k), 4),
             "largest weight": round(float(top[d] / k), 4),
             "most-attended key": round(float(sink[d] / k), 4)} for d in range(depth)]


class captured_inputs:
    """Context manager: the input of every block's attention module (after the block's norm) in call order."""

    def __init__(self, blocks: torch.nn.ModuleList):
        self.blocks, self.inputs, self.hooks = blocks, [], []

    def __enter__(self) -> list[torch.Tensor]:
        self.hooks = [blk.attn.register_forward_pre_hook(lambda _m, args: self.inputs.append(args[0]))
                      for blk in self.blocks]
        return self.inputs

    def __exit__(self, *exc) -> None:
        for hook in self.hooks:
            hook.remove()


def pretraining_network(checkpoint: dict) -> torch.nn.Module:
    """The checkpoint's whole pretraining network (encoder and decoder), weights loaded, in eval mode."""
    from csm_nnunet.network import CSMMaskedAutoencoder

    net = CSMMaskedAutoencoder.from_config(checkpoint["csm_network"])
    net.load_state_dict(checkpoint["network_weights"])
    return net.eval()


def checkpoint_masker(checkpoint: dict) -> CrossSeriesMasker:
    """The masker the pretraining run drew its masks with (``csm_masking``; the default one for older checkpoints)."""
    return CrossSeriesMasker(**checkpoint.get("csm_masking", {}))


@torch.no_grad()
def masked_attention(checkpoint: dict, images: np.ndarray, seed: int = 0
                     ) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """The pretraining network at work, on masks drawn as in training (the checkpoint's own network and masking,
    ``csm_masking``; one forward pass per case feeds both probes). ``checkpoint``: a pretraining checkpoint as loaded
    (``csm_network``, ``network_weights``). Returns, per block, mean over heads, queries and cases:

    * decoder: where do the *hidden* tokens it must reconstruct look? Mass on visible tokens at the same position
      (other series: the cross-series fetch), on visible tokens of the same series at the 26 neighbour positions, on
      any visible token, and what uniform attention over the same keys would give;
    * encoder, on the visible tokens only (where the whole-patch probe of :func:`attention_mass` shows it every
      token): the mass on visible tokens of other series at the query's position (and what uniform attention over
      the visible set gives it), the largest weight as a multiple of uniform (1 = uniform), and the entropy over
      log(visible count) (1 = uniform)."""
    from csm_nnunet.network import rope_for

    net = pretraining_network(checkpoint)
    S, N = net.num_groups, net.num_patches
    rel = relation_masks(S, net.grid)
    same_p, near = rel["same position, other series"], rel["same series, neighbour positions"]
    masker, gen = checkpoint_masker(checkpoint), torch.Generator().manual_seed(seed)
    dec_rope = rope_for(net.decoder, torch.arange(N).repeat(S)[None])
    dec_names = ("visible, same position, other series", "visible, same series, neighbour positions", "any visible")
    enc_names = ("same position, other series", "uniform: same position, other series", "largest weight x uniform",
                 "entropy / log(visible)")
    dec_sums = {k: torch.zeros(len(net.decoder.blocks)) for k in dec_names}
    dec_base = {k: 0.0 for k in dec_names}
    enc_sums = {k: torch.zeros(len(net.eva.blocks)) for k in enc_names}
    for i in range(len(images)):
        mask = masker(1, S, N, generator=gen)
        with captured_inputs(net.eva.blocks) as enc_inputs, captured_inputs(net.decoder.blocks) as dec_inputs:
            net(torch.from_numpy(images[i: i + 1]), mask)
        visible, hidden = mask.visible.reshape(S * N), mask.scored.reshape(S * N)

        keys = {dec_names[0]: same_p & visible[None], dec_names[1]: near & visible[None],
                dec_names[2]: visible[None].expand(S * N, S * N)}
        for k, m in keys.items():
            dec_base[k] += m[hidden].float().sum(-1).mean().item() / (S * N)
        for d, (blk, h) in enumerate(zip(net.decoder.blocks, dec_inputs)):
            w = attention_weights(blk.attn, h, dec_rope)[0][:, hidden]  # [H, hidden queries, T]
            for k, m in keys.items():
                dec_sums[k][d] += (w * m[hidden]).sum(-1).mean().item()

        ids = visible.nonzero()[:, 0]  # the encoder's token order (gather_kept keeps it)
        L = len(ids)
        pair = same_p[ids][:, ids].float()
        enc_rope = rope_for(net.eva, (ids % N)[None])
        for d, (blk, h) in enumerate(zip(net.eva.blocks, enc_inputs)):
            w = attention_weights(blk.attn, h, enc_rope)[0]  # [H, L, L]
            enc_sums[enc_names[0]][d] += (w * pair).sum(-1).mean().item()
            enc_sums[enc_names[1]][d] += pair.sum(-1).mean().item() / L
            enc_sums[enc_names[2]][d] += (w.amax(-1) * L).mean().item()
            enc_sums[enc_names[3]][d] += (-(w * w.clamp_min(1e-12).log()).sum(-1) / np.log(L)).mean().item()
    n = len(images)
    decoder = [{**{k: round(float(dec_sums[k][d] / n), 4) for k in dec_names},
                **{f"uniform: {k}": round(dec_base[k] / n, 4) for k in dec_names}}
               for d in range(len(net.decoder.blocks))]
    encoder = [{k: round(float(enc_sums[k][d] / n), 4) for k in enc_names} for d in range(len(net.eva.blocks))]
    return decoder, encoder


def weight_growth(checkpoint: dict, seed: int = 0) -> list[dict[str, float]]:
    """Per encoder block, the RMS of each projection's weights in the checkpoint over that of a fresh
    initialisation of the same network (1 = no larger than at the start). Why: attention that stays uniform after
    training means the query/key logits stayed near 0; this says whether the query/key weights grew at all while
    the value, output and MLP weights did."""
    from csm_nnunet.network import CSMMaskedAutoencoder

    trained = checkpoint["network_weights"]
    with torch.random.fork_rng():  # a seeded fresh draw that leaves the caller's random state alone
        torch.manual_seed(seed)
        fresh = CSMMaskedAutoencoder.from_config(checkpoint["csm_network"]).state_dict()

    def rms(t: torch.Tensor) -> float:
        return float(t.float().pow(2).mean().sqrt())

    out = []
    for d in range(sum(1 for k in trained if k.startswith("eva.blocks.") and k.endswith(".norm1.weight"))):
        b = f"eva.blocks.{d}."
        parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if b + "attn.qkv.weight" in trained:  # one [3C, C] projection: query, key and value rows in turn
            qkv = trained[b + "attn.qkv.weight"].chunk(3), fresh[b + "attn.qkv.weight"].chunk(3)
            for i, name in enumerate(("query", "key", "value")):
                parts[name] = (qkv[0][i], qkv[1][i])
        else:
            for name, proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
                parts[name] = (trained[b + f"attn.{proj}.weight"], fresh[b + f"attn.{proj}.weight"])
        for name, key in (("attention output", "attn.proj.weight"), ("mlp in", "mlp.fc1.weight"),
                          ("mlp out", "mlp.fc2.weight")):
            if b + key in trained:
                parts[name] = (trained[b + key], fresh[b + key])
        out.append({name: round(rms(t) / rms(f), 3) for name, (t, f) in parts.items()})
    return out


def mask_pairing(masker: CrossSeriesMasker, num_series: int, num_patches: int, draws: int = 2000,
                 seed: int = 0) -> dict[str, float]:
    """How often a pretraining mask shows one position in two series, for one masker (one case of ``num_series``
    present series, ``draws`` draws).

    Why: the encoder can learn to look up "same position, other series" only from inputs that contain such pairs, and
    the decoder can fetch a hidden token from another series only where that series shows the position. Returns
    ``visible partners``: per visible token, the visible tokens of other series at its position (pooled over the
    draws); ``hidden with a visible partner``: the share of the scored (hidden) tokens whose position is visible in
    another series."""
    gen = torch.Generator().manual_seed(seed)
    partners = visible_total = fetchable = scored_total = 0
    for _ in range(draws):
        mask = masker(1, num_series, num_patches, generator=gen)
        vis, scored = mask.visible[0], mask.scored[0]  # [S, N]
        per_position = vis.sum(0)  # visible series at each position
        partners += int((vis * (per_position - 1)).sum())
        visible_total += int(vis.sum())
        fetchable += int((scored & ((per_position - vis.long()) > 0)).sum())
        scored_total += int(scored.sum())
    return {"visible partners": round(partners / max(visible_total, 1), 4),
            "hidden with a visible partner": round(fetchable / max(scored_total, 1), 4)}


def load_finetuned_encoder(path: str, net: torch.nn.Module) -> None:
    """Copy the encoder tensors of an nnU-Net fine-tuning checkpoint (``network_weights``) into ``net``; every
    encoder tensor must be there with its shape, else the checkpoint is not of this encoder."""
    weights = torch.load(path, map_location="cpu", weights_only=False)["network_weights"]
    state = net.state_dict()
    missing = [k for k in state if k not in weights or weights[k].shape != state[k].shape]
    if missing:
        raise SystemExit(f"{path}: not a fine-tuned network of this encoder (missing or other shape: {missing[:5]})")
    net.load_state_dict({k: weights[k] for k in state})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preprocessed", required=True, help="nnU-Net preprocessed dataset folder (DatasetXXX_Name)")
    parser.add_argument("--plans", default=pe.PLANS)
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                        help="a pretraining checkpoint (repeatable; the first is the reference network)")
    parser.add_argument("--finetuned", action="append", default=[], metavar="NAME=PATH",
                        help="an nnU-Net checkpoint of a fine-tuned CSM network (repeatable)")
    parser.add_argument("--random", type=int, default=0, help="also N randomly initialised encoders")
    parser.add_argument("--fold", type=int, default=1, help="splits_final.json fold whose val cases are encoded")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--out", required=True, help="results JSON (written atomically)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()

    _, cases, dataset = pe.read_split(args.preprocessed, args.fold)
    series = [dataset["channel_names"][k] for k in sorted(dataset["channel_names"], key=int)]
    encoders: list[tuple[str, str, str | None]] = []  # name, kind, path
    for kind, items in (("pretrained", args.checkpoint), ("fine-tuned", args.finetuned)):
        for item in items:
            name, sep, path = item.partition("=")
            if not sep or not os.path.isfile(path):
                raise SystemExit(f"--{'checkpoint' if kind == 'pretrained' else 'finetuned'} {item!r}: expected "
                                 "NAME=PATH to an existing checkpoint file")
            encoders.append((name, kind, path))
    if not args.checkpoint:
        raise SystemExit("give at least one --checkpoint NAME=PATH (its network config is the reference)")
    ref = torch.load(args.checkpoint[0].partition("=")[2], map_location="cpu", weights_only=False)["csm_network"]
    if ref.get("fused"):
        raise SystemExit("the first --checkpoint has channel-fused tokens; give a CSM (series-token) one first")
    patch, token = tuple(int(p) for p in ref["patch_size"]), int(ref["token_size"])
    grid = tuple(p // token for p in patch)
    encoders += [(f"random{i + 1}", "random", None) for i in range(args.random)]
    images, _ = pe.load_cases(args.preprocessed, args.plans, cases, patch)
    masks = relation_masks(len(series), grid)
    tokens = len(series) * int(np.prod(grid))
    uniform = {r: round(float(m.sum(-1).float().mean() / tokens), 4) for r, m in masks.items()}
    bp.log(f"{len(cases)} held-out cases, {tokens} tokens each; uniform attention {uniform}")

    from csm_nnunet.adapt import load_pretrained_checkpoint

    results: dict[str, Any] = {}
    fused_masks = relation_masks(1, grid)  # a channel-fused encoder (MAEPretrainer): one token per position
    for name, kind, path in encoders:
        # seeded by the encoder's name, so that listing more checkpoints does not redraw a random encoder
        torch.manual_seed(zlib.crc32(name.encode()))
        # a pretraining checkpoint is read once here for its config and decoder (the encoder goes through the loader
        # -pretrained_weights uses, which reads and checks the file itself)
        checkpoint = torch.load(path, map_location="cpu", weights_only=False) if kind == "pretrained" else None
        fused = checkpoint is not None and bool(checkpoint["csm_network"].get("fused"))
        net = pe.build_encoder(series, patch, ref["preset"]["name"], token, fused)
        if kind == "pretrained":
            load_pretrained_checkpoint(path, net, series, log=None)
        elif kind == "fine-tuned":
            load_finetuned_encoder(path, net)
        results[name] = {"kind": kind, "checkpoint": path, "fused": fused,
                         "blocks": attention_mass(net.eval(), images, fused_masks if fused else masks)}
        if checkpoint is not None and not fused:
            results[name]["decoder"], results[name]["encoder on training masks"] = masked_attention(checkpoint, images)
            results[name]["weight growth"] = weight_growth(checkpoint)
            results[name]["masking"] = {**checkpoint.get("csm_masking", {}),
                                        **mask_pairing(checkpoint_masker(checkpoint), len(series), int(np.prod(grid)))}
        last = results[name]["blocks"]
        bp.log(f"{name}: same position, other series per block "
               + " / ".join(f"{b['same position, other series']:.3f}" for b in last))
    out = {"what": "attention mass of frozen encoders by the key's (series, position) relation to the query, "
                   "mean over held-out cases, heads and queries", "series": series, "cases": cases,
           "patch": list(patch), "token": token, "preset": ref["preset"]["name"], "uniform": uniform,
           "uniform fused": {r: round(float(m.sum(-1).float().mean() / len(m)), 4) for r, m in fused_masks.items()},
           "encoders": results, "seconds": round(time.time() - t0, 1), "machine": bp.machine_info(),
           "git": bp.git_info()}
    write_json_atomically(args.out, out)
    print(markdown(out))
    return 0


def markdown(res: dict[str, Any]) -> str:
    """One row per encoder and block: the relation masses, uniform attention as the first row."""
    cols = [*RELATIONS, "same position, other series: best head", "largest weight", "most-attended key"]
    uniform = {**res["uniform"], cols[-3]: res["uniform"][RELATIONS[1]], cols[-2]: res["uniform"]["self"],
               cols[-1]: res["uniform"]["self"]}
    lines = ["| encoder | block | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|",
             "| uniform | - | " + " | ".join(f"{uniform[c]:.4f}" for c in cols) + " |"]
    if any(e.get("fused") for e in res["encoders"].values()):
        fused = {**res["uniform fused"], cols[-3]: 0.0, cols[-2]: res["uniform fused"]["self"],
                 cols[-1]: res["uniform fused"]["self"]}
        lines.append("| uniform, fused tokens | - | " + " | ".join(f"{fused[c]:.4f}" for c in cols) + " |")
    for name, entry in res["encoders"].items():
        for d, block in enumerate(entry["blocks"], start=1):
            kind = entry["kind"] + (", fused: one token per position" if entry.get("fused") else "")
            lines.append(f"| {name} ({kind}) | {d} | " + " | ".join(f"{block[c]:.4f}" for c in cols) + " |")
    decoders = {name: e["decoder"] for name, e in res["encoders"].items() if "decoder" in e}
    if decoders:
        keys = [k for k in next(iter(decoders.values()))[0] if not k.startswith("uniform: ")]
        lines += ["", "Pretraining decoder, hidden queries (uniform attention over the same keys in brackets):", "",
                  "| pretraining run | decoder block | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
        for name, blocks in decoders.items():
            for d, block in enumerate(blocks, start=1):
                lines.append(f"| {name} | {d} | " + " | ".join(f"{block[k]:.4f} ({block['uniform: ' + k]:.4f})"
                                                               for k in keys) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
