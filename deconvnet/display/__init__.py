"""The display layer: every picture the project draws (matplotlib figures, PNG panels for the report and
the explorer) is made here, once, from the analyses' results; the CLI, the report, the server and
notebooks all sit on it. ``common`` holds the shared base (new figures, atomic saving,
encoding), ``figures`` the matplotlib figures (each function returns a Figure; save it with
``save_figure``), one module a job (``projection_figures``, ``model_figures``, ``analysis_figures``,
``unit_figures``) re-exported by ``figures``, ``panels`` the arrays and PNG panels of the report and
the web explorer."""

from .common import crop_box, data_uri, figure_png, new_figure, png_bytes, save_figure, to_display

__all__ = ["crop_box", "data_uri", "figure_png", "new_figure", "png_bytes", "save_figure", "to_display"]
