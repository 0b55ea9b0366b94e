"""Figures of the model and of the analyses' results (matplotlib), one module a job:
``projection_figures`` (``deconvnet project`` sheets, a projection in a notebook), ``model_figures``
(training curves, confusion matrix, layer-1 filters Fig. 6, feature evolution Fig. 4),
``analysis_figures`` (occlusion Fig. 7, invariance Fig. 5, correspondence Table 1, linear probes
Table 6) and ``unit_figures`` (feature visualization, the sanity checks); all of them importable from
here, as before. Each function RETURNS a ``matplotlib.figure.Figure`` made at the resolution it is
meant to be saved at; the caller saves it with ``display.save_figure(fig, path)`` (or ``figure_png``)."""

from __future__ import annotations

from .analysis_figures import (
    TRANSFORM_UNITS,
    correspondence_figure,
    invariance_figure,
    occlusion_figure,
    probe_figure,
)
from .model_figures import confusion_figure, evolution_figure, filter_trend_figure, filters_figure, training_curves
from .projection_figures import (
    RULE_NAMES,
    projection_figure,
    projection_view_figure,
    rules_figure,
    strongest_maps_figure,
)
from .unit_figures import sanity_figure, unit_scores_figure, visualization_figure

__all__ = [
    "training_curves",
    "projection_figure",
    "projection_view_figure",
    "strongest_maps_figure",
    "confusion_figure",
    "occlusion_figure",
    "invariance_figure",
    "correspondence_figure",
    "probe_figure",
    "filters_figure",
    "evolution_figure",
    "sanity_figure",
    "unit_scores_figure",
    "visualization_figure",
    "rules_figure",
    "filter_trend_figure",
    "RULE_NAMES",
    "TRANSFORM_UNITS",
]
