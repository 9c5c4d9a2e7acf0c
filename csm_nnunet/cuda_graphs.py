"""CUDA-graph replay of a network's inference forward pass (nnU-Net's predictor on a GPU).

Why: at nnU-Net's inference batch (one window), the ViT segmentation network launches several hundred small
kernels per window, and an H100 finishes each faster than Python and PyTorch's dispatcher can issue the next, so
the GPU idles most of a window (``benchmarks/bench_gpu.py``, section ``seg-infer``). A CUDA graph records the
kernels of one forward pass once and replays them with one launch. nnU-Net's predictor calls the network on windows
of one fixed shape, thousands of times per case, under ``torch.inference_mode`` and autocast: the case graphs are
made for.

What it needs from the network: a forward pass whose shapes depend only on the input's shape and that never waits
on the GPU (no ``.item()``, no data-dependent sizes). :class:`csm_nnunet.segmentation.CSMSegmentationNetwork` has
such a route (``forward_eager(..., compact=False)``): absent series are hidden by an attention mask computed on the
GPU instead of being gathered out, so the same graph serves complete windows and windows with a series missing.

What it costs: GPU memory for one forward pass's activations per captured shape (held until the network goes back
to training, is moved, or the shape is evicted), three extra forward passes at the first call (two warm-ups, which
also let cuDNN choose its kernels, and the capture), and the compute of absent series' tokens. Autocast's weight
cache is off inside the graph, so the graph recasts the weights at every replay and always reads the current
parameters (optimiser steps and ``load_state_dict`` update them in place).
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch

Output = torch.Tensor | list[torch.Tensor]

#: environment switch, read when a network is built: ``CSM_CUDA_GRAPHS=0`` runs every forward eagerly (for
#: debugging, or a GPU setup where capture misbehaves) without changing code or checkpoints
ENV_VAR = "CSM_CUDA_GRAPHS"


def graphs_allowed(environ: dict[str, str] | None = None) -> bool:
    """Whether ``CSM_CUDA_GRAPHS`` allows CUDA graphs (unset or empty: yes). A value that is neither on nor off
    raises, naming the variable and the values it takes."""
    raw = (os.environ if environ is None else environ).get(ENV_VAR, "").strip().lower()
    if raw in ("", "1", "true", "t", "yes", "on"):
        return True
    if raw in ("0", "false", "f", "no", "off"):
        return False
    raise ValueError(f"environment variable {ENV_VAR}={raw!r} must be 1 (CUDA graphs in GPU inference, the default) "
                     f"or 0 (eager); unset it or give {ENV_VAR}=0")


class CudaGraphCache:
    """Captured CUDA graphs of one network's eval forward, keyed by input shape/dtype/device, the autocast and
    inference-mode state and a caller's key (e.g. deep supervision on/off).

    ``forward(x)`` is the graph-safe forward to capture; it must not read data back to the host. At most
    ``max_graphs`` graphs are kept (oldest evicted). If capturing fails (an operation that cannot be captured), the
    cache warns once, turns itself off and the caller's eager forward is used from then on. ``CSM_CUDA_GRAPHS=0``
    turns it off from the start (:func:`graphs_allowed`).
    """

    def __init__(self, max_graphs: int = 2):
        self.max_graphs = int(max_graphs)
        self.disabled = not graphs_allowed()
        self._entries: OrderedDict[Hashable, tuple[torch.Tensor, torch.cuda.CUDAGraph, Output]] = OrderedDict()

    # a module holding the cache may be deep-copied or pickled (checkpoint helpers, DDP): graphs do not travel
    def __deepcopy__(self, memo: dict) -> CudaGraphCache:
        return CudaGraphCache(self.max_graphs)

    def __getstate__(self) -> dict[str, Any]:
        return {"max_graphs": self.max_graphs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state.get("max_graphs", 2))

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every graph and the memory it holds (the network went back to training or was moved)."""
        self._entries.clear()

    def usable(self, x: torch.Tensor, training: bool) -> bool:
        """Whether ``x`` can take the graph route: a CUDA tensor, the module in eval mode, autograd off, and not
        inside another capture or a ``torch.compile`` trace."""
        return (not self.disabled and not training and x.is_cuda and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing())

    def run(self, forward: Callable[[torch.Tensor], Output], x: torch.Tensor, key: Hashable = ()) -> Output:
        """``forward(x)`` by graph replay: capture on the first call for this key, then copy ``x`` into the graph's
        input buffer, replay, and return a copy of the outputs (the caller may modify them in place; nnU-Net's
        predictor adds the mirrored predictions into the first one)."""
        full_key = (tuple(x.shape), x.dtype, x.device, torch.is_autocast_enabled("cuda"),
                    torch.get_autocast_dtype("cuda"), torch.is_inference_mode_enabled(), key)
        entry = self._entries.get(full_key)
        if entry is None:
            try:
                entry = self._capture(forward, x)
            except Exception as err:  # noqa: BLE001  (anything uncapturable: fall back, do not fail inference)
                self.disabled = True
                self._entries.clear()
                warnings.warn(f"csm-nnunet: CUDA graph capture failed ({type(err).__name__}: {err}); running the "
                              f"network eagerly from now on (slower, same results)", RuntimeWarning, stacklevel=3)
                return forward(x)
            while len(self._entries) >= self.max_graphs:
                self._entries.popitem(last=False)
            self._entries[full_key] = entry
        else:
            self._entries.move_to_end(full_key)
        static_x, graph, static_out = entry
        static_x.copy_(x)
        graph.replay()
        if isinstance(static_out, torch.Tensor):
            return static_out.clone()
        return [o.clone() for o in static_out]

    @staticmethod
    def _capture(forward: Callable[[torch.Tensor], Output], x: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.cuda.CUDAGraph, Output]:
        static_x = x.detach().clone(memory_format=torch.contiguous_format)
        # same autocast as the caller's, without the weight cache: a cached cast made outside the graph would be
        # freed when the caller's autocast region ends while the graph still reads it
        amp = torch.autocast("cuda", enabled=torch.is_autocast_enabled("cuda"),
                             dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
        with torch.cuda.device(x.device), amp:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up outside the capture: cuDNN's kernel choice, lazy initialisation
                    forward(static_x)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: nnU-Net's predictor has other threads (export, data) that use CUDA meanwhile
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static_out = forward(static_x)
        return static_x, graph, static_out
