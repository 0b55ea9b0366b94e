"""Models by name (deconvnet.zoo) and loading any torchvision/timm architecture: state-dict files,
torchvision's published weights through its own cache, untrained models, user modules, the CLI."""

import os
import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn

from deconvnet.cli import main
from deconvnet.data import Preprocessing, load_image
from deconvnet.errors import DeconvnetError
from deconvnet.inference import classify
from deconvnet.models import ConvNet
from deconvnet.samples import sample_paths
from deconvnet.weights import load_model, read_metadata, save_weights, wrap_model
from deconvnet.zoo import ArchName, create_model, list_models, resolve_arch
from tests.helpers.processes import free_port
from tests.helpers.requirements import require


def _randomise(model: nn.Module) -> nn.Module:
    """Random parameters and batch-norm statistics, so that a loading mistake changes the outputs."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _same_outputs(a: nn.Module, b: nn.Module, size: int = 64) -> None:
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        # Identical: the same weights through the same operations on the CPU.
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


# --------------------------------------------------------------------------- names


def test_names_resolve_ours_first_and_torchvision_with_or_without_prefix():
    assert resolve_arch("alexnet") == ArchName("deconvnet", "alexnet")  # the paper's single-tower AlexNet, as before
    assert resolve_arch("tv-alexnet") == ArchName("torchvision", "alexnet")
    assert (
        resolve_arch("resnet50")
        == resolve_arch("tv-resnet50")
        == resolve_arch("torchvision:resnet50")
        == ArchName("torchvision", "resnet50")
    )
    assert resolve_arch("resnet50").canonical == "tv-resnet50"
    assert resolve_arch("zfnet-b").canonical == "zfnet-b"


def test_list_models_covers_ours_and_every_torchvision_classifier():
    names = list_models()
    assert names[:3] == ["zfnet", "zfnet-b", "alexnet"]
    expected = {f"tv-{n}" for n in torchvision.models.list_models(module=torchvision.models)}
    assert expected <= set(names) and len(names) == 3 + len(expected)
    assert list_models("resnet5*") == ["tv-resnet50"]  # the tv- prefix is optional in patterns
    assert list_models("*alexnet") == ["alexnet", "tv-alexnet"]


def test_create_model_builds_each_family():
    assert isinstance(create_model("zfnet", num_classes=7), ConvNet)
    model = create_model("resnet18", num_classes=7)
    assert isinstance(model, torchvision.models.ResNet) and model.fc.out_features == 7


def test_unknown_names_say_how_to_list_the_valid_ones():
    with pytest.raises(
        DeconvnetError, match=r"unknown architecture 'resnet51' \(did you mean resnet50.*deconvnet models"
    ):
        resolve_arch("resnet51")
    with pytest.raises(DeconvnetError, match="not a torchvision classification model"):
        resolve_arch("tv-zfnet")


# --------------------------------------------------------------------------- torchvision state-dict files


ROUND_TRIP = [
    "resnet18",
    "resnet50",
    "resnext50_32x4d",
    "densenet121",
    "vgg16",
    "googlenet",
    "tv-alexnet",
    "squeezenet1_1",
    "mobilenet_v3_small",
]


@pytest.mark.parametrize("arch", ROUND_TRIP)
def test_torchvision_state_dict_round_trips_with_arch(tmp_path, arch):
    theirs = _randomise(create_model(arch, num_classes=10))
    path = tmp_path / "model.pth"
    torch.save(theirs.state_dict(), path)
    loaded = load_model(path, arch=arch)
    assert loaded.arch == resolve_arch(arch).canonical
    assert loaded.classes == [f"class {i}" for i in range(10)]  # num_classes read from the file
    _same_outputs(loaded.model, theirs)


def test_densenet_file_with_torchvisions_legacy_keys_loads(tmp_path):
    theirs = _randomise(create_model("densenet121"))
    # torchvision's published densenet files spell "norm.1" where the module says "norm1", and predate
    # batch norm's num_batches_tracked.
    legacy = {
        k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v
        for k, v in theirs.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    assert legacy.keys() != theirs.state_dict().keys()
    torch.save(legacy, tmp_path / "densenet.pth")
    _same_outputs(load_model(tmp_path / "densenet.pth", arch="densenet121").model, theirs)


def test_torchvision_download_file_gets_its_weights_classes_and_transforms(tmp_path):
    weights = torchvision.models.RegNet_X_400MF_Weights.IMAGENET1K_V2
    theirs = _randomise(create_model("regnet_x_400mf"))
    path = tmp_path / weights.url.rsplit("/", 1)[-1]  # the name torchvision downloads it as
    torch.save(theirs.state_dict(), path)
    loaded = load_model(path, arch="regnet_x_400mf")
    assert loaded.preprocessing.resize == 232 and loaded.classes == weights.meta["categories"]


def test_file_of_an_unknown_layout_asks_for_arch(tmp_path):
    torch.save(create_model("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(DeconvnetError, match="unrecognised weights layout.*pass --arch NAME"):
        load_model(tmp_path / "r18.pth")
    with pytest.raises(DeconvnetError, match="tensors do not match the model"):
        load_model(tmp_path / "r18.pth", arch="resnet50")


def test_alexnet_name_still_means_ours_but_a_torchvision_file_fits_only_theirs(tmp_path):
    theirs = _randomise(torchvision.models.alexnet(weights=None))
    torch.save(theirs.state_dict(), tmp_path / "tv.pth")
    loaded = load_model(tmp_path / "tv.pth", arch="alexnet")
    assert loaded.arch == "tv-alexnet"
    _same_outputs(loaded.model, theirs)
    assert isinstance(load_model(None, arch="alexnet").model, ConvNet)


# --------------------------------------------------------------------------- torchvision's published weights


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """torchvision's cache ($TORCH_HOME/hub/checkpoints) in a temporary folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    return folder


def test_torchvision_weights_enum_loads_through_torchvisions_cache(torch_home, sample_image_path):
    weights = torchvision.models.RegNet_X_400MF_Weights.IMAGENET1K_V2
    theirs = _randomise(create_model("regnet_x_400mf"))
    # The file torchvision would download, already in its cache: its own code loads it, no network.
    torch.save(theirs.state_dict(), torch_home / weights.url.rsplit("/", 1)[-1])
    loaded = load_model("torchvision:RegNet_X_400MF_Weights.DEFAULT", progress=False)
    assert loaded.source == "torchvision:RegNet_X_400MF_Weights.IMAGENET1K_V2"  # DEFAULT, resolved
    assert loaded.arch == "tv-regnet_x_400mf" and loaded.classes == weights.meta["categories"]
    _same_outputs(loaded.model, theirs)
    pre = loaded.preprocessing
    assert (pre.resize, pre.crop, pre.interpolation) == (232, 224, "bilinear")
    # Our preprocessing of a real photo matches torchvision's transforms for these weights.
    ours, _ = pre.load(sample_image_path)
    reference = weights.transforms()(load_image(sample_image_path))
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)  # float32 rounding of (x - mean) / std


def test_torchvision_weights_errors_are_clear(torch_home):
    with pytest.raises(
        DeconvnetError,
        match="unknown torchvision weights 'ResNet18_Weights.IMAGENET1K_V9'; "
        "ResNet18_Weights has torchvision:ResNet18_Weights.IMAGENET1K_V1",
    ):
        load_model("torchvision:ResNet18_Weights.IMAGENET1K_V9")
    with pytest.raises(DeconvnetError, match="not weights of a torchvision classification model"):
        load_model("torchvision:FasterRCNN_ResNet50_FPN_Weights.DEFAULT")
    with pytest.raises(DeconvnetError, match="are weights for torchvision's resnet18, not tv-resnet50"):
        load_model("torchvision:ResNet18_Weights.DEFAULT", arch="resnet50")


def test_offline_torchvision_weights_say_how_to_pass_the_file(tmp_path, sample_image_path):
    # A real process whose downloads go through a proxy that refuses connections: fails at once, offline or not.
    env = {
        k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy", "https_proxy", "all_proxy")
    }
    env.update(
        TORCH_HOME=str(tmp_path / "torch"),
        https_proxy=f"http://127.0.0.1:{free_port()}",
        PYTHONPATH=os.pathsep.join(sys.path),
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "deconvnet",
            "classify",
            str(sample_image_path),
            "--weights",
            "torchvision:ResNet18_Weights.DEFAULT",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("deconvnet: error:")]
    assert len(errors) == 1
    assert "could not download torchvision:ResNet18_Weights.IMAGENET1K_V1" in errors[0]
    assert "--weights /path/to/resnet18-f37072fd.pth --arch resnet18" in errors[0]


# --------------------------------------------------------------------------- untrained, user modules, saving


def test_untrained_architecture_and_its_preprocessing():
    loaded = load_model(None, arch="googlenet")
    assert loaded.source == "untrained" and loaded.arch == "tv-googlenet" and len(loaded.classes) == 1000
    inception = load_model(None, arch="inception_v3")
    assert (inception.preprocessing.resize, inception.preprocessing.crop) == (
        342,
        299,
    )  # from torchvision's default weights


def test_wrap_model_brings_any_module(sample_image_path):
    torch.manual_seed(0)
    fully_convolutional = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=4), nn.ReLU(), nn.Conv2d(8, 5, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    loaded = wrap_model(fully_convolutional.train(), preprocessing=Preprocessing(resize=72, crop=64))
    assert not loaded.model.training and loaded.classes == [f"class {i}" for i in range(5)]
    ranking = classify(loaded, [sample_image_path], top=2)[0]
    assert len(ranking) == 2 and ranking[0][1] >= ranking[1][1]
    assert wrap_model(nn.Linear(4, 1000)).classes[0] == "tench"
    assert wrap_model(nn.Linear(4, 2), classes=["cat", "dog"], arch="mine").arch == "mine"


def test_torchvision_model_saved_as_safetensors_rebuilds_alone(tmp_path):
    theirs = _randomise(create_model("googlenet", num_classes=3))
    torch.save(theirs.state_dict(), tmp_path / "g.pth")
    loaded = load_model(tmp_path / "g.pth", arch="googlenet")
    pre = Preprocessing(resize=80, crop=64)
    path = save_weights(
        loaded.model, tmp_path / "g.safetensors", ["a", "b", "c"], pre, arch=loaded.arch, arch_kwargs=loaded.arch_kwargs
    )
    assert read_metadata(path)["arch"] == "tv-googlenet"
    again = load_model(path)
    assert again.arch == "tv-googlenet" and again.classes == ["a", "b", "c"] and again.preprocessing == pre
    _same_outputs(again.model, theirs)
    with pytest.raises(TypeError, match="needs arch="):
        save_weights(loaded.model, tmp_path / "x.safetensors", ["a", "b", "c"])


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("r18") / "resnet18-finetuned.pth"
    torch.save(_randomise(create_model("resnet18")).state_dict(), path)
    return str(path)


def test_cli_classify_with_a_torchvision_architecture(resnet18_file, capsys):
    photo = str(sample_paths(["coffee"])[0])
    assert main(["classify", photo, "--weights", resnet18_file, "--arch", "resnet18", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("%") == 5 and "tv-resnet18, 1000 classes" in captured.err
    assert "warning" not in captured.err


def test_cli_warns_about_an_untrained_model(capsys):
    photo = str(sample_paths(["coffee"])[0])
    assert main(["classify", photo, "--arch", "zfnet", "--top", "1", "--device", "cpu"]) == 0
    assert "deconvnet: warning: zfnet has random weights" in capsys.readouterr().err


def test_cli_convert_stores_a_torchvision_model(resnet18_file, tmp_path, capsys):
    out = tmp_path / "r18.safetensors"
    assert (
        main(
            [
                "convert",
                "--weights",
                resnet18_file,
                "--arch",
                "resnet18",
                "--out",
                str(out),
                "--fp16",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    loaded = load_model(out)
    assert loaded.arch == "tv-resnet18" and loaded.model.bn1.num_batches_tracked.dtype == torch.int64
    reference = load_model(resnet18_file, arch="resnet18")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        # fp16 storage: ~3 significant digits per weight, so logits agree to ~1e-2 relative.
        torch.testing.assert_close(loaded.model(x), reference.model(x), rtol=2e-2, atol=2e-2)


def test_cli_bad_arch_is_one_line_error(resnet18_file):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "deconvnet",
            "classify",
            str(sample_paths(["coffee"])[0]),
            "--weights",
            resnet18_file,
            "--arch",
            "resnet19",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "deconvnet: error: unknown architecture 'resnet19' (did you mean resnet18"
    )
    assert lines[0].endswith("; `deconvnet models [PATTERN]` lists the names (in Python: deconvnet.list_models())")


def test_cli_models_lists_names_and_weights(capsys):
    assert main(["models", "resnet1*"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [l.split()[0] for l in lines] == ["tv-resnet101", "tv-resnet152", "tv-resnet18"]
    assert "torchvision:ResNet18_Weights.IMAGENET1K_V1" in lines[2]


# --------------------------------------------------------------------------- timm (optional extra)


def test_timm_checkpoint_round_trips(tmp_path):
    timm = require("timm", install="pip install 'deconvnet[timm]'")
    theirs = _randomise(timm.create_model("test_resnet", pretrained=False, num_classes=6))
    torch.save({"state_dict": theirs.state_dict()}, tmp_path / "timm.pth")
    loaded = load_model(tmp_path / "timm.pth", arch="timm:test_resnet")
    assert loaded.arch == "timm:test_resnet" and len(loaded.classes) == 6
    _same_outputs(loaded.model, theirs)
    config = timm.data.resolve_data_config({}, model=theirs)
    assert (
        loaded.preprocessing.crop == config["input_size"][-1]
        and loaded.preprocessing.interpolation == config["interpolation"]
    )
    path = save_weights(
        loaded.model,
        tmp_path / "timm.safetensors",
        loaded.classes,
        loaded.preprocessing,
        arch=loaded.arch,
        arch_kwargs=loaded.arch_kwargs,
    )
    _same_outputs(load_model(path).model, theirs)


def test_without_timm_the_error_names_the_extra():
    # A real interpreter in which `import timm` fails, as where the extra is not installed.
    code = (
        "import sys; sys.modules['timm'] = None\nfrom deconvnet.zoo import resolve_arch\nresolve_arch('timm:resnet50')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert 'DeconvnetError: timm models need the optional timm package: pip install "deconvnet[timm]"' in result.stderr
