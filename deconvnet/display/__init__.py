"""The display layer: every picture the project draws (matplotlib figures, PNG panels for the report and
the explorer) is made here, once, from the analyses' results; the CLI, the report, the server and
notebooks all sit on it. ``common`` holds the shared base (backend, atomic saving, encoding)."""

from .common import crop_box, data_uri, png_bytes, save_figure, to_display

__all__ = ["crop_box", "data_uri", "png_bytes", "save_figure", "to_display"]
