"""CLI sub-commands. Each module adds the parsers of a few related commands (``add_<command>(subparsers)``,
setting ``func``: a handler taking the parsed namespace and returning an exit status); ``COMMANDS``
lists them in the order ``deconvnet --help`` shows them, which is the order a newcomer meets them:

1. look at a model: ``models``, ``layers``, ``classify``;
2. project: ``project``;
3. the main job: ``report``, ``demo`` (the same report on the bundled photos), ``serve`` (the explorer);
4. the paper's views and analyses, in the paper's order: ``atlas`` (Fig. 2) and beside it ``visualize`` (images
   optimised to excite a unit), ``filters`` (Fig. 6),
   ``evolution`` (Fig. 4), ``occlusion`` (Fig. 7), ``invariance`` (Fig. 5), ``correspondence``
   (Table 1), ``probe`` (Table 7); then ``sanity``, how far to trust the projections;
5. train and measure: ``train``, ``eval``;
6. tools: ``convert``.

A new command: a function ``add_<command>`` in the module of its group (or a new module), and its
place in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from . import analyses, core, evaluate, interfaces, models, tools, train, views

COMMANDS: tuple[tuple[str, Callable[[argparse._SubParsersAction], None]], ...] = (
    ("models", models.add_models),
    ("layers", core.add_layers_command),
    ("classify", core.add_classify),
    ("project", core.add_project),
    ("report", interfaces.add_report),
    ("demo", interfaces.add_demo),
    ("serve", interfaces.add_serve),
    ("atlas", views.add_atlas),
    ("visualize", views.add_visualize),
    ("filters", views.add_filters),
    ("evolution", views.add_evolution),
    ("occlusion", analyses.add_occlusion),
    ("invariance", analyses.add_invariance),
    ("correspondence", analyses.add_correspondence),
    ("probe", analyses.add_probe),
    ("sanity", analyses.add_sanity),
    ("train", train.add_train),
    ("eval", evaluate.add_eval),
    ("convert", tools.add_convert),
)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Every sub-command, in the order of ``COMMANDS``."""
    for _, add in COMMANDS:
        add(sub)
