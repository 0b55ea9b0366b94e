"""Occlusion sensitivity (Zeiler & Fergus 2014, Sec. 4.2 and Fig. 7).

A square of ``size`` pixels, filled with a constant colour (the dataset mean by default, i.e. 0 in
the model's normalised input space), is slid over the image with ``stride``. Its top-left corner
takes the positions ``0, stride, 2*stride, ... <= H - size`` on each axis (the square always lies
fully inside the image). For every position we record

* (b) the total activation (summed over space) of one feature map of one layer, by default the map
  of ``conv5`` (rectified) that is strongest on the unoccluded image,
* (d) the probability of a target class (the true class if given, else the top class of the
  unoccluded image), and
* (e) the most probable class and its probability.

Incremental inference (``method="incremental"``, the default) gives the same numbers as running each
occluded image through the whole network (``method="full"``), several times faster: an occluder only
changes the units of each layer whose receptive field it meets (a rectangle per layer, computed
exactly), so only those are carried from layer to layer, on top of the unoccluded image's
activations. Convolutions add the convolution of the change (linear: conv(a + d) = conv(a) +
conv_without_bias(d), with d non-zero on the changed units only), as a scatter through the filters;
max pools (and convolutions where that does not pay) recompute a small window. ``IncrementalOcclusion``
describes the details. The results agree with the full computation to float32 round-off (the sums
run in another order; about 5e-7 relative on the watched activation, 2e-7 on a probability);
``max_difference`` measures it.

The package: ``incremental.py`` (the incremental engine), ``maps.py`` (the verb ``occlusion_maps``,
its result ``OcclusionMaps``, and ``occlusion_analysis``: the maps with the projection of the watched
map, composed once for ``deconvnet occlusion`` and the explorer).
"""

from __future__ import annotations

from .incremental import IncrementalOcclusion, OcclusionStep
from .maps import (
    OcclusionAnalysis,
    OcclusionMaps,
    default_grid,
    fill_value,
    max_difference,
    occlude,
    occlusion_analysis,
    occlusion_maps,
    occlusion_positions,
    projection_of_map,
)

__all__ = [
    "OcclusionMaps",
    "OcclusionAnalysis",
    "occlusion_positions",
    "occlude",
    "occlusion_maps",
    "occlusion_analysis",
    "projection_of_map",
    "default_grid",
    "max_difference",
    "fill_value",
    "IncrementalOcclusion",
    "OcclusionStep",
]
