"""Deterministic, MRI-like multi-series phantoms in nnU-Net raw format (``csm_nnunet make-dataset``).

Why a generator of our own: tests, tutorials and benchmarks need a dataset that (a) can be shipped as code instead
of as data, (b) is byte-identical for a seed, (c) is small enough to plan, preprocess and train on a CPU in seconds,
and (d) actually rewards *cross-series* reasoning - the whole point of Cross-Series Masking is that one series has to
be predicted from the others, which only makes sense if the series carry complementary information. Each phantom is
therefore built from a tissue map with a per-series contrast table in which the lesion compartments are visible in
some series only, and the per-case class label can only be read from the *relation* between two series:

* ``brain`` (T1, T1ce, T2, FLAIR): head ellipsoid with scalp fat, skull, CSF, grey and white matter and ventricles.
  Every lesion has oedema (bright on T2/FLAIR only), a rim and a necrotic centre of the same geometry and T2/FLAIR
  contrast in both classes. The rim's intrinsic T1 signal varies per case over the same range in both classes; in
  malignant lesions the rim enhances (T1ce = T1 + a fixed uptake; labelled ``enhancing``), in benign ones it does not
  (T1ce = T1; labelled ``necrosis`` together with the centre). T1 alone carries no class information, T1ce alone
  only some (the ranges overlap); T1ce minus T1 separates the classes.
* ``prostate`` (T2w, ADC, DWI): pelvis with fat, muscles, bladder, rectum and a gland with transition and
  peripheral zone. Every case has a peripheral-zone lesion, subtle on T2w. Malignant lesions show restricted
  diffusion: dark on ADC *and* bright on DWI. Benign ones alternate between "T2 shine-through" (bright on DWI, ADC
  not lowered) and "T2 blackout" (dark on ADC, dark on DWI). So neither ADC nor DWI alone separates the classes;
  only their combination does.

Images get partial-volume blur, a smooth multiplicative bias field, Rician noise and an arbitrary per-case intensity
scale (MRI has no absolute units), so models cannot shortcut on raw intensities. Optionally (``--lowres-series``)
some series are acquired coarser and resampled back onto the grid, as 2D and echo-planar clinical series are.
Anatomy (size, position, rotation) and lesion location vary per case.

Conventions: ``shape`` and ``spacing`` are given in numpy array order (z, y, x), the order nnU-Net reports them in
its fingerprint and plans; the files are written with SimpleITK, which stores spacing in (x, y, z) order.

Only numpy is imported at module level; SimpleITK and scipy are imported when a dataset is made, so that
``csm_nnunet --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence

import numpy as np

SERIES: dict[str, tuple[str, ...]] = {
    "brain": ("T1", "T1ce", "T2", "FLAIR"),
    "prostate": ("T2w", "ADC", "DWI"),
}
LABELS: dict[str, dict[str, int]] = {
    "brain": {"background": 0, "edema": 1, "enhancing": 2, "necrosis": 3},
    "prostate": {"background": 0, "gland": 1, "lesion": 2},
}
CLASS_NAMES: list[str] = ["benign", "malignant"]

# Tissue -> (relative signal per series, segmentation label). The signal values are not physical T1/T2 values; they
# are chosen so that each lesion compartment stands out in some series and hides in others (see module docstring).
_BRAIN_TISSUES: dict[str, tuple[tuple[float, float, float, float], int]] = {
    #                      T1    T1ce   T2   FLAIR
    "air": ((0.00, 0.00, 0.00, 0.00), 0),
    "scalp": ((0.95, 0.95, 0.55, 0.60), 0),  # fat: bright on T1
    "skull": ((0.08, 0.08, 0.05, 0.05), 0),
    "csf": ((0.20, 0.20, 1.00, 0.08), 0),  # fluid: bright T2, suppressed in FLAIR
    "gm": ((0.55, 0.55, 0.70, 0.62), 0),
    "wm": ((0.80, 0.80, 0.45, 0.48), 0),
    "edema": ((0.45, 0.45, 0.95, 0.98), 1),  # bright on T2 and FLAIR only
    "necrosis": ((0.25, 0.28, 0.90, 0.45), 3),
    # lesion rim; T1/T1ce are replaced per case (intrinsic T1 drawn per case, plus uptake in T1ce if it enhances)
    "enhancing": ((0.50, 1.10, 0.75, 0.80), 2),
    "rim_nonenhancing": ((0.50, 0.50, 0.75, 0.80), 3),
}
_BRAIN_RIM_T1_RANGE = (0.45, 1.20)  # intrinsic T1 of the rim, the same for both classes
_BRAIN_ENHANCEMENT = 0.60  # T1ce - T1 in enhancing tissue
_PROSTATE_TISSUES: dict[str, tuple[tuple[float, float, float], int]] = {
    #                         T2w   ADC   DWI
    "air": ((0.00, 0.00, 0.00), 0),
    "fat": ((0.85, 0.15, 0.04), 0),  # fat-suppressed DWI
    "muscle": ((0.28, 0.55, 0.12), 0),
    "urine": ((1.00, 1.00, 0.06), 0),
    "rectal_wall": ((0.30, 0.60, 0.25), 0),
    "tz": ((0.52, 0.58, 0.30), 1),
    "pz": ((0.80, 0.72, 0.28), 1),
    "lesion_restricted": ((0.66, 0.22, 0.95), 2),  # malignant: dark ADC and bright DWI, subtle T2w
    "lesion_shine_through": ((0.66, 0.82, 0.92), 2),  # benign: bright DWI without lowered ADC
    "lesion_blackout": ((0.66, 0.24, 0.10), 2),  # benign: dark ADC without bright DWI
}
# Per-series noise level (relative to a signal of 1), intensity scale of the written images, whether the series gets
# the multiplicative bias field (a computed ADC map does not: the coil profile cancels in the ratio).
_SERIES_PHYSICS: dict[str, tuple[float, float, bool]] = {
    "T1": (0.025, 1000.0, True),
    "T1ce": (0.025, 1000.0, True),
    "T2": (0.030, 1000.0, True),
    "FLAIR": (0.035, 1000.0, True),
    "T2w": (0.030, 1000.0, True),
    "ADC": (0.040, 3000.0, False),
    "DWI": (0.060, 500.0, True),
}


#: With ``lowres_series``: how many times coarser than the grid each series is acquired, per axis (z, y, x), as in
#: common clinical protocols. Brain: T1 and T1ce as 3D isotropic sequences, T2 and FLAIR as 2D sequences with twice
#: the slice thickness. Prostate: T2w in-plane at full resolution with twice the slice thickness; DWI (and the ADC
#: map computed from it) echo-planar, twice as coarse in every axis. Series not listed are acquired on the grid.
LOWRES_FACTORS: dict[str, dict[str, tuple[int, int, int]]] = {
    "brain": {"T2": (2, 1, 1), "FLAIR": (2, 1, 1)},
    "prostate": {"T2w": (2, 1, 1), "ADC": (2, 2, 2), "DWI": (2, 2, 2)},
}


def _acquire_low(signal: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """The signal an acquisition ``factors`` times coarser records: the mean over each block of grid voxels (a box
    slice profile / voxel), edge-padded where the grid is not a multiple of the factor."""
    pad = [(0, (-n) % f) for n, f in zip(signal.shape, factors)]
    padded = np.pad(signal, pad, mode="edge")
    z, y, x = (n // f for n, f in zip(padded.shape, factors))
    fz, fy, fx = factors
    return padded.reshape(z, fz, y, fy, x, fx).mean(axis=(1, 3, 5)).astype(np.float32)


def _resample_to_grid(low: np.ndarray, factors: tuple[int, int, int], shape: tuple[int, int, int]) -> np.ndarray:
    """Linear interpolation of a coarse acquisition back onto the grid, as scanners and nnU-Net's users do when
    series of one study are brought onto one grid. Grid voxel i lies at low-resolution index (i + 0.5) / f - 0.5."""
    from scipy.ndimage import map_coordinates

    axes = [np.clip((np.arange(n) + 0.5) / f - 0.5, 0.0, m - 1) for n, f, m in zip(shape, factors, low.shape)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))
    return map_coordinates(low, coords, order=1, mode="nearest").astype(np.float32)


class SyntheticDatasetError(ValueError):
    """Bad arguments or an unusable output folder; the message says what to change."""


# ----------------------------------------------------------------------------------------------------------------
# geometry helpers
# ----------------------------------------------------------------------------------------------------------------

def _random_rotation(rng: np.random.Generator, max_angle_deg: float) -> np.ndarray:
    """Rotation matrix about a random axis by at most ``max_angle_deg`` (Rodrigues' formula)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(-max_angle_deg, max_angle_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


class _Grid:
    """Voxel-centre coordinates in mm (centred on the field of view) as three open (broadcastable) axes.

    Every quantity the phantom needs (rotated ellipsoid coordinates, plane waves) is an affine function of the
    coordinates, so it is evaluated as the broadcast sum of three 1-D arrays: float32, contiguous and ~10x faster
    than going through an (N, 3) point array.
    """

    def __init__(self, shape: Sequence[int], spacing: Sequence[float]) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.axes = [((np.arange(n) - (n - 1) / 2.0) * s) for n, s in zip(self.shape, spacing)]
        self.fov = np.asarray(self.shape, dtype=np.float64) * np.asarray(spacing, dtype=np.float64)

    def affine(self, coeffs: np.ndarray, offset: float) -> np.ndarray:
        """``coeffs . p + offset`` for every voxel centre p, as a float32 array of the grid's shape."""
        z, y, x = (np.asarray(coeffs[i] * a, dtype=np.float32) for i, a in enumerate(self.axes))
        return (z[:, None, None] + np.float32(offset)) + y[None, :, None] + x[None, None, :]


class _Blob:
    """A rotated ellipsoid with a smoothly perturbed surface.

    ``radius(grid)`` returns a normalised radius (< 1 inside); ``signed_mm(grid)`` an approximate signed distance to
    the surface in mm, used to carve shells (skull, enhancing rim) of a physical thickness.
    """

    def __init__(self, rng: np.random.Generator, center: np.ndarray, radii: np.ndarray, rotation: np.ndarray,
                 roughness: float, n_waves: int = 4) -> None:
        self.center = np.asarray(center, dtype=np.float64)
        self.radii = np.asarray(radii, dtype=np.float64)
        self.rotation = rotation
        self.roughness = roughness
        # low-frequency plane waves in the blob's own normalised frame: a few bumps across the surface
        self.freqs = rng.normal(size=(n_waves, 3)) * 1.2
        self.phases = rng.uniform(0, 2 * np.pi, size=n_waves)
        self.amps = rng.uniform(0.5, 1.0, size=n_waves) / n_waves

    def radius(self, grid: _Grid) -> np.ndarray:
        # normalised blob coordinates q = R^T (p - c) / radii are affine in p: q_k = m[:, k] . p - m[:, k] . c
        m = self.rotation / self.radii[None, :]
        r2 = np.zeros(grid.shape, dtype=np.float32)
        for k in range(3):
            r2 += grid.affine(m[:, k], -float(m[:, k] @ self.center)) ** 2
        r = np.sqrt(r2)
        if self.roughness:
            wobble = np.zeros(grid.shape, dtype=np.float32)
            for f, ph, a in zip(self.freqs, self.phases, self.amps):
                w = m @ f  # f . q = (m f) . p - (m f) . c
                wobble += np.float32(a) * np.cos(grid.affine(w, ph - float(w @ self.center)))
            r *= 1.0 + np.float32(self.roughness) * wobble
        return r

    def signed_mm(self, grid: _Grid) -> np.ndarray:
        return (self.radius(grid) - 1.0) * np.float32(self.radii.mean())


def _point_in_blob(rng: np.random.Generator, blob: _Blob, max_radius: float, constraint=None) -> np.ndarray:
    """A random point at normalised radius <= ``max_radius`` of ``blob`` (optionally satisfying ``constraint``)."""
    for _ in range(1000):
        u = rng.normal(size=3)
        u *= rng.uniform(0.0, max_radius) / np.linalg.norm(u)
        p = blob.center + blob.rotation @ (u * blob.radii)
        if constraint is None or constraint(u):
            return p
    raise RuntimeError("could not place a point inside the blob")  # pragma: no cover - constraint always satisfiable


def _smooth_field(rng: np.random.Generator, grid: _Grid, extent: np.ndarray, amplitude: float,
                  n_waves: int = 3) -> np.ndarray:
    """exp of a sum of a few very low-frequency waves: a positive, smooth, multiplicative field (bias / texture)."""
    freqs = rng.normal(size=(n_waves, 3)) * (np.pi / extent)
    phases = rng.uniform(0, 2 * np.pi, size=n_waves)
    amps = rng.uniform(0.5, 1.0, size=n_waves) * amplitude / np.sqrt(n_waves)
    acc = np.zeros(grid.shape, dtype=np.float32)
    for f, ph, a in zip(freqs, phases, amps):
        acc += np.float32(a) * np.cos(grid.affine(f, ph))
    return np.exp(acc)


# ----------------------------------------------------------------------------------------------------------------
# anatomy
# ----------------------------------------------------------------------------------------------------------------

def _brain_tissue_map(rng: np.random.Generator, grid: _Grid, malignant: bool, variant: int,
                      min_feature_mm: float) -> tuple[np.ndarray, dict[str, tuple[float, ...]]]:
    """(tissue index per voxel into ``list(_BRAIN_TISSUES)``, per-case contrast overrides); later tissues paint over
    earlier ones."""
    names = list(_BRAIN_TISSUES)
    t = {n: i for i, n in enumerate(names)}
    tissue = np.full(grid.shape, t["air"], dtype=np.int16)
    fov = grid.fov

    head_radii = 0.42 * fov * rng.uniform(0.88, 1.04, size=3)
    head_center = rng.uniform(-0.04, 0.04, size=3) * fov
    rot = _random_rotation(rng, 10.0)
    head = _Blob(rng, head_center, head_radii, rot, roughness=0.02)
    r_head = head.radius(grid)
    tissue[r_head < 1.0] = t["scalp"]
    tissue[r_head < 0.93] = t["skull"]
    tissue[r_head < 0.86] = t["csf"]
    brain = r_head < 0.81
    tissue[brain] = t["gm"]
    wm = _Blob(rng, head_center, head_radii * 0.62, rot, roughness=0.12, n_waves=6)
    tissue[brain & (wm.radius(grid) < 1.0)] = t["wm"]
    for side in (-1.0, 1.0):  # two lateral ventricles
        offset = rot @ (np.array([0.02, 0.0, 0.13 * side]) * head_radii)
        vent = _Blob(rng, head_center + offset, head_radii * np.array([0.10, 0.22, 0.06]), rot, roughness=0.05)
        tissue[vent.radius(grid) < 1.0] = t["csf"]

    # lesion: somewhere in the brain, away from the surface; compartments are clipped to the brain
    lesion_center = _point_in_blob(rng, head, 0.45)
    edema_r = 0.40 * float(head_radii.min()) * rng.uniform(0.85, 1.15)
    core_r = edema_r * rng.uniform(0.5, 0.65)
    edema = _Blob(rng, lesion_center, edema_r * rng.uniform(0.8, 1.2, size=3), _random_rotation(rng, 180.0), 0.18)
    core = _Blob(rng, lesion_center, core_r * rng.uniform(0.85, 1.15, size=3), _random_rotation(rng, 180.0), 0.12)
    tissue[brain & (edema.radius(grid) < 1.0)] = t["edema"]
    core_d = core.signed_mm(grid)
    rim = "enhancing" if malignant else "rim_nonenhancing"
    rim_mm = max(0.35 * core_r, 1.2 * min_feature_mm)
    tissue[brain & (core_d < 0.0)] = t[rim]
    tissue[brain & (core_d < -rim_mm)] = t["necrosis"]
    t1 = rng.uniform(*_BRAIN_RIM_T1_RANGE)
    t2, flair = _BRAIN_TISSUES[rim][0][2:]
    return tissue, {rim: (t1, t1 + (_BRAIN_ENHANCEMENT if malignant else 0.0), t2, flair)}


def _prostate_tissue_map(rng: np.random.Generator, grid: _Grid, malignant: bool, variant: int,
                         min_feature_mm: float) -> tuple[np.ndarray, dict[str, tuple[float, ...]]]:
    """Pelvis phantom; axis 0 is superior-inferior, axis 1 anterior(-)-posterior(+), axis 2 left-right.

    ``variant`` picks the benign lesion type (0: shine-through, 1: blackout)."""
    names = list(_PROSTATE_TISSUES)
    t = {n: i for i, n in enumerate(names)}
    tissue = np.full(grid.shape, t["air"], dtype=np.int16)
    fov = grid.fov

    body_radii = fov * np.array([0.62, 0.40, 0.46]) * rng.uniform(0.9, 1.04, size=3)
    body_center = rng.uniform(-0.03, 0.03, size=3) * fov
    rot = _random_rotation(rng, 6.0)
    body = _Blob(rng, body_center, body_radii, rot, roughness=0.02)
    r_body = body.radius(grid)
    tissue[r_body < 1.0] = t["fat"]
    inner = r_body < 0.86

    def at(offset: Sequence[float]) -> np.ndarray:
        return body_center + rot @ (np.asarray(offset) * body_radii)

    for side in (-1.0, 1.0):  # obturator-like muscles
        m = _Blob(rng, at([0.0, 0.05, 0.55 * side]), body_radii * np.array([0.7, 0.35, 0.14]), rot, 0.05)
        tissue[inner & (m.radius(grid) < 1.0)] = t["muscle"]
    bladder = _Blob(rng, at([-0.55, -0.25, 0.0]), body_radii * np.array([0.3, 0.3, 0.3]) * rng.uniform(0.8, 1.2),
                    rot, 0.05)
    tissue[inner & (bladder.radius(grid) < 1.0)] = t["urine"]
    rectum = _Blob(rng, at([0.1, 0.55, 0.0]), body_radii * np.array([0.6, 0.15, 0.15]), rot, 0.05)
    r_rect = rectum.radius(grid)
    tissue[inner & (r_rect < 1.0)] = t["rectal_wall"]
    tissue[inner & (r_rect < 0.55)] = t["air"]

    gland_r = 0.45 * float(body_radii[1:].mean()) * np.array([1.0, 0.85, 1.2]) * rng.uniform(0.85, 1.15, size=3)
    gland = _Blob(rng, at([0.1, 0.05, 0.0]) + rng.uniform(-0.05, 0.05, size=3) * body_radii, gland_r,
                  rot @ _random_rotation(rng, 8.0), roughness=0.05)
    in_gland = gland.radius(grid) < 1.0
    tissue[in_gland] = t["pz"]
    tz = _Blob(rng, gland.center + gland.rotation @ (np.array([0.0, -0.3, 0.0]) * gland_r), gland_r * 0.6,
               gland.rotation, roughness=0.08)
    tissue[in_gland & (tz.radius(grid) < 1.0)] = t["tz"]

    # lesion in the posterior (peripheral-zone) half of the gland, clipped to the gland
    center = _point_in_blob(rng, gland, 0.55, constraint=lambda u: u[1] > 0.35)
    lesion_r = max(0.40 * float(gland_r.mean()) * rng.uniform(0.85, 1.2), 1.5 * min_feature_mm)
    lesion = _Blob(rng, center, lesion_r * rng.uniform(0.8, 1.2, size=3), _random_rotation(rng, 180.0), 0.15)
    kind = "lesion_restricted" if malignant else ("lesion_shine_through", "lesion_blackout")[variant % 2]
    tissue[in_gland & (lesion.radius(grid) < 1.0)] = t[kind]
    return tissue, {}


# ----------------------------------------------------------------------------------------------------------------
# case and dataset
# ----------------------------------------------------------------------------------------------------------------

def _make_case(kind: str, shape: tuple[int, int, int], spacing: tuple[float, float, float], malignant: bool,
               variant: int, rng: np.random.Generator, lowres_series: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(images float32 (C, Z, Y, X), labels uint8 (Z, Y, X)) of one phantom.

    With ``lowres_series`` the series of :data:`LOWRES_FACTORS` are acquired coarser (block mean), get their noise
    and magnitude at that resolution, and are interpolated back onto the grid: thin structures blur across slices
    and the noise becomes spatially correlated, as in resampled clinical series. Without it the random draws and
    the output are exactly those of earlier versions, so every documented run stays reproducible."""
    from scipy.ndimage import gaussian_filter

    grid = _Grid(shape, spacing)
    table = _BRAIN_TISSUES if kind == "brain" else _PROSTATE_TISSUES
    tissue_fn = _brain_tissue_map if kind == "brain" else _prostate_tissue_map
    tissue, overrides = tissue_fn(rng, grid, malignant, variant, float(max(spacing)))

    contrast = np.array([overrides.get(k, v[0]) for k, v in table.items()], dtype=np.float32)  # (n_tissues, C)
    label_of = np.array([v[1] for v in table.values()], dtype=np.uint8)
    labels = label_of[tissue]

    shared_bias = _smooth_field(rng, grid, grid.fov, amplitude=0.25)
    texture = _smooth_field(rng, grid, grid.fov / 4.0, amplitude=0.04, n_waves=6)  # faint tissue inhomogeneity
    images = np.empty((contrast.shape[1], *shape), dtype=np.float32)
    for c, series in enumerate(SERIES[kind]):
        noise_sd, scale, has_bias = _SERIES_PHYSICS[series]
        signal = contrast[tissue, c] * texture
        signal = gaussian_filter(signal, sigma=0.6, mode="nearest")  # partial volume / PSF
        if has_bias:
            series_bias = _smooth_field(rng, grid, grid.fov, amplitude=0.06)
            signal = signal * (shared_bias * series_bias)
        factors = LOWRES_FACTORS[kind].get(series, (1, 1, 1)) if lowres_series else (1, 1, 1)
        if factors != (1, 1, 1):
            signal = _acquire_low(signal, factors)
        n1 = rng.normal(0.0, noise_sd, size=signal.shape).astype(np.float32)
        if series == "ADC":  # a computed map: Gaussian noise, clipped at zero
            signal = np.maximum(signal + n1, 0.0)
        else:  # magnitude images: Rician noise, hence a non-zero noisy background like real scans
            n2 = rng.normal(0.0, noise_sd, size=signal.shape).astype(np.float32)
            signal = np.sqrt((signal + n1) ** 2 + n2 ** 2)
        if factors != (1, 1, 1):
            signal = _resample_to_grid(signal, factors, shape)
        jitter = rng.uniform(0.95, 1.05) if series == "ADC" else rng.uniform(0.7, 1.3)
        images[c] = (signal * np.float32(scale * jitter)).astype(np.float32)
    return images, labels


def _validate(kind: str, num_cases: int, shape: Sequence[int], spacing: Sequence[float],
              missing_series_prob: float) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    if kind not in SERIES:
        raise SyntheticDatasetError(f"unknown kind {kind!r}; choose one of {sorted(SERIES)}")
    if int(num_cases) < 1:
        raise SyntheticDatasetError(f"num_cases must be >= 1, got {num_cases}")
    if len(shape) != 3 or any(int(s) < 16 for s in shape):
        raise SyntheticDatasetError(f"shape must be three integers >= 16 (z y x), got {tuple(shape)}")
    if len(spacing) != 3 or any(float(s) <= 0 for s in spacing):
        raise SyntheticDatasetError(f"spacing must be three positive numbers (z y x), got {tuple(spacing)}")
    if not 0.0 <= float(missing_series_prob) < 1.0:
        raise SyntheticDatasetError(f"missing_series_prob must be in [0, 1), got {missing_series_prob}")
    return (int(shape[0]), int(shape[1]), int(shape[2])), (float(spacing[0]), float(spacing[1]), float(spacing[2]))


def _prepare_target(out_folder: str) -> tuple[str, str]:
    """Refuse a non-empty target; return (absolute target, temp folder next to it)."""
    target = os.path.abspath(out_folder)
    if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise SyntheticDatasetError(
            f"output folder {target} already exists and is not empty; choose a new folder or delete it first")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    return target, tmp


def make_synthetic_dataset(out_folder: str, num_cases: int = 6, kind: str = "brain",
                           shape: tuple[int, int, int] = (48, 48, 48),
                           spacing: tuple[float, float, float] = (1.5, 1.5, 1.5), seed: int = 0,
                           missing_series_prob: float = 0.0, lowres_series: bool = False) -> dict:
    """Write ``num_cases`` phantoms of ``kind`` into ``out_folder`` (nnU-Net raw layout); return the dataset.json.

    The folder is built next to the target and renamed into place at the end, so an interrupted run never leaves a
    half-written dataset that nnU-Net would plan on. ``out_folder`` must not exist or be empty.

    Determinism: case ``i`` depends only on ``(seed, i)`` (not on ``num_cases`` or ``missing_series_prob``), so a
    larger dataset extends a smaller one with the same seed. Classes alternate (benign/malignant) from a seed-dependent
    start, so every dataset with >= 2 cases has both classes.

    With ``missing_series_prob > 0`` each series of each case is independently replaced by an all-zero image with
    that probability (at least one series per case is kept); dataset.json lists them under ``missing_series``.

    With ``lowres_series`` some series are acquired at a lower resolution and resampled back onto the grid
    (:data:`LOWRES_FACTORS`; dataset.json lists the factors under ``csm_synthetic``). Off by default, so that the
    data behind every documented experiment is unchanged; labels and the series acquired on the grid before the
    first coarse one are identical either way.
    """
    import SimpleITK as sitk

    shape, spacing = _validate(kind, num_cases, shape, spacing, missing_series_prob)
    series = SERIES[kind]
    target, tmp = _prepare_target(out_folder)
    try:
        os.makedirs(os.path.join(tmp, "imagesTr"))
        os.makedirs(os.path.join(tmp, "labelsTr"))
        first_class = int(np.random.default_rng([seed, 0xC1A55]).integers(2))
        classification: dict[str, int] = {}
        missing: dict[str, list[str]] = {}
        for i in range(int(num_cases)):
            case = f"{kind}_{i:03d}"
            malignant = bool((i + first_class) % 2)
            variant = (i // 2) % 2  # alternates between consecutive cases of the same class
            images, labels = _make_case(kind, shape, spacing, malignant, variant, np.random.default_rng([seed, i]),
                                        lowres_series=lowres_series)
            if missing_series_prob > 0:
                drop = np.random.default_rng([seed, i, 0x5E41E5]).random(len(series)) < missing_series_prob
                if drop.all():  # keep at least one series, chosen deterministically
                    drop[int(np.random.default_rng([seed, i, 0xCEE9]).integers(len(series)))] = False
                for c in np.flatnonzero(drop):
                    images[c] = 0.0
                if drop.any():
                    missing[case] = [series[c] for c in np.flatnonzero(drop)]
            classification[case] = int(malignant)
            for c in range(len(series)):
                _write(sitk, images[c], spacing, os.path.join(tmp, "imagesTr", f"{case}_{c:04d}.nii.gz"))
            _write(sitk, labels, spacing, os.path.join(tmp, "labelsTr", f"{case}.nii.gz"))

        dataset_json = {
            "channel_names": {str(c): name for c, name in enumerate(series)},
            "labels": dict(LABELS[kind]),
            "numTraining": int(num_cases),
            "file_ending": ".nii.gz",
            "name": f"csm-nnunet synthetic {kind} phantoms",
            "description": "Synthetic MRI-like multi-series phantoms written by csm_nnunet.synthetic; the class "
                           "label depends on the relation between two series (see the module docstring).",
            "licence": "synthetic data, no restrictions",
            "classification_labels": classification,
            "class_names": list(CLASS_NAMES),
            # the class is about the lesion: crops for classification centre on it (brain: every tumour label)
            "classification_roi_labels": ["lesion"] if kind == "prostate" else ["edema", "enhancing", "necrosis"],
            "missing_series": missing,
            "csm_synthetic": {"kind": kind, "seed": int(seed), "shape": list(shape), "spacing": list(spacing),
                              "missing_series_prob": float(missing_series_prob),
                              "lowres_series": {name: list(f) for name, f in LOWRES_FACTORS[kind].items()}
                              if lowres_series else {}},
        }
        with open(os.path.join(tmp, "dataset.json"), "w") as f:
            json.dump(dataset_json, f, indent=2)
        if os.path.isdir(target):  # existing but empty (checked above)
            os.rmdir(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dataset_json


def _write(sitk, array: np.ndarray, spacing: tuple[float, float, float], path: str) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]))  # SimpleITK wants (x, y, z)
    sitk.WriteImage(img, path, True)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", choices=sorted(SERIES), default="brain", help="phantom type (default: brain)")
    parser.add_argument("--cases", type=int, default=6, help="number of cases (default: 6)")
    parser.add_argument("--out", required=True, help="output dataset folder, e.g. $nnUNet_raw/Dataset990_SynthBrain; "
                                                     "must not exist or be empty")
    parser.add_argument("--shape", type=int, nargs=3, default=(48, 48, 48), metavar=("Z", "Y", "X"),
                        help="image shape in voxels (default: 48 48 48)")
    parser.add_argument("--spacing", type=float, nargs=3, default=(1.5, 1.5, 1.5), metavar=("Z", "Y", "X"),
                        help="voxel spacing in mm (default: 1.5 1.5 1.5)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same data (default: 0)")
    parser.add_argument("--missing-prob", type=float, default=0.0,
                        help="probability that a series of a case is missing (written as zeros; default: 0)")
    parser.add_argument("--lowres-series", action="store_true",
                        help="acquire some series at a lower resolution and resample them back onto the grid, as "
                             "clinical protocols do (brain: T2 and FLAIR with twice the slice thickness; prostate: T2w "
                             "with twice the slice thickness, DWI and ADC twice as coarse in every axis); off by "
                             "default so that earlier datasets are reproduced exactly")


def run(args: argparse.Namespace) -> int:
    try:
        ds = make_synthetic_dataset(args.out, num_cases=args.cases, kind=args.kind, shape=tuple(args.shape),
                                    spacing=tuple(args.spacing), seed=args.seed, missing_series_prob=args.missing_prob,
                                    lowres_series=args.lowres_series)
    except SyntheticDatasetError as e:
        print(f"csm_nnunet make-dataset: error: {e}", file=sys.stderr)
        return 1
    n_mal = sum(ds["classification_labels"].values())
    print(f"wrote {ds['numTraining']} {args.kind} cases ({n_mal} malignant) with series "
          f"{', '.join(ds['channel_names'].values())} to {os.path.abspath(args.out)}")
    if ds["missing_series"]:
        print(f"{len(ds['missing_series'])} case(s) have missing (all-zero) series, listed in dataset.json")
    if not re.fullmatch(r"Dataset\d{3}_.+", os.path.basename(os.path.abspath(args.out))):
        print("note: nnU-Net only finds datasets in $nnUNet_raw named DatasetXXX_Name (XXX = three digits)")
    return 0
