"""Sample photos for demos, tutorials and tests, shipped inside the package (``deconvnet/assets/samples``;
sources and licences in its ``LICENSES.md``: all CC0 or public domain, copied from scikit-image's data).

| name      | file          | content                      | licence                          |
|-----------|---------------|------------------------------|----------------------------------|
| chelsea   | chelsea.png   | a cat                        | CC0, photographer Stefan van der Walt |
| coffee    | coffee.png    | a cup of coffee              | CC0, photographer Rachel Michetti     |
| astronaut | astronaut.png | astronaut Eileen Collins     | public domain (NASA)                  |
| rocket    | rocket.jpg    | a rocket on the launch pad   | public domain (SpaceX)                |
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

# what each photo shows, in words (the demo's report says it)
SAMPLE_CONTENT = {
    "chelsea": "a cat",
    "coffee": "a cup of coffee",
    "astronaut": "an astronaut",
    "rocket": "a rocket",
}


def sample_dir() -> Path:
    """The folder holding the sample photos (inside the installed package)."""
    return Path(__file__).resolve().parent / "assets" / "samples"


def sample_paths(names: list[str] | None = None) -> list[Path]:
    """Paths of the bundled sample photos (all, or the named ones)."""
    names = names or list(SAMPLES)
    unknown = [n for n in names if n not in SAMPLES]
    if unknown:
        raise DeconvnetError(f"unknown sample(s) {unknown}; choose from {sorted(SAMPLES)}")
    return [sample_dir() / SAMPLES[n] for n in names]
