"""How far to trust a projection: sanity checks and faithfulness measures of the projection rules.

Every measure looks at **units**: in each image and selected layer, the strongest activation of the
layer (the channel and position of its largest value on the trained model, the unit the paper would
project). A unit's *map* is its projection seeded with 1 (the engine's projection divided by the
activation, so that a unit a randomisation silenced still has a picture), reduced to one channel by
the sum of absolute values over the colour channels: ``m = sum_c |R_c|`` (H, W). Similarities are
computed inside the unit's receptive field (outside it every rule gives exactly 0, and these shared
zeros would count as agreement).

**Model randomisation** (Adebayo et al., NeurIPS 2018, "Sanity checks for saliency maps"). The
model's parameterised blocks (a chain's convolutions; a graph's top-level modules, a ``Sequential``'s
children one by one: ``conv1, bn1, layer1.0 ... layer4.1`` on a ResNet) are re-initialised by their
own ``reset_parameters`` (PyTorch's default initialisation, seeded: block ``k`` gets the same random
weights in every run and mode). *Cascading*: from the top block at or below the highest selected layer
down to the first, cumulatively (step ``s`` randomises the top ``s`` blocks); *independent*: one
block at a time. For each rule, layer and step, the map of the same unit (channel and position) on
the randomised model is compared with the trained model's by

* ``spearman``: Spearman's rank correlation of the two maps (ties get average ranks);
* ``ssim``: the structural similarity (``skimage.metrics.structural_similarity``) of the two maps
  each divided by its maximum (range [0, 1]; window 7, or the crop's smaller odd side below 7);
* ``hog``: Pearson's correlation of the maps' histograms of oriented gradients
  (``skimage.feature.hog``: 9 orientations, 2x2-cell blocks, cells of ``max(2, side // 4)`` pixels
  where ``side`` is the crop's smaller side, so that small receptive fields still have 4x4 cells).

A rule whose maps stay similar when the weights they are meant to explain are random does not show
those weights. A similarity is NaN where it is undefined (a constant map, e.g. a unit whose gradient
the randomised ReLUs cut off entirely); means and spreads (standard deviation over images) skip NaNs
and ``valid`` counts what they average.

**Unit selectivity** (Mahendran & Vedaldi, ECCV 2016, "Salient deconvolutional networks"): at the
selected position, the ``units`` channels with the largest activations there. ``other_units``: the
mean similarity of the maps of different channels on the same image; ``other_images``: the mean
similarity of the selected channel's maps on different images (same position). A picture that shows
the unit rather than the image has ``other_units`` well below 1; ``selectivity = other_images -
other_units`` is positive when the picture depends more on the unit than on the image.

**Faithfulness to the unit** (pixel flipping; deletion and insertion as in Samek et al. 2017 and
Petsiuk et al. 2018, but following the selected unit's own activation instead of a class score).
The receptive field's pixels are ordered by the map, largest first; for fractions ``f = 0, 1/T ...
1`` the first ``round(f P)`` of the ``P`` pixels are set to 0 in the model-input space (the dataset
mean: *deletion*) or are the only pixels of the image that are not 0 (*insertion*), and the curve is
the unit's activation divided by its activation on the intact image. Area under the curve
(trapezoids over ``f``): low deletion AUC and high insertion AUC mean the ordering found the pixels
the unit responds to. Each rule is compared with ``random_orders`` seeded random orders (their mean
curve: the ``"random"`` row) and with the other rules.
"""

from __future__ import annotations

from .checks import sanity_checks
from .faithfulness import perturbation_curves
from .maps import MEASURES, Explainer, Unit, seed_layer, strongest_units, unit_maps
from .randomisation import randomisation_blocks, randomised
from .report import SanityReport
from .similarity import hog_correlation, map_similarity, spearman, ssim
from .unit import UNIT_SCORES_READING, UnitScores, unit_scores

__all__ = [
    "MEASURES",
    "Unit",
    "Explainer",
    "SanityReport",
    "sanity_checks",
    "randomisation_blocks",
    "randomised",
    "unit_maps",
    "seed_layer",
    "strongest_units",
    "map_similarity",
    "spearman",
    "ssim",
    "hog_correlation",
    "perturbation_curves",
    "UnitScores",
    "unit_scores",
    "UNIT_SCORES_READING",
]
