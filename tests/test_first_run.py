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
