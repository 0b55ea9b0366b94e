"""The one exception type for mistakes a user can fix (bad path, unknown layer, wrong weights...).

The CLI prints its message on one line and exits with status 2; anything else is a bug and keeps
its traceback. ``optional_extra`` turns the import of a missing optional package into such an error,
naming the extra of ``pyproject.toml`` that installs it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["EXTRAS", "DeconvnetError", "optional_extra"]

# The optional extras of pyproject.toml: import name -> the distribution that provides it.
EXTRAS: dict[str, dict[str, str]] = {
    "server": {
        "fastapi": "fastapi",
        "uvicorn": "uvicorn",
        "python_multipart": "python-multipart",
        "multipart": "python-multipart",
    },
    "analyses": {"sklearn": "scikit-learn", "skimage": "scikit-image"},
    "timm": {"timm": "timm"},
    "quantus": {"quantus": "quantus"},
    # Jupyter itself and the widgets tqdm.auto draws progress bars with (without them: a warning and text bars)
    "notebook": {"jupyterlab": "jupyterlab", "ipywidgets": "ipywidgets"},
}


class DeconvnetError(Exception):
    """A user-facing error: the message says what was wrong and how to fix it."""


@contextmanager
def optional_extra(extra: str, needs: str) -> Iterator[None]:
    """Imports inside the block that fail because a package of ``deconvnet[extra]`` is absent raise one
    ``DeconvnetError``: ``{needs} the optional {package} package: pip install "deconvnet[{extra}]"``
    (``needs`` is e.g. "the explorer needs"). Any other ImportError, such as a dependency missing inside
    an installed package, is a broken install rather than a missing extra and propagates unchanged."""
    try:
        yield
    except ImportError as e:
        package = EXTRAS[extra].get((e.name or "").partition(".")[0])
        if package is None:
            raise
        raise DeconvnetError(f'{needs} the optional {package} package: pip install "deconvnet[{extra}]"') from None
