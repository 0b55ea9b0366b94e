"""A newcomer's first commands (issue 26): `project` with no unit option, and a start-up that does not
import what the command does not use."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from deconvnet.cli import main
from deconvnet.commands.core import DEFAULT_TOP_MAPS
from deconvnet.data import Preprocessing
from deconvnet.models import build_model
from deconvnet.samples import sample_paths
from deconvnet.weights import save_weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("zfnet", num_classes=4, fc=(32, 32), lrn=False, input_size=96).eval()
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    return str(save_weights(model, path, ["cat", "cup", "rocket", "person"], Preprocessing(resize=110, crop=96)))


def test_project_without_a_unit_option_projects_the_strongest_maps_and_says_which(weights, tmp_path, capsys):
    photo = str(sample_paths(["chelsea"])[0])
    raw = tmp_path / "raw.npy"
    args = ["project", photo, "--layer", "conv4", "--weights", weights, "--out", str(tmp_path), "--raw", str(raw)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"projecting the {DEFAULT_TOP_MAPS} strongest maps of conv4" in out
    listed = [int(c) for c in out.split("(by maximum activation): ")[1].split(";")[0].split(", ")]
    # the maps it names are the strongest by maximum activation, strongest first
    from deconvnet.inference import strongest_maps
    from deconvnet.weights import load_model

    expected = strongest_maps(load_model(weights), photo, "conv4", k=DEFAULT_TOP_MAPS).channels
    assert listed == expected
    assert np.load(raw).shape == (DEFAULT_TOP_MAPS, 3, 96, 96)
    assert (tmp_path / f"chelsea-conv4-top{DEFAULT_TOP_MAPS}.png").stat().st_size > 5000


@pytest.mark.parametrize("command", [["layers"], ["classify", "IMAGE"], ["project", "IMAGE", "--layer", "conv5"]])
def test_commands_on_our_models_do_not_import_torchvision_or_dynamo(command, tmp_path):
    """Importing torchvision (and torch._dynamo, which it and meta-device kernels pull in) costs about
    1.4 s of start-up; commands on our own models must not need either (docs/benchmarks.md)."""
    photo = str(sample_paths(["chelsea"])[0])
    argv = [photo if a == "IMAGE" else a for a in command] + (["--out", str(tmp_path)] if "project" in command else [])
    script = (
        "import sys; from deconvnet.cli import main; code = main(sys.argv[1:]); "
        "heavy = sorted(m for m in sys.modules if m == 'torchvision' or m.startswith('torch._dynamo')); "
        "print('HEAVY', heavy); sys.exit(code)"
    )
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout, done.stdout[-500:]


def test_prediction_note_says_unsure_or_lists_the_classes():
    from deconvnet.explorer import UNSURE_BELOW, prediction_note

    few = ["tench", "church", "parachute"]
    unsure = prediction_note([("church", UNSURE_BELOW - 0.01), ("tench", 0.3)], few)
    assert (
        unsure is not None and unsure.unsure and "unsure" in unsure.text and "tench, church, parachute" in unsure.text
    )
    sure = prediction_note([("church", 0.9)], few)
    assert sure is not None and not sure.unsure and "knows only 3 classes: tench, church, parachute" in sure.text
    many = [f"class {i}" for i in range(1000)]
    assert prediction_note([("class 3", 0.9)], many) is None  # a sure answer of a 1000-class model: nothing to say
    unsure_many = prediction_note([("class 3", 0.2)], many)
    assert unsure_many is not None and "1000 classes" in unsure_many.text and "class 999" not in unsure_many.text


def test_explorer_crops_the_projection_to_the_receptive_field(weights):
    """MapView.crop_png is the full-frame projection (contrast-normalised once) cut to the unit's box."""
    import io

    from PIL import Image

    from deconvnet.explorer import Explorer
    from deconvnet.weights import load_model

    explorer = Explorer(load_model(weights))
    session = explorer.open_path(sample_paths(["coffee"])[0])
    assert session.note is not None and "cat, cup, rocket, person" in session.note.text
    for layer in ("conv1", "conv3"):
        view = explorer.project(session, layer, explorer.maps(session, layer).order[0])
        full = np.asarray(Image.open(io.BytesIO(view.projection_png)))
        crop = np.asarray(Image.open(io.BytesIO(view.crop_png)))
        patch = np.asarray(Image.open(io.BytesIO(view.patch_png)))
        y0, x0, y1, x1 = view.box
        assert crop.shape == patch.shape == (y1 - y0, x1 - x0, 3)
        assert np.array_equal(crop, full[y0:y1, x0:x1])
        outside = full.copy()
        outside[y0:y1, x0:x1] = 128
        assert np.abs(outside.astype(int) - 128).max() <= 1  # nothing projected outside the field: mid-grey


def test_demo_intro_with_the_bundled_model_says_the_photos_are_none_of_its_classes():
    from deconvnet.commands.interfaces import demo_intro
    from deconvnet.weights import load_model

    loaded = load_model()
    intro = demo_intro(loaded.classes, loaded.source)
    assert "are none of the 10 classes the bundled model knows" in intro
    assert all(c in intro for c in loaded.classes) and "a cat" in intro


@pytest.mark.parametrize("arch", ["zfnet", "zfnet-blog", "tv-alexnet", "tv-vgg11_bn"])
def test_chain_input_sizes_from_geometry_match_a_forward_pass(arch):
    """The windowed projector sizes its layers from their geometry (no forward pass at start-up); the
    sizes must be those of a forward pass, at sizes with odd remainders."""
    import torchvision

    from deconvnet.engine import chain_forward
    from deconvnet.engine.core import DeconvNet
    from deconvnet.engine.windowed import chain_input_sizes

    torch.manual_seed(0)
    if arch.startswith("tv-"):
        model = getattr(torchvision.models, arch[3:])(weights=None).eval()
    else:
        model = build_model("zfnet", pool_style="blog" if arch.endswith("blog") else "ceil", fc=(8, 8)).eval()
    chain = DeconvNet(model).chain
    for size in [(224, 224), (97, 131), (64, 80)]:
        with torch.no_grad():
            record = chain_forward(chain, torch.zeros(1, 3, *size), len(chain) - 1, record=False)[1]
        expected = {i: (int(s[-2]), int(s[-1])) for i, s in record.shapes.items()}
        assert chain_input_sizes(chain, size) == expected, size
