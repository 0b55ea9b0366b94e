"""The wheel, installed anywhere, gives what a checkout gives.

The wheel is built offline from a copy of the sources (``pip wheel --no-deps --no-build-isolation``, so
the checkout gets no ``build/`` or ``.egg-info``) and installed into a fresh virtual environment outside
the checkout; ``deconvnet --version``, ``deconvnet demo`` and ``deconvnet classify`` run there from a
folder outside the checkout, with no ``PYTHONPATH``.

Installing torch into a fresh environment would download ~5.5 GB, so the fresh environment borrows
the third-party packages of the interpreter running the tests: a ``.pth`` file in its site-packages
lists that interpreter's site-packages folder as a plain path line. A path line only extends
``sys.path``; the ``.pth`` files inside the borrowed folder are not processed, so the editable install
of the checkout (its finder is started by its own ``.pth``) does not come along, and the environment's
own site-packages, where the wheel is installed with ``--no-deps``, comes first. A second ``.pth``
hides the optional extras' packages (``None`` in ``sys.modules``: ``import sklearn`` fails as where
it is not installed), so the environment is what a plain ``pip install deconvnet`` gives: the core
install, which must run the demo and say which extra ``deconvnet serve`` needs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

import deconvnet
from deconvnet.cli import main
from deconvnet.display import data_uri
from deconvnet.errors import EXTRAS

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.wheel  # ~1-2 minutes; part of `make test` (deselect locally with -m "not wheel")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of what the build reads (pyproject.toml, README.md, LICENSE, deconvnet/)."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "deconvnet", source / "deconvnet", ignore=shutil.ignore_patterns("__pycache__"))
    dist = base / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
        + ["-w", str(dist), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = dist.glob("deconvnet-*.whl")
    assert built.name == f"deconvnet-{deconvnet.__version__}-py3-none-any.whl"
    return built


def test_wheel_holds_the_package_data(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())

    def files(folder: str) -> set[str]:
        return {f"{folder}/{p.name}" for p in (ROOT / folder).iterdir() if p.is_file()}

    expected = {
        "deconvnet/py.typed",
        "deconvnet/assets/zfnet-imagenette.safetensors",
        "deconvnet/assets/model-card/model-card.md",
        *files("deconvnet/assets/model-card/images"),
        *files("deconvnet/assets/samples"),
        *files("deconvnet/server/static"),
        *files("deconvnet/display/templates/report"),
        *files("deconvnet/display/templates/atlas"),
    }
    assert "deconvnet/assets/samples/LICENSES.md" in expected and len(expected) >= 3 + 4 + 5 + 4
    assert expected <= names, sorted(expected - names)
    assert f"deconvnet-{deconvnet.__version__}.dist-info/licenses/LICENSE" in names  # the MIT licence text
    # every module of the package, and nothing from outside it (tests, docs) but its metadata
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "deconvnet").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    assert all(n.startswith(("deconvnet/", f"deconvnet-{deconvnet.__version__}.dist-info/")) for n in names)


@pytest.fixture(scope="module")
def core_env(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment outside the checkout with the wheel installed (see the docstring)."""
    env = tmp_path_factory.mktemp("venv") / "env"
    venv.create(env, with_pip=False)  # pip too is borrowed (it installs into the running interpreter's prefix)
    python = env / "bin" / "python"
    site_packages = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    borrowed = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site_packages / "deconvnet-test-borrowed.pth").write_text("\n".join(borrowed) + "\n")
    hidden = sorted({name for packages in EXTRAS.values() for name in packages})
    (site_packages / "deconvnet-test-core-only.pth").write_text(
        f"import sys; sys.modules.update(dict.fromkeys({hidden!r}))\n"
    )
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)])
    return env


def _clean_env() -> dict[str, str]:
    """The environment of a user's shell: no PYTHONPATH pointing into the checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def _run(args: list[str], cwd: Path | None = None) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=cwd, env=_clean_env())
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_installed_wheel_gives_the_report_and_classes_of_the_checkout(
    core_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    work = tmp_path / "work"  # the current folder of every command: outside the checkout
    work.mkdir()
    command, python = core_env / "bin" / "deconvnet", core_env / "bin" / "python"
    assert _run([str(command), "--version"], cwd=work) == f"deconvnet {deconvnet.__version__}\n"

    # the package imported there is the installed one, and the optional extras are absent
    where = Path(_run([str(python), "-c", "import deconvnet; print(deconvnet.__file__)"], cwd=work).strip())
    assert where.is_relative_to(core_env) and not where.is_relative_to(ROOT)
    serve = subprocess.run(
        [str(command), "serve", "--port", "0"], capture_output=True, text=True, timeout=300, cwd=work, env=_clean_env()
    )
    assert serve.returncode == 2 and serve.stderr.endswith('pip install "deconvnet[server]"\n'), serve.stderr
    assert serve.stderr.count("\n") == 1

    # the demo (the slow panels left out: occlusion, invariance, rules; the model's section, card
    # included, is the same with or without them) and classify, side by side on the 2 cores
    installed_samples = where.parent / "assets" / "samples"
    shutil.copy2(installed_samples / "chelsea.png", work / "chelsea.png")
    demo = subprocess.Popen(
        [str(command), "demo", "--out", str(tmp_path / "demo"), "--top-maps", "2", "--layers", "conv1,conv5"]
        + ["--no-occlusion", "--no-invariance", "--no-rules", "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=work,
        env=_clean_env(),
    )
    try:
        classified = _run([str(command), "classify", "chelsea.png", "--device", "cpu"], cwd=work)
        demo_out, demo_err = demo.communicate(timeout=300)
    finally:
        demo.kill()
    assert demo.returncode == 0, demo_err[-2000:]

    # classify: the same lines as the checkout's (same weights file bytes, same code, same CPU)
    monkeypatch.chdir(work)
    assert main(["classify", "chelsea.png", "--device", "cpu"]) == 0
    assert classified == capsys.readouterr().out
    assert "chelsea.png" in classified and "%" in classified

    # the report: the sample photos, and the model card with its pictures inlined, read from the install
    html = (tmp_path / "demo" / "report.html").read_text(encoding="utf-8")
    assert str((tmp_path / "demo" / "report.html").resolve()) in demo_out
    for sample in installed_samples.iterdir():
        if sample.suffix != ".md":
            assert sample.name in html
    card = where.parent / "assets" / "model-card"
    assert "<summary>Model card</summary>" in html
    assert "Model card: <code>zfnet-imagenette</code> (the bundled default model)" in html
    assert "Intended use and limits" in html
    pictures = sorted((card / "images").iterdir())
    assert len(pictures) == 4
    for picture in pictures:
        assert data_uri(picture.read_bytes(), "image/png") in html, picture.name
    assert f"deconvnet {deconvnet.__version__}" in html
