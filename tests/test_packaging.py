"""What an install carries and asks for: the model card inside the package (the docs site shows a copy
of it), the version from one place, and the one-line errors naming the extra a missing optional
package belongs to (a real interpreter in which that package cannot be imported)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import deconvnet
from deconvnet.errors import EXTRAS, DeconvnetError, optional_extra
from deconvnet.report import MODEL_CARD

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


DOCS_CARD = ROOT / "docs" / "model-card.md"


def test_model_card_is_packaged_and_the_docs_copy_is_identical() -> None:
    # The package holds the card the report shows; docs/model-card.md (and the pictures it shows, under
    # docs/images/) is the docs site's copy: the same bytes, so the site and the report never differ.
    assert MODEL_CARD.is_relative_to(Path(deconvnet.__file__).resolve().parent)
    fix = f"copy {MODEL_CARD.parent.relative_to(ROOT)}/ to docs/ (model-card.md, images/)"
    assert DOCS_CARD.read_bytes() == MODEL_CARD.read_bytes(), fix
    pictures = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", MODEL_CARD.read_text(encoding="utf-8"))
    assert len(pictures) == 4
    for picture in pictures:
        packaged = MODEL_CARD.parent / picture
        assert packaged.is_file() and packaged.suffix == ".png", picture
        assert (DOCS_CARD.parent / picture).read_bytes() == packaged.read_bytes(), fix
    # nothing in the package's card folder that the card does not show
    shipped = {p.relative_to(MODEL_CARD.parent).as_posix() for p in MODEL_CARD.parent.rglob("*") if p.is_file()}
    assert shipped == {"model-card.md", *pictures}


def test_version_has_one_source() -> None:
    project = _pyproject()
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "deconvnet.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", deconvnet.__version__)


def test_extras_in_pyproject_match_the_errors() -> None:
    # every package an error can name is installed by the extra it names; `all` and `test` take every extra
    extras = _pyproject()["project"]["optional-dependencies"]
    for extra, packages in EXTRAS.items():
        declared = {re.split(r"[<>=~\[ ]", requirement)[0] for requirement in extras[extra]}
        assert set(packages.values()) == declared, extra
    assert extras["all"] == [f"deconvnet[{','.join(EXTRAS)}]"]
    assert "deconvnet[all]" in extras["test"]


def test_optional_extra_names_only_its_own_packages() -> None:
    said = r'^probes need the optional scikit-learn package: pip install "deconvnet\[analyses\]"$'
    with pytest.raises(DeconvnetError, match=said), optional_extra("analyses", "probes need"):
        raise ModuleNotFoundError("No module named 'sklearn.svm'", name="sklearn.svm")
    # another package missing (a broken install, not a missing extra) keeps its own error
    with pytest.raises(ModuleNotFoundError, match="scipy"), optional_extra("analyses", "probes need"):
        raise ModuleNotFoundError("No module named 'scipy'", name="scipy")


def _cli_without(packages: list[str], args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`deconvnet ARGS` in a real interpreter in which ``packages`` cannot be imported, as where their
    extra is not installed (``None`` in ``sys.modules`` makes ``import`` fail with that name)."""
    code = (
        f"import sys; sys.modules.update(dict.fromkeys({packages!r}))\n"
        f"from deconvnet.cli import main; sys.exit(main({args!r}))"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


def test_probe_without_scikit_learn_names_the_extra(tmp_path: Path) -> None:
    result = _cli_without(["sklearn"], ["probe", "--data", str(tmp_path), "--out", str(tmp_path / "out")], tmp_path)
    assert result.returncode == 2, result.stderr
    # the model is loaded (its one "weights: ..." line) before the probes ask for scikit-learn
    assert "Traceback" not in result.stderr and result.stderr.count("deconvnet: error:") == 1
    assert result.stderr.splitlines()[-1] == (
        'deconvnet: error: linear probes need the optional scikit-learn package: pip install "deconvnet[analyses]"'
    )


@pytest.mark.parametrize("missing", ["fastapi", "uvicorn", "python_multipart"])
def test_serve_without_the_server_extra_names_it(tmp_path: Path, missing: str) -> None:
    result = _cli_without([missing], ["serve", "--port", "0"], tmp_path)
    assert result.returncode == 2, result.stderr
    package = EXTRAS["server"][missing]
    assert result.stderr == (
        f"deconvnet: error: the explorer (deconvnet serve) needs the optional {package} package: "
        'pip install "deconvnet[server]"\n'
    )
