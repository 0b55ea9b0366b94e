"""Weights I/O: pytorchcv / torchvision / our safetensors, the registry download path, clear errors."""

import hashlib
import http.server
import io
import json
import threading
import zipfile
from functools import partial
from pathlib import Path

import pytest
import torch
import torchvision

from deconvnet.data import Preprocessing
from deconvnet.errors import DeconvnetError
from deconvnet.models import build_model
from deconvnet.weights import (
    REGISTRY,
    WeightsSpec,
    fetch_weights,
    load_model,
    read_metadata,
    register_weights,
    save_weights,
)
from tests.helpers.requirements import require


def _randomise(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.eval()


@pytest.mark.parametrize("name, arch", [("zfnet", "zfnet"), ("zfnetb", "zfnet-b"), ("alexnet", "alexnet")])
def test_pytorchcv_files_give_identical_logits(tmp_path, name, arch):
    pytorchcv = require("pytorchcv.model_provider")
    theirs = _randomise(pytorchcv.get_model(name, pretrained=False))
    path = tmp_path / f"{name}.pth"
    torch.save(theirs.state_dict(), path)
    loaded = load_model(path)
    assert loaded.arch == arch
    assert len(loaded.classes) == 1000 and loaded.classes[0] == "tench"
    # Large inputs make the LRN term (alpha/n * sum x^2) comparable to k, so its parameters matter.
    x = torch.randn(2, 3, 224, 224) * 300
    with torch.no_grad():
        ours, reference = loaded.model(x), theirs(x)
        scale = reference.abs().max()
        torch.testing.assert_close(ours / scale, reference / scale, rtol=1e-4, atol=1e-5)
        other = build_model(arch, lrn_params={"size": 5, "alpha": 5e-4, "beta": 0.75, "k": 2.0}).eval()
        other.load_state_dict(loaded.model.state_dict())
        assert (other(x) - reference).abs().max() > 1e-3 * scale, "test is insensitive to LRN parameters"


@pytest.mark.parametrize("builder", [torchvision.models.alexnet, torchvision.models.vgg11])
def test_torchvision_state_dicts_load_into_torchvision_models(tmp_path, builder):
    theirs = _randomise(builder(weights=None))
    path = tmp_path / "tv.pth"
    torch.save(theirs.state_dict(), path)
    loaded = load_model(path)
    assert loaded.arch.startswith("tv-")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), theirs(x))


def test_our_safetensors_round_trip_carries_architecture_classes_preprocessing(tmp_path):
    model = _randomise(build_model("zfnet", num_classes=3, fc=(32, 16), lrn=False, input_size=128))
    pre = Preprocessing(resize=146, crop=128)
    path = save_weights(
        model, tmp_path / "m.safetensors", ["cat", "dog", "owl"], pre, dtype=torch.float16, extra={"note": "hi"}
    )
    meta = read_metadata(path)
    assert meta["format"] == "deconvnet/1" and meta["note"] == "hi"
    loaded = load_model(path)
    assert loaded.classes == ["cat", "dog", "owl"]
    assert loaded.preprocessing == pre
    assert loaded.model.config == model.config
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        # fp16 storage: weights rounded to ~3 significant digits, so logits agree to ~1e-2 relative.
        torch.testing.assert_close(loaded.model(x), model(x), rtol=2e-2, atol=2e-3)
    assert not list(tmp_path.glob(".*tmp*")), "no temp file left behind"


def test_raw_state_dict_of_our_model_and_training_checkpoint(tmp_path):
    model = _randomise(build_model("zfnet", num_classes=5, fc=(32, 32)))
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    loaded = load_model(tmp_path / "ckpt.pt")
    assert loaded.model.config.fc == (32, 32) and len(loaded.classes) == 5


def test_load_model_can_drop_lrn(tmp_path):
    model = _randomise(build_model("zfnet", num_classes=5, fc=(32, 32)))
    save_weights(model, tmp_path / "m.safetensors", list("abcde"))
    loaded = load_model(tmp_path / "m.safetensors", lrn=False)
    assert not loaded.model.config.lrn


# --------------------------------------------------------------------------- errors


def test_missing_and_unknown_weights_are_clear(tmp_path):
    with pytest.raises(DeconvnetError, match="neither a file nor a known name"):
        load_model(tmp_path / "nope.pth")


def test_corrupt_files_are_clear(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(DeconvnetError, match="not a readable PyTorch weights file"):
        load_model(bad)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00\x01garbage")
    with pytest.raises(DeconvnetError, match="not a readable safetensors file"):
        load_model(bad_st)


def test_wrong_shapes_and_missing_keys_are_clear(tmp_path):
    pytorchcv = require("pytorchcv.model_provider")
    state = pytorchcv.get_model("zfnet", pretrained=False).state_dict()
    missing = dict(state)
    del missing["output.fc2.fc.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(DeconvnetError, match="missing key 'classifier.fc7.weight'|missing: classifier.fc7.weight"):
        load_model(tmp_path / "missing.pth")
    wrong = dict(state)
    wrong["features.stage3.unit2.conv.weight"] = torch.zeros(384, 100, 3, 3)
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(DeconvnetError, match=r"features.conv4.weight has shape \(384, 100, 3, 3\)"):
        load_model(tmp_path / "wrong.pth")
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "alien.pth")
    with pytest.raises(DeconvnetError, match="unrecognised weights layout"):
        load_model(tmp_path / "alien.pth")


class Evil:
    """Any pickled object that is not plain tensors/containers: weights_only must refuse it."""


def test_pickled_objects_are_refused_by_weights_only(tmp_path):
    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(DeconvnetError, match="not a readable PyTorch weights file"):
        load_model(tmp_path / "evil.pth")


# --------------------------------------------------------------------------- registry download


@pytest.fixture
def http_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _zip_of_weights(root: Path, name: str) -> str:
    pytorchcv = require("pytorchcv.model_provider")
    model = _randomise(pytorchcv.get_model("zfnet", pretrained=False))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    payload = buffer.getvalue()
    with zipfile.ZipFile(root / f"{name}.zip", "w") as zf:
        zf.writestr(name, payload)
    return hashlib.sha1(payload).hexdigest()


def test_download_verify_cache_and_load(http_server, tmp_path, monkeypatch):
    root, base = http_server
    monkeypatch.setenv("DECONVNET_CACHE", str(tmp_path / "cache"))
    sha1 = _zip_of_weights(root, "zfnet-test.pth")
    register_weights(
        "zfnet-test",
        WeightsSpec(
            arch="zfnet", description="test", url=f"{base}/zfnet-test.pth.zip", sha1=sha1, filename="zfnet-test.pth"
        ),
    )
    try:
        path = fetch_weights("zfnet-test", progress=False)
        assert path == tmp_path / "cache" / "zfnet-test.pth"
        (root / "zfnet-test.pth.zip").unlink()  # second call must use the cache, not the network
        assert fetch_weights("zfnet-test", progress=False) == path
        loaded = load_model("zfnet-test", progress=False)
        assert loaded.source == "zfnet-test" and loaded.arch == "zfnet"
    finally:
        REGISTRY.pop("zfnet-test")


def test_download_with_wrong_checksum_is_refused(http_server, tmp_path, monkeypatch):
    root, base = http_server
    monkeypatch.setenv("DECONVNET_CACHE", str(tmp_path / "cache"))
    _zip_of_weights(root, "zfnet-bad.pth")
    register_weights(
        "zfnet-bad",
        WeightsSpec(
            arch="zfnet", description="test", url=f"{base}/zfnet-bad.pth.zip", sha1="0" * 40, filename="zfnet-bad.pth"
        ),
    )
    try:
        with pytest.raises(DeconvnetError, match="checksum mismatch"):
            fetch_weights("zfnet-bad", progress=False)
        assert not (tmp_path / "cache" / "zfnet-bad.pth").exists()
        assert not any((tmp_path / "cache").glob(".download-*"))
    finally:
        REGISTRY.pop("zfnet-bad")


def test_offline_download_says_how_to_pass_a_local_file(http_server, tmp_path, monkeypatch):
    _, base = http_server
    monkeypatch.setenv("DECONVNET_CACHE", str(tmp_path / "cache"))
    register_weights(
        "zfnet-gone",
        WeightsSpec(
            arch="zfnet", description="test", url=f"{base}/missing.pth.zip", sha1="0" * 40, filename="zfnet-gone.pth"
        ),
    )
    try:
        with pytest.raises(DeconvnetError, match=r"could not download .* --weights /path/to/zfnet-gone.pth"):
            fetch_weights("zfnet-gone", progress=False)
    finally:
        REGISTRY.pop("zfnet-gone")


def test_registry_names_the_imagenet_zfnet_release():
    spec = REGISTRY["zfnet-imagenet"]
    assert spec.sha1 == "d010ddca1eb32a50a8cceb475c792f53e769b631"
    assert spec.url.endswith("v0.0.395/zfnet-1727-d010ddca.pth.zip")


# --------------------------------------------------------------------------- registry entries


def test_every_entry_carries_its_preprocessing_and_categories():
    """Like torchvision's Weights: pytorchcv's ImageNet entries say their input and their 1000 classes;
    the bundled entry leaves both to its file (our safetensors carry them)."""
    from deconvnet.weights import imagenet_classes

    for name in ("zfnet-imagenet", "zfnetb-imagenet", "alexnet-imagenet"):
        entry = REGISTRY[name]
        assert entry.name == name and entry.transforms() == Preprocessing()
        assert entry.classes() == imagenet_classes()
    bundled = REGISTRY["zfnet-imagenette"]
    assert bundled.classes() is None and bundled.preprocessing is None
    loaded = load_model("zfnet-imagenette")
    assert len(loaded.classes) == 10 and loaded.preprocessing.crop == 224


def test_torchvision_entry_is_the_enums_transforms_and_categories():
    from torchvision.models import ResNet18_Weights

    from deconvnet.weights import get_weights

    entry = get_weights("torchvision:ResNet18_Weights.IMAGENET1K_V1")
    t = ResNet18_Weights.IMAGENET1K_V1.transforms()
    pre = entry.transforms()
    assert (pre.resize, pre.crop) == (t.resize_size[0], t.crop_size[0])
    assert pre.mean == tuple(t.mean) and pre.std == tuple(t.std) and pre.interpolation == t.interpolation.value
    assert entry.classes() == list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
    assert entry.arch == "tv-resnet18" and entry.upstream is ResNet18_Weights.IMAGENET1K_V1
    with pytest.raises(DeconvnetError, match="unknown weights 'nope'"):
        get_weights("nope")


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_timm_entry_is_timms_data_config_without_building_the_model(name):
    """The entry reads timm's pretrained configuration by name; it must equal what timm resolves from
    the built model (``resolve_data_config(model=...)``), with resize = floor(crop / crop_pct)."""
    timm = require("timm")
    from timm.data import resolve_data_config

    from deconvnet.weights.registry import from_timm

    cfg = resolve_data_config({}, model=timm.create_model(name, pretrained=False))
    pre = from_timm(name).transforms()
    assert pre.crop == cfg["input_size"][-1] and pre.resize == int(cfg["input_size"][-1] // cfg["crop_pct"])
    assert pre.mean == tuple(cfg["mean"]) and pre.std == tuple(cfg["std"])
    assert pre.interpolation == cfg["interpolation"]


def test_a_registered_entry_gives_its_categories_and_preprocessing(http_server, tmp_path, monkeypatch):
    """A file without metadata (pytorchcv's .pth) takes the classes and input of its registry entry."""
    root, base = http_server
    monkeypatch.setenv("DECONVNET_CACHE", str(tmp_path / "cache"))
    sha1 = _zip_of_weights(root, "zfnet-named.pth")
    names = [f"thing {i}" for i in range(1000)]
    pre = Preprocessing(resize=240, crop=224, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    register_weights(
        "zfnet-named",
        WeightsSpec(
            arch="zfnet",
            url=f"{base}/zfnet-named.pth.zip",
            sha1=sha1,
            filename="zfnet-named.pth",
            preprocessing=pre,
            categories=names,
        ),
    )
    try:
        loaded = load_model("zfnet-named", progress=False)
        assert loaded.classes == names and loaded.preprocessing == pre and loaded.source == "zfnet-named"
    finally:
        REGISTRY.pop("zfnet-named")


def test_one_key_and_shape_check_for_headers_and_state_dicts(tmp_path):
    """A file's declared shapes (before loading) and a state dict loaded into a model are checked by the
    same function, so both name the same tensor, the shape found and the shape expected."""
    from safetensors.torch import load_file, save_file

    from deconvnet.weights import load_state_strict, read_metadata

    model = build_model("zfnet", num_classes=3, fc=(8, 8), input_size=96)
    path = save_weights(model, tmp_path / "w.safetensors", ["a", "b", "c"], Preprocessing(resize=110, crop=96))
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in read_metadata(path).items()}
    state = load_file(str(path))
    state["features.conv2.weight"] = torch.zeros(3, 3, 5, 5)
    save_file(state, str(tmp_path / "bad.safetensors"), metadata=metadata)
    shape = r"features.conv2.weight has shape \(3, 3, 5, 5\), .* expects \(256, 96, 5, 5\)"
    with pytest.raises(DeconvnetError, match=shape):
        load_model(tmp_path / "bad.safetensors")
    with pytest.raises(DeconvnetError, match=shape):
        load_state_strict(build_model("zfnet", num_classes=3, fc=(8, 8), input_size=96), state, "bad")
    del state["features.conv2.weight"]
    with pytest.raises(DeconvnetError, match=r"bad: tensors do not match the model \(missing: features.conv2.weight"):
        load_state_strict(build_model("zfnet", num_classes=3, fc=(8, 8), input_size=96), state, "bad")
