"""The similarity measures of two maps: Spearman's rank correlation, SSIM and the correlation of HOG
features, inside a unit's receptive field."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats

from ...errors import optional_extra
from .maps import MEASURES, Box


def crop(m: np.ndarray, box: Box) -> np.ndarray:
    y0, x0, y1, x1 = box
    return m[y0:y1, x0:x1].astype(np.float64)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps (average ranks for ties); NaN if either is constant."""
    a, b = a.ravel(), b.ravel()
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def _unit_range(m: np.ndarray) -> np.ndarray:
    top = m.max()
    return m / top if top > 0 else m


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two non-negative maps each divided by its maximum (data range 1); NaN if either is
    constant or the crop is smaller than 3 pixels."""
    with optional_extra("analyses", "the SSIM measure needs"):
        from skimage.metrics import structural_similarity
    side = min(a.shape)
    if side < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    win = min(7, side if side % 2 else side - 1)
    return float(structural_similarity(_unit_range(a), _unit_range(b), data_range=1.0, win_size=win))


def _hog(m: np.ndarray) -> np.ndarray:
    with optional_extra("analyses", "the HOG measure needs"):
        from skimage.feature import hog
    cell = max(2, min(m.shape) // 4)
    return hog(_unit_range(m), orientations=9, pixels_per_cell=(cell, cell), cells_per_block=(2, 2))


def hog_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's correlation of the two maps' HOG features; NaN if either is constant or too small."""
    if min(a.shape) < 4 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    ha, hb = _hog(a), _hog(b)
    if np.ptp(ha) == 0 or np.ptp(hb) == 0:
        return float("nan")
    return float(np.corrcoef(ha, hb)[0, 1])


_MEASURE_FUNCTIONS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "spearman": spearman,
    "spearman_signed": spearman,
    "ssim": ssim,
    "hog": hog_correlation,
}


def map_similarity(a: np.ndarray, b: np.ndarray, box: Box, measures: Sequence[str] = MEASURES) -> dict[str, float]:
    """Each measure of two maps inside ``box``: (2, H, W) pairs (``sum_c |R_c|``, ``sum_c R_c``) as
    ``unit_maps`` gives them (``spearman_signed`` reads the second), or plain (H, W) maps."""
    out = {}
    for m in measures:
        plane = 1 if m == "spearman_signed" else 0
        pa, pb = (a[plane], b[plane]) if a.ndim == 3 else (a, b)
        out[m] = _MEASURE_FUNCTIONS[m](crop(pa, box), crop(pb, box))
    return out
