"""Where an op's output sits on the image: its layout, its receptive field, the images' axis.

Layouts (``Layout``): an op's output is a stack of maps when it is (N, C, H, W) ("maps"),
(N, H, W, C) after a ``permute(0, 2, 3, 1)`` of maps and the ops that keep it (Swin's stages,
ConvNeXt's blocks inside: "channels_last"), or (N, T, C) patch tokens on a square grid, possibly after
a few class/register tokens ("tokens": ViT's encoder). ``ModelGraph.layouts`` says which; a map
of any of them is a channel over the grid (``Layout.to_maps`` / ``Layout.from_maps``).

Receptive fields (``Field``), per axis, as (size, stride, start); how each op changes them is in
``deconvnet.engine.graph``.

The images' axis (``image_axis``): every way down indexes a value's images on the axis that holds
them; permutes, transposes, ``movedim`` and ``unbind`` move it as they move any axis, a reshape keeps
it where the number of elements before it is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from .kinds import Op

__all__ = [
    "Field",
    "Layout",
    "MAPS",
    "MAX_EXTRA_TOKENS",
    "int_pair",
    "image_axis",
    "axis_op",
    "permutation",
    "token_layout",
]


@dataclass(frozen=True)
class Field:
    """Receptive field of one unit, per axis (y, x): ``size`` pixels, ``stride`` pixels between
    neighbouring units, ``start`` = first input pixel of unit 0's field (negative over the padding).
    ``size`` None: every unit sees the whole image."""

    size: tuple[int, int] | None
    stride: tuple[int, int] = (1, 1)
    start: tuple[int, int] = (0, 0)

    def box(self, y: int, x: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Input box (y0, x0, y1, x1), end-exclusive and clipped to the image, that unit (y, x) sees."""
        if self.size is None:
            return 0, 0, height, width
        y0 = self.start[0] + y * self.stride[0]
        x0 = self.start[1] + x * self.stride[1]
        return max(0, y0), max(0, x0), min(height, y0 + self.size[0]), min(width, x0 + self.size[1])

    @property
    def covers_image(self) -> bool:
        return self.size is None


@dataclass(frozen=True)
class Layout:
    """How an op's output holds maps: ``kind`` "maps" (N, C, H, W), "channels_last" (N, H, W, C) or
    "tokens" (N, extra + H*W, C) with ``extra`` leading class/register tokens."""

    kind: str = "maps"
    extra: int = 0

    def to_maps(self, x: torch.Tensor) -> torch.Tensor:
        """The output as (N, C, H, W) maps (a view where possible)."""
        if self.kind == "channels_last":
            return x.permute(0, 3, 1, 2)
        if self.kind == "tokens":
            grid = x[:, self.extra :, :]
            side = math.isqrt(grid.shape[1])
            return grid.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
        return x

    def from_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """(S, C, H, W) maps back to this layout (class/register tokens zero)."""
        if self.kind == "channels_last":
            return maps.permute(0, 2, 3, 1)
        if self.kind == "tokens":
            s, c = maps.shape[:2]
            out = maps.new_zeros(s, self.extra + maps.shape[2] * maps.shape[3], c)
            out[:, self.extra :, :] = maps.reshape(s, c, -1).transpose(1, 2)
            return out
        return maps

    def map_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The (N, C, H, W) shape of an output of ``shape`` in this layout."""
        if self.kind == "channels_last":
            return (shape[0], shape[3], shape[1], shape[2])
        if self.kind == "tokens":
            side = math.isqrt(shape[1] - self.extra)
            return (shape[0], shape[2], side, side)
        return tuple(shape)


MAPS = Layout()
# at most this many class/register tokens before the grid of patch tokens
MAX_EXTRA_TOKENS = 8


def token_layout(shape: Sequence[int]) -> Layout | None:
    """(N, T, C) with T = extra + g*g (g >= 2, extra <= MAX_EXTRA_TOKENS): patch tokens."""
    if len(shape) != 3:
        return None
    for extra in range(MAX_EXTRA_TOKENS + 1):
        side = math.isqrt(max(0, shape[1] - extra))
        if side >= 2 and side * side == shape[1] - extra:
            return Layout("tokens", extra)
    return None


def permutation(node: fx.Node) -> tuple[int, ...] | None:
    """The dims of a ``permute`` node (method or function), if it is one."""
    if node.target not in ("permute", torch.permute):
        return None
    dims = node.args[1:] if node.op == "call_method" else node.args[1:2]
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = tuple(dims[0])
    return tuple(dims) if all(isinstance(d, int) for d in dims) else None  # type: ignore[arg-type]


def int_pair(v: Any) -> tuple[int, int]:
    """A size/stride/padding argument (an int or a pair) as a pair of ints."""
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


# ops that may move the images' axis (torch functions and tensor methods alike, by name)
_AXIS_FUNCTIONS: dict[Any, str] = {
    torch.permute: "permute",
    torch.transpose: "transpose",
    torch.swapaxes: "transpose",
    torch.movedim: "movedim",
    torch.unbind: "unbind",
}
_AXIS_METHODS = {
    "permute": "permute",
    "transpose": "transpose",
    "swapaxes": "transpose",
    "movedim": "movedim",
    "unbind": "unbind",
}


def axis_op(op: Op) -> str | None:
    """What ``op`` does to its input's axes: "permute", "transpose", "movedim", "unbind", or None (keeps them)."""
    node = op.node
    if node.op == "call_method":
        return _AXIS_METHODS.get(str(node.target))
    if node.op == "call_function":
        return _AXIS_FUNCTIONS.get(node.target)
    return None


def _reshaped_axis(axis: int, before: Sequence[int], after: Sequence[int]) -> int | None:
    """Where a reshape puts input axis ``axis``: the output axis with the same length and the same
    number of elements before it (None: the reshape merges or splits that axis)."""
    prefix = math.prod(before[:axis])
    for b, size in enumerate(after):
        if math.prod(after[:b]) == prefix and size == before[axis]:
            return b
        if math.prod(after[:b]) > prefix:
            break
    return None


def image_axis(op: Op, axis: int | None, before: Sequence[int], args: Sequence[Any], out: Any) -> int | None:
    """The axis of ``op``'s output that holds the images, given that of its first signal input
    (``axis`` of a tensor shaped ``before``; ``args``: the op's evaluated arguments). Every way down
    indexes the images on that axis. Permutes, transposes, ``movedim`` and ``unbind`` move it as they
    move any axis (timm's attention: ``qkv.permute(2, 0, 3, 1, 4).unbind(0)``, images on axis 1 in
    between); a reshape keeps it where the elements before it are as many; other ops keep it. None:
    the images are merged with another axis or lost (the way down refuses such an op)."""
    if axis is None:
        return None
    kind = axis_op(op)
    rank = len(before)
    kwargs: dict[str, Any] = dict(op.node.kwargs)
    if kind == "permute":
        dims = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
        dims = [int(d) % rank for d in (dims or kwargs.get("dims", ()))]
        return dims.index(axis) if axis in dims else None
    if kind == "transpose" or kind == "movedim":
        a, b = (int(d) % rank for d in args[1:3])
        if kind == "transpose":
            return b if axis == a else a if axis == b else axis
        order = [d for d in range(rank) if d != a]
        order.insert(b, a)  # the output's axes, each by the input axis it came from
        return order.index(axis)
    if kind == "unbind":
        dim = int(args[1] if len(args) > 1 else kwargs.get("dim", 0)) % rank
        return None if dim == axis else axis - (dim < axis)
    if not isinstance(out, torch.Tensor):
        return axis  # a tuple of pieces (split, chunk): each holds the images where the input did
    if op.kind == "reshape" or (op.node.op == "call_method" and op.node.target == "unflatten"):
        return _reshaped_axis(axis, before, out.shape)
    if axis == 0:
        return 0
    return axis if out.dim() == rank and out.shape[axis] == before[axis] else None
