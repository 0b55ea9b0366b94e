"""What an atlas output folder holds (``manifest.json``): the model (``model_hash``),
the images (``ImageSource.fingerprint``), layers, k, distinctness, LRN and the projection rule.

The scan's fingerprint (``scan_fingerprint``) already refuses to resume or extend a
scan made from anything else, but it is one hash of everything and is only checked where a scan
file exists. The manifest is written when a run starts, so that a second run into the same folder
with another model or other images is refused at once, whatever state the first one left, with a
message naming what differs. Runs that add layers to a folder are welcome: the manifest lists the
union of its layers. ``restart=True`` (CLI ``--restart``) starts the folder over and rewrites it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...atomic import save_text
from ...errors import DeconvnetError

__all__ = ["MANIFEST", "check_manifest", "known_shards"]

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1

# the entries a second run must share with the folder's first, and how a difference is told
_MUST_MATCH = {
    "model": "another model (weights or preprocessing)",
    "source": "other images",
    "k": "another k (--top)",
    "distinct": "another --allow-repeats choice",
    "include_lrn": "another --include-lrn choice",
    "rule": "another projection rule",
}


def check_manifest(out_dir: str | Path, entries: dict[str, Any], restart: bool = False, write: bool = True) -> None:
    """Refuse (``DeconvnetError``) when ``out_dir`` holds an atlas whose manifest differs from
    ``entries`` (keys: model, source, images, layers, k, distinct, include_lrn, rule; optional:
    shards, see ``known_shards``) in anything but its layers; else write the manifest
    (``write``: process 0 only), layers merged."""
    path = Path(out_dir) / MANIFEST
    layers = list(entries["layers"])
    if path.exists() and not restart:
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(old, dict):
                raise ValueError("not an object")
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise DeconvnetError(
                f"{path}: damaged atlas manifest ({e}); delete it or pass restart=True (CLI: --restart)"
            ) from None
        for key, what in _MUST_MATCH.items():
            if key in old and old[key] != entries[key]:
                raise DeconvnetError(
                    f"{Path(out_dir)} holds an atlas made with {what} ({key} {_short(old[key])}, this run "
                    f"{_short(entries[key])}); an atlas folder holds one model and one set of images: "
                    "use another --out, or --restart to start it over"
                )
        layers = list(old.get("layers", [])) + [l for l in layers if l not in old.get("layers", [])]
    if write:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        body = {"version": MANIFEST_VERSION, **entries, "layers": layers}
        save_text(path, json.dumps(body, indent=1) + "\n")


def known_shards(out_dir: str | Path) -> dict[str, Any]:
    """The tar shards' ``[size, mtime_ns, images]`` the folder's manifest recorded (``{}`` if none):
    a rerun (resume, other layers, other sheets) need not count a million images again."""
    try:
        shards = json.loads((Path(out_dir) / MANIFEST).read_text(encoding="utf-8")).get("shards", {})
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return {}
    return shards if isinstance(shards, dict) else {}


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] if len(text) >= 40 and all(c in "0123456789abcdef" for c in text) else text
