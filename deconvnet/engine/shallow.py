"""The shallow forward pass: the way down often reads nothing of the forward pass above some op, so
the forward pass may stop there.

Under the deconvnet rule a ReLU rectifies the signal coming down without looking at the forward pass,
a convolution, a linear layer and a batch norm in eval mode are fixed linear maps, and an addition
sends the signal down both branches: their steps read only the shapes of their inputs. What the way
down from a unit reads of the forward pass is then the max-pooling switches (a ResNet's stem), the
LRN inputs (with ``include_lrn``) and the recorded inputs of the kinds in ``RECORDS_INPUTS`` (gates,
norms, attention; under ``guided``/``gradient`` also every activation and ReLU mask). The shallow pass
(``shallow_forward``) evaluates the ops below those readers only, and takes the shapes of the ops
above them from a one-image pass made once per input size (``ShapeTemplates``): a shape does not
depend on the pixels, and every op of a shallow-eligible path holds the images on its first axis.

For a unit of a ResNet-50's layer4 under deconvnet this is the stem (conv1, its batch norm and ReLU,
the max pool): about 3 % of the model's multiply-adds, instead of the forward pass to layer4 that the
atlas's projections otherwise redo for every image holding a winner. The activation's value, which
the forward pass would give, is then the caller's (``Selection.value``, e.g. from an atlas scan).
The projections equal those made after a full forward pass (tested on ResNet-18/50, DenseNet-121,
EfficientNet-B0, under the three rules).
"""

from __future__ import annotations

import torch

from .graph import ModelGraph, Op
from .record import ForwardRecord, run_forward
from .rules import get_rule

__all__ = ["SHAPE_ONLY_KINDS", "reads_forward", "record_readers", "ShapeTemplates", "shallow_forward"]

# kinds whose step reads nothing of the forward pass but shapes, under every rule (see the docstring)
SHAPE_ONLY_KINDS = frozenset({"input", "conv", "linear", "bn", "add", "identity", "reshape"})


def reads_forward(op: Op, rule: str, include_lrn: bool) -> bool:
    """Whether ``op``'s step of ``rule``'s way down reads the forward pass beyond shapes."""
    kind = op.kind
    if kind in SHAPE_ONLY_KINDS:
        return False
    if kind in ("relu", "activation"):
        return get_rule(rule).looks_at_forward
    if kind == "lrn":
        return include_lrn
    if kind == "linear_op":
        # its transpose is taken at zeros of the recorded shapes; only arguments computed outside the
        # image's path (constants, some carrying the batch size) would be read from the record
        return any(n.name not in op.inputs for n in op.node.all_input_nodes)
    return True  # switches, recorded inputs, constants, split pieces...


def record_readers(graph: ModelGraph, targets: list[str], rule: str, include_lrn: bool) -> list[str]:
    """The ops (names) whose outputs a shallow pass must compute for ``rule``'s way down from
    ``targets``: each op that reads the forward pass, and the recorded values it reads."""
    holds = get_rule(rule).holds
    readers = [
        op.name for target in targets for op in graph.reached(target, holds) if reads_forward(op, rule, include_lrn)
    ]
    return list(dict.fromkeys([*readers, *sorted(graph.recorded_values(targets, rule))]))


class ShapeTemplates:
    """Every op's output shape (without the batch) below some targets, per input size, from one
    forward pass of one image made on first use; ``None`` for a path where an op holds the images
    elsewhere than on its first axis (the shallow pass is then not used)."""

    def __init__(self, graph: ModelGraph) -> None:
        self.graph = graph
        self._shapes: dict[tuple[tuple[int, ...], tuple[str, ...]], dict[str, tuple[int, ...]] | None] = {}

    def shapes(self, image: torch.Tensor, targets: list[str]) -> dict[str, tuple[int, ...]] | None:
        """The shapes below ``targets`` for inputs shaped like ``image`` (1, C, H, W)."""
        key = (tuple(image.shape[1:]), tuple(sorted(targets)))
        if key not in self._shapes:
            record = run_forward(self.graph, image[:1], targets)
            if any(axis != 0 for axis in record.image_axes.values()):
                self._shapes[key] = None
            else:
                self._shapes[key] = {name: tuple(shape[1:]) for name, shape in record.shapes.items()}
        return self._shapes[key]


def shallow_forward(
    graph: ModelGraph,
    images: torch.Tensor,
    targets: list[str],
    rule: str,
    include_lrn: bool,
    templates: ShapeTemplates,
) -> ForwardRecord | None:
    """A record for ``rule``'s way down from ``targets`` (op names) computed only as far as the way
    down reads it, every other op's shape from ``templates``; ``None`` where that saves nothing or
    the shapes have no template (the caller then makes the full pass). The record's ``values`` hold
    no layer outputs: the selections' values come from the caller."""
    readers = record_readers(graph, targets, rule, include_lrn)
    if any(graph.by_name[name].kind in ("split", "getitem", "constant") for name in readers):
        return None  # pieces of tuples and constants: take the full pass (rare on shallow paths)
    last = max((graph.order[name] for name in readers), default=-1)
    if last >= max(graph.order[t] for t in targets):
        return None  # the way down reads the forward pass up to the layer itself: nothing to save
    shapes = templates.shapes(images, targets)
    if shapes is None:
        return None
    looks = get_rule(rule).looks_at_forward
    if readers:
        record = run_forward(
            graph,
            images,
            readers,
            keep_masks=looks,
            keep_lrn_inputs=include_lrn,
            keep=graph.recorded_values(targets, rule),
        )
        record.values.clear()  # the readers' outputs, not layers anyone asked for
    else:  # nothing read at all (a unit of the first convolution): no forward pass
        record = ForwardRecord(images.shape)
    n = int(images.shape[0])
    for name, shape in shapes.items():
        record.shapes.setdefault(name, torch.Size((n, *shape)))
    return record
