"""Which layers and maps an atlas covers: layers in the one grammar of ``analysis.layers`` (``"conv1..conv5"``,
``"conv1,conv3,pool5"``, ``"all"``) resolved by ``atlas_layers``; maps as ``"0-15,20,31"`` (``parse_maps``);
and the one engine a run uses for them."""

from __future__ import annotations

from collections.abc import Sequence

from ...engine import DeconvNet
from ...errors import DeconvnetError
from ...weights import LoadedModel
from ..layers import main_layers, parse_layers

__all__ = ["atlas_engine", "atlas_layers", "default_layers", "parse_maps"]


def atlas_engine(loaded: LoadedModel, include_lrn: bool = False, engine: DeconvNet | None = None) -> DeconvNet:
    """The engine of an atlas run: ``engine`` when given (it must be attached to ``loaded.model``
    with the same ``include_lrn``), else a new one."""
    if engine is None:
        return DeconvNet(loaded.model, include_lrn=include_lrn)
    if engine.model is not loaded.model:
        raise DeconvnetError("engine= is attached to another model than loaded=")
    if engine.include_lrn != include_lrn:
        raise DeconvnetError(
            f"engine= was built with include_lrn={engine.include_lrn}, the atlas asks for include_lrn={include_lrn}"
        )
    return engine


def default_layers(engine: DeconvNet) -> list[str]:
    """The layers an atlas covers unless told otherwise: every ``convI`` of a chain model; a graph's
    top-level layers with maps (e.g. a ResNet's relu, maxpool, layer1..layer4): ``main_layers``."""
    return main_layers(engine)


def atlas_layers(spec: str | Sequence[str] | None, engine: DeconvNet) -> list[str]:
    """The layers of an atlas: ``spec`` (names, or text in the one layers grammar,
    ``deconvnet.analysis.layers.parse_layers``: ``"conv1..conv5"``, ``"conv1,conv3,pool5"``, paper numbers
    on chain models, ``"all"``/``None`` for ``default_layers``) resolved on ``engine``, in forward order,
    each checked to be a layer the atlas can use (one with maps). Was ``atlas.parse_layers`` (renamed:
    one function of the package is called ``parse_layers``)."""
    return _checked_in_order(parse_layers(spec, engine, default=default_layers(engine)), engine)


def _checked_in_order(parts: list[str], engine: DeconvNet) -> list[str]:
    """``parts`` without repeats, in forward order; each must be a layer with maps."""
    if engine.is_chain:
        names = engine.layer_names
        order = {n: i for i, n in enumerate(names)}
        for p in parts:
            if p not in order:
                raise DeconvnetError(f"layer {p!r} cannot be used in the atlas; choose from {', '.join(names)}")
        return sorted(set(parts), key=order.__getitem__)
    for p in parts:
        shape = engine.output_shape(p, engine.probe_size)
        if len(shape) != 3:
            raise DeconvnetError(f"layer {p!r} has no maps (output {shape}); the atlas needs a layer with maps")
    return sorted(set(parts), key=lambda n: engine.layer(n).index)


def parse_maps(spec: str | None, channels: int, layer: str = "") -> list[int]:
    """``"0-15,20,31"`` -> sorted map indices (``None``: all maps)."""
    if spec is None or spec == "all":
        return list(range(channels))
    out: set[int] = set()
    for piece in spec.split(","):
        piece = piece.strip()
        if not piece:
            continue
        try:
            if "-" in piece:
                lo, hi = (int(v) for v in piece.split("-", 1))
                out.update(range(lo, hi + 1))
            else:
                out.add(int(piece))
        except ValueError:
            raise DeconvnetError(f"maps: expected indices like 0-15,20, got {spec!r}") from None
    bad = sorted(m for m in out if not 0 <= m < channels)
    if bad:
        raise DeconvnetError(
            f"maps: {layer or 'layer'} has {channels} maps (0..{channels - 1}); {bad[:5]} out of range"
        )
    return sorted(out)
