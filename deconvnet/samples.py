"""Sample photos for demos and tests, taken from scikit-image's data folder (installed with it).

| name      | file          | content                      | licence (from scikit-image's docs)                   |
|-----------|---------------|------------------------------|------------------------------------------------------|
| chelsea   | chelsea.png   | a cat                        | CC0, photographer Stefan van der Walt                |
| coffee    | coffee.png    | a cup of coffee              | CC0, photographer Rachel Michetti                    |
| astronaut | astronaut.png | astronaut Eileen Collins     | public domain (NASA)                                 |
| rocket    | rocket.jpg    | a rocket on the launch pad   | public domain (SpaceX)                               |
"""

from __future__ import annotations

from pathlib import Path

from .errors import DeconvnetError

SAMPLES = {
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "astronaut": "astronaut.png",
    "rocket": "rocket.jpg",
}


def sample_dir() -> Path:
    try:
        import skimage
    except ImportError:  # pragma: no cover - a declared dependency
        raise DeconvnetError(
            "scikit-image is not installed; `pip install scikit-image` for the sample photos"
        ) from None
    return Path(skimage.__file__).parent / "data"


def sample_paths(names: list[str] | None = None) -> list[Path]:
    """Paths of the bundled sample photos (all, or the named ones)."""
    names = names or list(SAMPLES)
    unknown = [n for n in names if n not in SAMPLES]
    if unknown:
        raise DeconvnetError(f"unknown sample(s) {unknown}; choose from {sorted(SAMPLES)}")
    return [sample_dir() / SAMPLES[n] for n in names]
