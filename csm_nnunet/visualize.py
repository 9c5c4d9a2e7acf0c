"""Reconstruction snapshots: one PNG per call showing, for each series, the original, what the encoder saw and the
reconstruction, on the middle slice of the first axis. Hidden (inter-series masked) series are marked, so a reader
can see cross-series synthesis at work during pretraining."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

import numpy as np

from csm_nnunet.fileio import default_file_mode


def save_reconstruction_png(path: str, original: np.ndarray, visible_input: np.ndarray, reconstruction: np.ndarray,
                            series_names: Sequence[str], hidden: Sequence[bool], absent: Sequence[bool] | None = None,
                            title: str = "") -> None:
    """Write the PNG atomically. Arrays are ``[C, X, Y, Z]``; ``hidden``/``absent`` are per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    C = original.shape[0]
    z = original.shape[1] // 2
    absent = absent if absent is not None else [False] * C
    fig, axes = plt.subplots(C, 3, figsize=(9, 3 * C), squeeze=False)
    for c in range(C):
        lo, hi = np.percentile(original[c, z], [1, 99])
        hi = hi if hi > lo else lo + 1
        state = "absent" if absent[c] else ("HIDDEN series" if hidden[c] else "shown")
        for j, (img, label) in enumerate(((original, "original"), (visible_input, "visible input"),
                                          (reconstruction, "reconstruction"))):
            ax = axes[c, j]
            ax.imshow(img[c, z].T, cmap="gray", vmin=lo, vmax=hi, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{series_names[c]} ({state})\n{label}", fontsize=9,
                         color="red" if hidden[c] else "black")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure_atomically(fig, path, dpi=80)


def save_figure_atomically(fig, path: str, dpi: int = 100) -> None:
    """Save a matplotlib figure to a temporary PNG beside ``path`` and rename it over ``path`` (a crash never leaves
    half a PNG), then close the figure."""
    import matplotlib.pyplot as plt

    fd, tmp = tempfile.mkstemp(suffix=".png", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        default_file_mode(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
