"""What a unit wants to see: feature visualization by optimisation (Erhan et al. 2009; Simonyan et al.
2014; Olah et al., Distill 2017 "Feature Visualization").

For each selected unit an input image ``x`` is optimised (Adam, gradient ascent) to make the unit's
activation ``a_u(x)`` large. The unit is one channel ``c`` of a layer read three ways, or a class:

* ``objective="centre"``: the map's centre unit, ``a_u = A[c, h // 2, w // 2]``;
* ``objective="map"``: the whole map, ``a_u = mean_{y,x} A[c, y, x]``;
* ``layer="logits"``: the class logit ``c`` (the model's output).

A rectified layer (a ReLU module, e.g. ZFNet's ``conv5``) is optimised at its pre-activation, which
has a gradient where the unit is still off; the measures below read the rectified value.

**Parameterisation** (Olah et al. 2017, Lucid's ``fft_image`` and ``to_valid_rgb``). The free
parameters ``z`` are, per colour channel, the real and imaginary parts of the image's half spectrum
(``torch.fft.rfft2``, orthonormal). The image is

    x = sigmoid( M . irfft2( s * z ) / 4 ),   s(f) = 1 / max(|f|, 1 / max(H, W))

where ``|f|`` is a frequency's magnitude in cycles per pixel (so every frequency starts with about
the same energy in the image: natural images' 1/f spectrum, not white noise), and ``M`` is Lucid's
colour decorrelation: the square root of ImageNet's RGB covariance (its SVD factor, columns scaled
to a largest norm of 1), so the optimiser steps along decorrelated colour directions. The sigmoid
keeps ``x`` in [0, 1]; the model's normalisation is applied after it. ``FourierImage.inverse``
maps an image back to parameters (``logit``, ``M^-1``, ``rfft2``, ``/ s``): exact up to float
rounding for any image with values in (0, 1).

**Transformations** at every step (transformation robustness), drawn independently per unit and step:
the image is padded by ``pad`` pixels of mid-grey, then warped by one affine map (``affine_grid`` +
``grid_sample``, bilinear, batched; for class logits the padded view is resized back to the image's
size, as classifiers often take one input size only): a rotation by an angle from ``angles`` (degrees), a scaling by a
factor from ``scales`` and a translation by two integer jitters (``jitter`` then ``jitter // 2``
pixels at most, in Lucid's order: jitter before and after scaling and rotating; the ranges are not
Lucid's: its jitter(d) crops, a shift of about +-d/2, and lucent 0.1.8's is a one-sided 0..d-1 px shift,
so ours moves about twice as far; ``jitter`` sets it). With the centre objective the view is also
shifted by a fixed offset (``cone.view_cone``) that puts the padded view's centre unit over the
image's own centre unit, the one the result is read at: padding moves the map's grid (on ZFNet's
conv5, ``pad=12`` is 0.75 of the 16 px stride, a 4 px shift; with it the 16 units of the lucent
benchmark reach a median 1.16x more at 48 steps, 15 of 16 higher). An
optional total-variation penalty ``tv * sum |x[y+1,x] - x[y,x]| + |x[y,x+1] - x[y,x]|`` (mean over
pixels) smooths the image further.

**Batching.** Many units are optimised together, one image each, in batches of ``batch_size``. The
loss is the *sum* over units (never a mean) and Adam is elementwise, so each unit's image follows its
own gradient only. Each unit's random start and random transforms come from its own generator,
seeded by the seed and the unit (layer, objective, channel), never by its position in the batch: a
unit's image is the same whether it is optimised alone or among others, up to the float rounding of
batched convolutions (tested on a small model after 12 steps: pixels within 1 grey level of 255,
activations within 1e-4 relative; on the bundled model the 8 units of a 20-unit run, rerun alone,
reached the same activations to the 3 digits printed).

**Only the centre unit's cone.** The centre unit of a map depends only on the pixels of its
receptive field, and at each layer only on the cells its layers above read (``visualize.cone``: on
ZFNet's conv5 1 cell of conv5, 3x3 of conv4, 5x5 of conv3, ... 139x139 pixels), so with
``objective="centre"`` each step warps only the receptive field's pixels of the transformed view and
computes every layer over its part of the cone: the same values as the whole view (the cone is read
from the model's ``torch.fx`` graph and checked on each batch's first unit against the model's own
forward pass; a model the cone cannot follow gets whole views). Its convolutions round differently
from the whole view's, which, as batching does, can move a weak unit's result (Adam's first steps
follow the gradient's sign).

**The sanity measure** (``peak`` vs ``exemplar``): the optimised image, untransformed, at its size
(default the model's crop) goes through the model once; ``peak`` is the unit's map's strongest value
(a logit: its value) and ``reached`` the objective's value. ``exemplar`` is the best natural
exemplar's activation of the same map, the atlas's top-1 (the strongest value of the map over a
folder of images at the model's crop size) when an atlas is given. A readable optimised image should
excite its unit more than any natural image does: ``beats = peak > exemplar``.
"""

from __future__ import annotations

from .optimise import LOGITS, OBJECTIVES, layer_module, unit_seed, visualize
from .parameterisation import COLOR_CORRELATION_SVD_SQRT, FourierImage
from .result import Visualization
from .transforms import DEFAULT_ANGLES, DEFAULT_SCALES

__all__ = [
    "COLOR_CORRELATION_SVD_SQRT",
    "DEFAULT_ANGLES",
    "DEFAULT_SCALES",
    "LOGITS",
    "OBJECTIVES",
    "FourierImage",
    "Visualization",
    "layer_module",
    "unit_seed",
    "visualize",
]
