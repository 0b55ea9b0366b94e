"""Correspondence (Table 1): the sign-Hamming Delta on hand-built cases, box geometry, bad input."""

import json

import numpy as np
import pytest
import torch

from deconvnet.analysis.correspondence import (
    box_to_input,
    correspondence,
    correspondence_from_files,
    delta,
    load_boxes,
    pairwise_hamming,
    random_boxes,
    sign_hamming,
)
from deconvnet.data import Preprocessing
from deconvnet.errors import DeconvnetError
from deconvnet.weights import load_model
from tests.helpers.images import write_image
from tests.helpers.models import tiny_model, tiny_weights
from tests.helpers.processes import run_cli


def test_sign_hamming_on_hand_built_vectors():
    # signs: [+, -, 0, +] vs [+, +, 0, -] -> positions 1 and 3 differ
    assert sign_hamming([1.0, -1.0, 0.0, 2.0], [3.0, 1.0, 0.0, -1.0]) == 0.5
    assert sign_hamming([1, 2, 3], [4, 5, 6]) == 0.0
    assert sign_hamming([1, -2, 3], [-1, 2, -3]) == 1.0
    # zero against non-zero counts as a change
    assert sign_hamming([0, 0, 1, 1], [0, 1, 1, 1]) == 0.25


def test_delta_is_the_mean_over_pairs_with_its_spread():
    eps = np.array([[1, 1, 1, 1], [1, 1, 1, -1], [-1, -1, 1, 1]], dtype=float)
    # pairs: (0,1) -> 1/4, (0,2) -> 2/4, (1,2) -> 3/4
    assert pairwise_hamming(eps).tolist() == [0.25, 0.5, 0.75]
    mean, spread = delta(eps)
    assert mean == pytest.approx(0.5) and spread == pytest.approx(np.std([0.25, 0.5, 0.75]))
    assert delta(np.tile(eps[:1], (5, 1))) == (0.0, 0.0)
    with pytest.raises(DeconvnetError, match="at least 2"):
        delta(eps[:1])


def test_box_geometry_follows_resize_and_center_crop():
    pre = Preprocessing(resize=50, crop=50)
    # 200x100 image -> 100x50 after resize (factor 0.5) -> crop columns 25..75
    assert box_to_input((50, 0, 100, 50), 200, 100, pre) == (0, 0, 25, 25)
    assert box_to_input((101, 11, 103, 13), 200, 100, pre) == (5, 25, 7, 27)  # rounded outwards
    with pytest.raises(DeconvnetError, match="outside the model's centre crop"):
        box_to_input((0, 0, 20, 20), 200, 100, pre)
    rng = np.random.default_rng(0)
    for y0, x0, y1, x1 in random_boxes([(5, 7), (50, 50)], 50, rng):
        assert 0 <= y0 < y1 <= 50 and 0 <= x0 < x1 <= 50


def test_identical_images_and_masks_give_zero_delta_and_random_is_reported():
    model = tiny_model(64)
    image = torch.randn(3, 64, 64)
    images = image[None].repeat(3, 1, 1, 1)
    boxes = [{"eye": (10, 10, 20, 20), "nose": (30, 30, 40, 44)}] * 3
    result = correspondence(model, images, boxes, ["eye", "nose"], draws=2, seed=0)
    rows, used = result.rows, result.used
    assert result.layers == ["layer5", "layer7"] and result.paper is not None
    assert result.to_dict()["rows"] == [r.to_dict() for r in rows] and "| eye |" in result.table_text()
    by = {(r.name, r.layer): r for r in rows}
    assert by[("eye", "layer5")].delta == 0.0 and by[("nose", "layer7")].delta == 0.0
    assert by[("eye", "layer5")].pairs == 3
    assert {"random (eye size)", "random (nose size)", "random"} <= {r.name for r in rows}
    assert by[("random", "layer5")].draws == 4
    for rb in used["random"]["nose"]:
        assert all(b[2] - b[0] == 10 and b[3] - b[1] == 14 for b in rb)
    # seeded: the same draws again
    again = correspondence(model, images, boxes, ["eye", "nose"], draws=2, seed=0)
    rows2, used2 = again.rows, again.used
    assert used2["random"] == used["random"] and [r.delta for r in rows2] == [r.delta for r in rows]


def _dataset(tmp_path, entries):
    folder = tmp_path / "imgs"
    for i in range(3):
        write_image(folder / f"d{i}.png", (100, 80), seed=i)
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps({"images": entries}))
    return folder, path


GOOD = [{"file": f"d{i}.png", "boxes": {"left_eye": [30, 20, 40, 30], "nose": [45, 40, 60, 55]}} for i in range(3)]


def test_cli_runs_and_writes_the_table(tmp_path, capsys):
    weights = tiny_weights(tmp_path / "tiny.safetensors")
    folder, boxes = _dataset(tmp_path, GOOD)
    code, out, err = run_cli(
        [
            "correspondence",
            "--images",
            folder,
            "--boxes",
            boxes,
            "--draws",
            "2",
            "--weights",
            weights,
            "--out",
            tmp_path / "out",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0, err
    assert "| left_eye |" in out and "| random |" in out
    data = json.loads((tmp_path / "out" / "correspondence.json").read_text())
    assert {r["name"] for r in data["rows"]} >= {"left_eye", "nose", "random"}
    assert (tmp_path / "out" / "correspondence.csv").read_text().startswith("name,layer,delta")
    # the library in one call: the same JSON and table as the command
    result = correspondence_from_files(load_model(str(weights), device="cpu"), folder, boxes, draws=2)
    assert json.loads(json.dumps({"weights": str(weights), **result.to_dict()})) == {**data, "weights": str(weights)}
    assert result.table_text() + "\n" == (tmp_path / "out" / "correspondence.md").read_text()


@pytest.mark.parametrize(
    "entries,message",
    [
        (
            [{**GOOD[0], "boxes": {"left_eye": [90, 20, 120, 30], "nose": [45, 40, 60, 55]}}, *GOOD[1:]],
            "outside the 100x80 image",
        ),
        (
            [{**GOOD[0], "boxes": {"left_eye": [30, 20, 30, 30], "nose": [45, 40, 60, 55]}}, *GOOD[1:]],
            "empty or outside",
        ),
        ([GOOD[0]], "at least 2 annotated images"),
        ([*GOOD[:2], {"file": "missing.png", "boxes": GOOD[0]["boxes"]}], "missing.png, which is not in"),
        ([*GOOD[:2], {"file": "d2.png", "boxes": {"nose": [45, 40, 60, 55]}}], "d2.png has no box for left_eye"),
    ],
)
def test_cli_bad_boxes(tmp_path, capsys, entries, message):
    weights = tiny_weights(tmp_path / "tiny.safetensors")
    folder, boxes = _dataset(tmp_path, entries)
    code, out, err = run_cli(
        [
            "correspondence",
            "--images",
            folder,
            "--boxes",
            boxes,
            "--parts",
            "left_eye,nose",
            "--weights",
            weights,
            "--out",
            tmp_path / "out",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 2 and message in err and "Traceback" not in err


def test_load_boxes_defaults_to_parts_common_to_all_images(tmp_path):
    entries = [*GOOD[:2], {"file": "d2.png", "boxes": {"nose": [45, 40, 60, 55]}}]
    folder, boxes = _dataset(tmp_path, entries)
    annotated, parts = load_boxes(folder, boxes)
    assert parts == ["nose"] and len(annotated) == 3


def test_real_dog_boxes_fit_the_default_crop():
    from tests.helpers.shared_data import needs_shared

    dogs = needs_shared("dogs")
    annotated, parts = load_boxes(dogs, dogs / "annotations.json")
    assert parts == ["left_eye", "right_eye", "nose"] and len(annotated) == 12
    pre = Preprocessing(resize=146, crop=128)
    for a in annotated:
        for p in parts:
            y0, x0, y1, x1 = box_to_input(a.boxes[p], a.width, a.height, pre)
            assert 0 <= y0 < y1 <= 128 and 0 <= x0 < x1 <= 128
