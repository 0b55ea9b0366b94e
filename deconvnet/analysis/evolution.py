"""Feature evolution during training (the paper's Fig. 4): for the snapshots of one training run, the
strongest activation over a set of images of a few maps of each layer, projected to pixel space with
each snapshot's own weights; one column per epoch.

The paper uses all training images and epochs 1, 2, 5, 10, 20, 30, 40, 64; here the images are any
folder (e.g. a validation set) and the epochs are whatever snapshots the run saved.

Beside the pictures, the layer-1 filters of every snapshot are measured as ``deconvnet filters``
measures them (``analysis.filters``: RMS, dead filters, structure median and the share of filters at
0.5 or more), so a run shows when its first layer turns from noise into edges and colour blobs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..deconv import DeconvNet
from ..errors import DeconvnetError
from ..notebook import InlineDisplay
from ..weights import LoadedModel, load_model, read_metadata
from .filters import FilterStats, filter_stats

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .atlas import AtlasScan

__all__ = ["Evolution", "snapshot_epoch", "feature_evolution"]


@dataclass
class Evolution(InlineDisplay):
    """``tiles[layer]`` (maps, snapshots, t, t, 3) uint8: the projection of the strongest activation of
    ``maps[layer][i]`` under snapshot j; ``values``/``images`` the activation and its image index."""

    epochs: list[int]
    snapshots: list[str]
    layers: list[str]
    maps: dict[str, list[int]]
    tiles: dict[str, np.ndarray]
    values: dict[str, np.ndarray]  # (maps, snapshots)
    images: dict[str, np.ndarray]  # (maps, snapshots)
    files: list[str]
    first_layer: list[FilterStats] = field(default_factory=list)  # per snapshot, its layer-1 filters

    def first_layer_rows(self) -> list[dict]:
        """Per snapshot: epoch, layer-1 structure median, share of filters >= 0.5, RMS median, dead count."""
        return [
            {
                "epoch": epoch,
                "structure_median": round(stats.structure_median, 4),
                "structured_share": round(stats.structured_share, 4),
                "rms_median": round(float(np.median(stats.rms)), 6),
                "dead": stats.dead_count,
            }
            for epoch, stats in zip(self.epochs, self.first_layer)
        ]

    def to_dict(self) -> dict:
        """The chosen maps, their strongest activation and its image under every snapshot (JSON)."""
        return {
            "epochs": self.epochs,
            "snapshots": self.snapshots,
            "images": len(self.files),
            "maps": self.maps,
            "values": {l: self.values[l].tolist() for l in self.layers},
            "image_files": {l: [[self.files[i] for i in row] for row in self.images[l].tolist()] for l in self.layers},
            "first_layer_filters": self.first_layer_rows(),
        }

    def figure(self, title: str = "") -> Figure:
        """The paper's Fig. 4: one row per chosen map (grouped by layer), one column per epoch."""
        from ..display.figures import evolution_figure

        return evolution_figure(self, title)

    def filter_trend_figure(self) -> Figure:
        """Layer-1 filter structure (median, share >= 0.5) and RMS against the epoch."""
        from ..display.figures import filter_trend_figure

        return filter_trend_figure(self)


def snapshot_epoch(path: str | os.PathLike) -> int:
    """The epoch of a training snapshot: its metadata, else the ``epoch-NNN`` in its name."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            epoch = read_metadata(path).get("epoch")
            if epoch is not None:
                return int(epoch)
        except Exception:
            pass
    m = re.search(r"(\d+)", path.stem)
    if not m:
        raise DeconvnetError(f"{path}: cannot tell its epoch (no 'epoch' metadata, no number in the name)")
    return int(m.group(1))


def feature_evolution(
    snapshots: Sequence[str | os.PathLike],
    files: Sequence[str | os.PathLike],
    layers: Sequence[str] | str | None = None,
    maps: Mapping[str, Sequence[int]] | None = None,
    maps_per_layer: int = 3,
    tile: int = 64,
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = True,
    arch: str | None = None,
    explicit_maps: Sequence[int] | None = None,
) -> Evolution:
    """Scan ``files`` once per snapshot (top-1 per map) and project the strongest activation of the
    chosen maps. Maps default to, per layer, the ``maps_per_layer`` maps whose strongest activation is
    largest under the LAST snapshot (the trained features), so every column shows the same maps;
    ``maps`` (per layer) or ``explicit_maps`` (the same indices for every layer) choose them instead."""
    from .atlas import atlas_layers, project_atlas, scan_atlas

    if not snapshots:
        raise DeconvnetError("give at least one snapshot")
    if maps_per_layer < 1:
        raise DeconvnetError(f"maps_per_layer must be at least 1, got {maps_per_layer}")
    image_files = [str(f) for f in files]
    if not image_files:
        raise DeconvnetError("no images given")
    ordered = sorted(((snapshot_epoch(s), str(s)) for s in snapshots), key=lambda t: t[0])
    epochs = [e for e, _ in ordered]
    paths = [p for _, p in ordered]
    loaded_models: list[LoadedModel] = []
    scans: list[AtlasScan] = []
    first_layer: list[FilterStats] = []
    layer_names: list[str] | None = None
    for path in paths:
        loaded = load_model(path, arch=arch, device=device, progress=progress)
        engine = DeconvNet(loaded.model)
        names = atlas_layers(layers, engine)  # the one grammar, then the atlas's checks
        if layer_names is not None and names != layer_names:
            raise DeconvnetError(f"{path}: its layers differ from the other snapshots'; they must come from one run")
        layer_names = names
        scan = scan_atlas(loaded, image_files, names, k=1, batch_size=batch_size, progress=progress)
        if scans and any(scan.values[l].shape != scans[0].values[l].shape for l in names):
            raise DeconvnetError(
                f"{path}: its layers have other numbers of maps than {paths[0]}'s; the snapshots must come from one run"
            )
        scans.append(scan)
        loaded_models.append(loaded)
        first_layer.append(filter_stats(loaded))
    assert layer_names is not None
    chosen: dict[str, list[int]] = {}
    for layer in layer_names:
        channels = scans[-1].values[layer].shape[0]
        wanted = maps[layer] if maps and layer in maps else (explicit_maps or None)
        if wanted is not None:
            chosen[layer] = [int(m) for m in wanted]
            bad = [m for m in chosen[layer] if not 0 <= m < channels]
            if bad:
                raise DeconvnetError(f"maps: {layer} has {channels} maps (0..{channels - 1}); {bad} out of range")
        else:
            top = scans[-1].values[layer][:, 0]
            chosen[layer] = sorted(int(i) for i in np.argsort(-top, kind="stable")[:maps_per_layer])
    tiles: dict[str, list[np.ndarray]] = {l: [] for l in layer_names}
    values: dict[str, list[np.ndarray]] = {l: [] for l in layer_names}
    images: dict[str, list[np.ndarray]] = {l: [] for l in layer_names}
    for loaded, scan in zip(loaded_models, scans):
        projected = project_atlas(loaded, scan, layer_names, chosen, tile=tile, progress=False)
        for layer in layer_names:
            tiles[layer].append(projected[layer].tiles[:, 0, 0])
            values[layer].append(projected[layer].values[:, 0])
            images[layer].append(projected[layer].images[:, 0])
    return Evolution(
        epochs=epochs,
        snapshots=paths,
        layers=layer_names,
        maps=chosen,
        tiles={l: np.stack(tiles[l], 1) for l in layer_names},
        values={l: np.stack(values[l], 1) for l in layer_names},
        images={l: np.stack(images[l], 1) for l in layer_names},
        files=image_files,
        first_layer=first_layer,
    )
