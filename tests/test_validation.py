"""The metadata checks of ``deconvnet.validation`` on decoded metadata, in this process: what a good
file gives back, and the one line each bad field gets. Whole crafted files through
``load_model`` and the CLI, under a memory cap, are in tests/test_hostile.py."""

from __future__ import annotations

import json

import pytest

from deconvnet.data import Preprocessing
from deconvnet.errors import DeconvnetError
from deconvnet.models import ArchConfig
from deconvnet.validation import LIMITS, check_builder_metadata, check_metadata

ARCH = ArchConfig(num_classes=4, input_size=64, lrn=False, pool_style="blog", dropout=0.25)
PRE = Preprocessing(resize=72, crop=64, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), interpolation="bicubic")
# as save_weights writes it and read_metadata decodes it: JSON, so tuples come back as lists
GOOD = json.loads(
    json.dumps(
        {
            "format": "deconvnet-v1",
            "arch": ARCH.to_dict(),
            "classes": ["a", "b", "c", "d"],
            "preprocessing": PRE.to_dict(),
            "train_config": {"epochs": 3},
        }
    )
)


def _with(key: str, **changes) -> dict:
    return {**GOOD, key: {**GOOD[key], **changes}}


def _error(metadata: dict) -> str:
    with pytest.raises(DeconvnetError) as info:
        check_metadata(metadata, "w.safetensors")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("w.safetensors: invalid metadata: ")
    return message.removeprefix("w.safetensors: invalid metadata: ")


def test_good_metadata_gives_back_what_was_saved():
    config, classes, preprocessing = check_metadata(GOOD, "w.safetensors")
    assert config == ARCH and classes == ["a", "b", "c", "d"] and preprocessing == PRE
    # fields a file leaves out keep the dataclasses' defaults
    config, _, preprocessing = check_metadata(
        {**GOOD, "arch": {"num_classes": 4, "input_size": 64}, "preprocessing": {"resize": 72, "crop": 64}}, "w"
    )
    assert config == ArchConfig(num_classes=4, input_size=64)
    assert preprocessing == Preprocessing(resize=72, crop=64)


@pytest.mark.parametrize(
    "metadata, message",
    [
        ({k: v for k, v in GOOD.items() if k != "arch"}, "the 'arch' entry is missing"),
        ({**GOOD, "arch": [1, 2]}, "'arch' must be a JSON object, got list"),
        (
            _with("arch", conv=[[96, 7, 2]] + GOOD["arch"]["conv"][1:]),
            "arch.conv[0] must be [channels, kernel, stride, padding]",
        ),
        (
            _with("arch", conv=GOOD["arch"]["conv"][:4]),
            "arch.conv must list 5 layers as [channels, kernel, stride, padding]",
        ),
        (_with("arch", conv=[[96, 7, 2, 9]] * 5), "conv1 padding = 9 is outside 0..7"),
        (_with("arch", conv=[[96, True, 2, 1]] * 5), "conv1 kernel must be an integer, got bool"),
        (
            _with("arch", conv=[[96, 7, 2, 1]] * 4 + [[10**9, 3, 1, 1]]),
            "conv5 channels = 1000000000 is outside 1..16384",
        ),
        (_with("arch", fc=[64, "32"]), "fc7 width must be an integer, got str"),
        (_with("arch", fc=[64]), "arch.fc must give the widths of fc6 and fc7"),
        (_with("arch", num_classes=4.0), "arch.num_classes must be an integer, got float"),
        (_with("arch", lrn="yes"), "arch.lrn must be true or false"),
        (_with("arch", pool_style="floor"), "arch.pool_style must be one of ceil, blog"),
        (_with("arch", dropout=1), "arch.dropout = 1 is out of range"),
        (_with("arch", in_channels=1), "arch.in_channels = 1 is outside 3..3"),
        (
            _with("arch", input_size=LIMITS["input_size"] + 1),
            "arch.input_size = 2049 is outside 1..2048",
        ),
        (
            _with("arch", lrn_params={"size": 5, "alpha": 1e-4, "beta": 0.75}),
            "arch.lrn_params must have exactly size, alpha, beta and k",
        ),
        (
            _with("arch", lrn_params={"size": 5, "alpha": float("nan"), "beta": 0.75, "k": 2}),
            "lrn alpha must be a finite number, got nan",
        ),
        (_with("arch", layers=8), "unknown architecture field(s) layers"),
        ({**GOOD, "classes": ["a", "b"]}, "2 class names for 4 outputs"),
        ({**GOOD, "classes": "abcd"}, "'classes' must be a list of names"),
        ({**GOOD, "classes": ["a", None, "c", "d"]}, "'classes' must be a list of names"),
        (
            _with("preprocessing", resize=LIMITS["resize"] + 1),
            "preprocessing.resize = 4097 is outside 1..4096",
        ),
        (_with("preprocessing", crop=80), "preprocessing.crop = 80 is outside 1..72"),
        (_with("preprocessing", std=[0.2, 0, 0.3]), "preprocessing.std = 0 is out of range"),
        (_with("preprocessing", mean=[0.5, 0.4]), "preprocessing.mean must be 3 numbers (R, G, B)"),
        (
            _with("preprocessing", mean=[0.5, float("inf"), 0.3]),
            "preprocessing.mean must be a finite number, got inf",
        ),
        (
            _with("preprocessing", interpolation="magic"),
            "preprocessing.interpolation must be one of nearest, nearest-exact,",
        ),
        (_with("preprocessing", pixel_mean=3), "preprocessing.pixel_mean must be a path or null"),
        (
            _with("preprocessing", scale=2),
            "unknown preprocessing field(s) scale",
        ),
    ],
)
def test_a_bad_field_gets_one_line_naming_it_and_what_it_must_be(metadata, message):
    assert message in _error(metadata)


def test_a_crop_too_small_for_the_layers_names_the_smallest_input():
    """Checked after the fields, by building the architecture on the meta device (no memory)."""
    small = {**GOOD, "preprocessing": {**GOOD["preprocessing"], "crop": 8}}
    with pytest.raises(
        DeconvnetError, match=r"preprocessing.crop = 8 is too small for this model: .* at least \d+x\d+"
    ):
        check_metadata(small, "w.safetensors")


BUILDER = {"arch": "tv-resnet18", "arch_kwargs": {"num_classes": 4, "width_per_group": 64, "zero_init_residual": True}}
BUILDER = {**BUILDER, "classes": GOOD["classes"], "preprocessing": GOOD["preprocessing"]}


def test_builder_metadata_gives_back_the_builder_arguments():
    kwargs, classes, preprocessing = check_builder_metadata(BUILDER, "r.safetensors")
    assert kwargs == {"num_classes": 4, "width_per_group": 64, "zero_init_residual": True}
    assert classes == GOOD["classes"] and preprocessing == PRE
    assert check_builder_metadata({**BUILDER, "arch_kwargs": None}, "r")[0] == {}  # the builder's defaults
    assert check_builder_metadata({k: v for k, v in BUILDER.items() if k != "arch_kwargs"}, "r")[0] == {}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"arch_kwargs": {"num_classes": 10**9}}, "num_classes 1000000000 is out of range (1..100000)"),
        ({"arch_kwargs": {"num_classes": True}}, "num_classes True is out of range (1..100000)"),
        (
            {"arch_kwargs": {"block": [1, 2]}},
            "'arch_kwargs' must map names to numbers, strings or flags",
        ),
        ({"arch_kwargs": ["num_classes", 4]}, "'arch_kwargs' must map names to numbers, strings or flags"),
        ({"preprocessing": {"resize": 10**7}}, "preprocessing.resize = 10000000 is outside 1..4096"),
        ({"classes": None}, "'classes' must be a list of names"),
    ],
)
def test_bad_builder_metadata_gets_one_line(change, message):
    with pytest.raises(DeconvnetError) as info:
        check_builder_metadata({**BUILDER, **change}, "r.safetensors")
    assert message in str(info.value) and "\n" not in str(info.value)
