"""``SanityReport``, the result of ``sanity_checks``, and the NaN-aware summaries it and ``UnitScores``
share."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ...notebook import InlineDisplay
from .faithfulness import curve_area
from .maps import Box, Unit

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def nan_summary(values: np.ndarray, axis: int = -1) -> dict[str, Any]:
    valid = np.isfinite(values).sum(axis)
    with np.errstate(invalid="ignore"), quiet_nan():
        mean = np.nanmean(values, axis)
        std = np.nanstd(values, axis)
    return {"mean": mean, "std": std, "valid": valid}


@contextlib.contextmanager
def quiet_nan() -> Iterator[None]:
    """The mean of an all-NaN slice is NaN, said once in the result (``valid``), not warned per call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def rounded(x: Any) -> Any:
    arr = np.asarray(x, dtype=np.float64)
    return np.where(np.isfinite(arr), np.round(arr, 5), np.nan).tolist()


def nan_to_none(x: Any) -> Any:
    if isinstance(x, list):
        return [nan_to_none(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


@dataclass
class SanityReport(InlineDisplay):
    """The sanity checks of ``rules`` on ``layers`` over N images (see the module docstring).

    Arrays, indexed [rule, layer, ..., image]:

    * ``cascading[measure]`` (R, L, B + 1, N): step 0 is the trained model (1 by definition), step
      ``s`` has the top ``s`` of ``blocks`` randomised (``blocks`` top first);
    * ``independent[measure]`` (R, L, B, N): ``blocks[k]`` alone randomised;
    * ``other_units[measure]`` (R, L, N) and ``other_images[measure]`` (R, L, N): unit selectivity;
    * ``deletion``, ``insertion`` (R + 1, L, N, T): curves over ``fractions``; row R is the mean of
      the random orders.

    ``affects[l, k]`` says whether ``blocks[k]`` lies at or below ``layers[l]`` (randomising a block
    above a layer cannot change its maps: the similarity there is exactly 1). ``example`` holds, for
    the figure, the first image's maps of the highest layer: (R, B + 1, H, W), with its ``picture``
    and ``example_box``."""

    rules: list[str]
    layers: list[str]
    images: list[str]
    measures: list[str]
    blocks: list[str]
    affects: np.ndarray
    cascading: dict[str, np.ndarray]
    independent: dict[str, np.ndarray]
    other_units: dict[str, np.ndarray]
    other_images: dict[str, np.ndarray]
    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray
    activations: np.ndarray  # (L, N) the selected units' activations on the intact images
    units: list[list[Unit]]  # [layer][image] the selected unit
    example: np.ndarray = field(repr=False)
    example_box: Box = (0, 0, 0, 0)
    picture: np.ndarray | None = field(default=None, repr=False)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def curve_rows(self) -> list[str]:
        """The rows of ``deletion``/``insertion``: the rules, then ``"random"``."""
        return [*self.rules, "random"]

    def fully_randomised(self, measure: str = "spearman") -> np.ndarray:
        """(R, L, N): each layer's similarity once every block at or below it is randomised."""
        # blocks are listed top first, so the last step has every block at or below every layer randomised
        return self.cascading[measure][:, :, -1]

    def auc(self, curve: str = "deletion") -> np.ndarray:
        """(R + 1, L, N) area under the deletion or insertion curves."""
        return curve_area(self.deletion if curve == "deletion" else self.insertion, self.fractions)

    def table(self) -> list[dict[str, Any]]:
        """One row per rule and layer: means (and standard deviations over images) of each measure."""
        rows = []
        faith = bool(self.deletion.size)
        deletion = self.auc("deletion") if faith else self.deletion
        insertion = self.auc("insertion") if faith else self.insertion
        for ri, rule in enumerate(self.rules):
            for li, layer in enumerate(self.layers):
                row: dict[str, Any] = {"rule": rule, "layer": layer}
                for m in self.measures:
                    s = nan_summary(self.fully_randomised(m)[ri, li])
                    row[f"random_{m}"] = float(s["mean"])
                    row[f"random_{m}_std"] = float(s["std"])
                for m in self.measures[: 1 if self.settings.get("selectivity", True) else 0]:
                    row["other_units"] = float(nan_summary(self.other_units[m][ri, li])["mean"])
                    row["other_images"] = float(nan_summary(self.other_images[m][ri, li])["mean"])
                    row["selectivity"] = row["other_images"] - row["other_units"]
                if faith:
                    row["deletion_auc"] = float(nan_summary(deletion[ri, li])["mean"])
                    row["deletion_auc_random"] = float(nan_summary(deletion[-1, li])["mean"])
                if faith and self.settings.get("insertion", True):
                    row["insertion_auc"] = float(nan_summary(insertion[ri, li])["mean"])
                    row["insertion_auc_random"] = float(nan_summary(insertion[-1, li])["mean"])
                rows.append(row)
        return rows

    def table_text(self) -> str:
        """The table as Markdown: similarity to the trained model's map once every block at or below
        the layer is random (mean +- std over images), selectivity (Spearman), deletion/insertion AUC
        (the rule's, then a random order's)."""
        selective = self.settings.get("selectivity", True)
        inserted = self.settings.get("insertion", True)
        head = ["rule", "layer", *(f"{m} (random)" for m in self.measures)]
        head += ["other units", "other images"] if selective else []
        faith = bool(self.deletion.size)
        if faith:
            head += ["deletion AUC (random)"] + (["insertion AUC (random)"] if inserted else [])
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.table():
            cells = [row["rule"], row["layer"]]
            cells += [f"{row[f'random_{m}']:.2f} ± {row[f'random_{m}_std']:.2f}" for m in self.measures]
            if selective:
                cells += [f"{row['other_units']:.2f}", f"{row['other_images']:.2f}"]
            if faith:
                cells.append(f"{row['deletion_auc']:.2f} ({row['deletion_auc_random']:.2f})")
            if faith and inserted:
                cells.append(f"{row['insertion_auc']:.2f} ({row['insertion_auc_random']:.2f})")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Every number: per-image values, means, spreads and counts (NaN written as null)."""

        def summary(values: np.ndarray) -> dict[str, Any]:
            s = nan_summary(values)
            return {
                "per_image": nan_to_none(rounded(values)),
                "mean": nan_to_none(rounded(s["mean"])),
                "std": nan_to_none(rounded(s["std"])),
                "valid": np.asarray(s["valid"]).tolist(),
            }

        d: dict[str, Any] = {
            "rules": self.rules,
            "layers": self.layers,
            "images": self.images,
            "measures": self.measures,
            "blocks_top_first": self.blocks,
            "block_below_layer": self.affects.tolist(),
            "settings": self.settings,
            "definitions": {
                "map": "sum over colour channels of |projection seeded with 1|, inside the unit's receptive field",
                "cascading": "index [rule][layer][step][image]; step s: the top s blocks re-initialised",
                "independent": "index [rule][layer][block][image]; only that block re-initialised",
                "other_units": "mean similarity of different channels' maps at the same position, same image",
                "other_images": "mean similarity of the same unit's maps on different images",
                "deletion/insertion": "index [rule or random][layer][image][step]: activation / intact activation",
            },
            "units": [
                [{"image": u.image, "channel": u.channel, "position": [u.y, u.x], "box": list(u.box)} for u in row]
                for row in self.units
            ],
            "activations": rounded(self.activations),
            "cascading": {m: summary(v) for m, v in self.cascading.items()},
            "independent": {m: summary(v) for m, v in self.independent.items()},
            "other_units": {m: summary(v) for m, v in self.other_units.items()},
            "other_images": {m: summary(v) for m, v in self.other_images.items()},
            "table": [
                {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()}
                for r in self.table()
            ],
        }
        if self.deletion.size:
            d["faithfulness"] = {
                "rows": self.curve_rows,
                "fractions": rounded(self.fractions),
                "deletion": nan_to_none(rounded(self.deletion)),
                "insertion": nan_to_none(rounded(self.insertion)),
                "deletion_auc": summary(self.auc("deletion")),
                "insertion_auc": summary(self.auc("insertion")),
            }
        return d

    def figure(self, title: str | None = None) -> Figure:
        """Adebayo et al.'s Fig. 2 for the first image and the highest layer (rows: rules; columns: the
        trained model, then randomised down to each block), the mean Spearman similarity along the
        cascade per layer, and the mean deletion and insertion curves."""
        from ...display.figures import sanity_figure

        return sanity_figure(self, title)
