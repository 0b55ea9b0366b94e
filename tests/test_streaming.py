"""`classify` streams: its peak memory does not grow with the number of images.

Before, every image was stacked into one batch (1 image 0.96 GB, 100 images 1.96 GB, 1000 images
11.65 GB peak RSS with the bundled 224 px model). Two real processes, 20 and 200 generated images,
under the memory cap of tests/helpers/processes.py; their own peak RSS (getrusage of each child) must differ
by less than 150 MB. The model is a narrow random ZFNet at the full 224 px input: cheap to run, but
its input and activations still take about 4 MB an image, so stacking 200 images would add about
800 MB. The batch is 16 images, so 20 images already fill whole batches and
200 only repeat them; what may still grow is the per-image printout and Python's bookkeeping of the
file list (kilobytes), and allocator noise (tens of MB), hence 150 MB.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from deconvnet.data import Preprocessing
from deconvnet.models import build_model
from deconvnet.weights import save_weights
from tests.helpers.processes import run_capped


def test_classify_peak_memory_is_independent_of_the_number_of_images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    names = []
    for i in range(200):
        name = f"img_{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / name)
        names.append(f"imgs/{name}")
    torch.manual_seed(0)
    model = build_model(
        "zfnet",
        conv=((16, 7, 2, 1), (24, 5, 2, 0), (32, 3, 1, 1), (32, 3, 1, 1), (24, 3, 1, 1)),
        fc=(32, 32),
        num_classes=4,
    )
    weights = save_weights(
        model, tmp_path / "narrow.safetensors", ["a", "b", "c", "d"], Preprocessing(resize=256, crop=224)
    )
    peaks = {}
    for count in (20, 200):
        done = run_capped(
            [
                "classify",
                *names[:count],
                "--batch-size",
                "16",
                "--top",
                "1",
                "--device",
                "cpu",
                "--weights",
                str(weights),
            ],
            tmp_path,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("%") == count
        peaks[count] = done.peak_rss_mb
    print(f"classify peak RSS: 20 images {peaks[20]:.0f} MB, 200 images {peaks[200]:.0f} MB")
    assert abs(peaks[200] - peaks[20]) < 150, peaks
