"""Image loading must just work for every common mode, and fail clearly for non-images."""

import numpy as np
import pytest
import torch
from PIL import Image

from deconvnet.data import AugmentedView, ImageFolderCache, Preprocessing, load_image, ten_crops
from deconvnet.errors import DeconvnetError
from tests.helpers.images import make_image_folder


def _rgb(size=(40, 30)):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16", "LA", "1"])
def test_every_mode_loads_as_8bit_rgb(tmp_path, mode):
    img = _rgb()
    if mode == "I;16":
        arr = np.asarray(img.convert("L"), dtype=np.uint16) * 257
        img = Image.fromarray(arr)
        assert img.mode == "I;16"
        path = tmp_path / "x.png"
    elif mode == "CMYK":
        img = img.convert("CMYK")
        path = tmp_path / "x.jpg"
    else:
        img = img.convert(mode)
        path = tmp_path / ("x.png" if mode != "1" else "x.bmp")
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (40, 30)
    if mode == "I;16":  # 16-bit values are rescaled, not clipped to white
        assert 60 < np.asarray(out).mean() < 200


def test_transparent_pixels_become_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.save(tmp_path / "t.png")
    assert np.asarray(load_image(tmp_path / "t.png"))[0, 0].tolist() == [255, 255, 255]


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(DeconvnetError, match="no such file"):
        load_image(tmp_path / "missing.jpg")
    (tmp_path / "text.jpg").write_text("hello")
    with pytest.raises(DeconvnetError, match="not an image file"):
        load_image(tmp_path / "text.jpg")
    _rgb((200, 200)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(DeconvnetError, match="truncated or corrupt"):
        load_image(tmp_path / "cut.jpg")
    with pytest.raises(DeconvnetError, match="is a folder"):
        load_image(tmp_path)


def test_preprocessing_resizes_crops_and_normalises():
    pre = Preprocessing(resize=64, crop=56)
    img = _rgb((128, 96))
    x = pre(img)
    assert x.shape == (3, 56, 56)
    back = pre.denormalize(x)
    assert back.min() >= 0 and back.max() <= 1
    torch.testing.assert_close(pre.normalize(back), x, rtol=1e-4, atol=1e-4)


def test_ten_crops_are_corners_center_and_mirrors():
    images = torch.arange(2 * 3 * 8 * 8).view(2, 3, 8, 8)
    crops = ten_crops(images, 6)
    assert crops.shape == (2, 10, 3, 6, 6)
    assert torch.equal(crops[:, 0], images[..., :6, :6])
    assert torch.equal(crops[:, 3], images[..., 2:, 2:])
    assert torch.equal(crops[:, 4], images[..., 1:7, 1:7])
    assert torch.equal(crops[:, 5], crops[:, 0].flip(-1))


def test_augmentation_is_deterministic_per_seed_epoch_index(tmp_path):
    data = ImageFolderCache(make_image_folder(tmp_path / "d", classes=2, per_class=3), size=40, progress=False)
    for mode in ("paper", "rrc"):
        view = AugmentedView(data, crop=32, mode=mode, seed=1)
        a = view[2][0]
        assert torch.equal(a, view[2][0])
        view.set_epoch(1)
        assert a.shape == (3, 32, 32)
        assert any(not torch.equal(a, AugmentedView(data, crop=32, mode=mode, seed=s)[2][0]) for s in range(2, 8))


def test_cache_and_disk_give_the_same_images(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=2, per_class=3, fmt="jpg")
    cached = ImageFolderCache(root, size=40, progress=False)
    lazy = ImageFolderCache(root, size=40, cache=False, progress=False)
    assert cached.classes == lazy.classes == ["class_0", "class_1"]
    for i in range(len(cached)):
        assert torch.equal(cached[i][0], lazy[i][0])


def test_per_pixel_mean_preprocessing_centres_every_pixel(tmp_path):
    from deconvnet.data import compute_pixel_mean

    data = ImageFolderCache(make_image_folder(tmp_path / "d", classes=2, per_class=4, size=40), size=36, progress=False)
    mean = compute_pixel_mean(data, 32, tmp_path / "mean.npy")
    assert mean.shape == (3, 32, 32) and (tmp_path / "mean.npy").exists()
    pre = Preprocessing(resize=36, crop=32, std=(1.0, 1.0, 1.0), pixel_mean=str(tmp_path / "mean.npy"))
    batch = torch.stack([pre.normalize(data.image(i)[:, 2:34, 2:34]) for i in range(len(data))])
    assert batch.mean(0).abs().max() < 1e-5  # zero mean at every pixel and channel
    assert batch.std(0).mean() > 0.01
    torch.testing.assert_close(pre.denormalize(batch[0]), data.image(0)[:, 2:34, 2:34].float() / 255)


@pytest.mark.parametrize(
    ("size", "resize", "crop", "interpolation"),
    [
        ((40, 30), 256, 224, "bilinear"),  # upscaled, landscape
        ((301, 517), 256, 224, "bilinear"),  # downscaled, portrait, odd margins (rounding of the offsets)
        ((517, 301), 255, 227, "bicubic"),
        ((64, 64), 32, 48, "nearest"),  # crop larger than the resized image: zeros around it
        ((1000, 90), 64, 60, "bilinear"),  # a thin strip: limit_aspect first
    ],
)
def test_preprocessing_geometry_matches_torchvision(size, resize, crop, interpolation):
    """The resize and centre crop are done with PIL directly (torchvision's import is slow); they must
    give torchvision's pixels exactly."""
    from torchvision.transforms import v2 as T
    from torchvision.transforms.v2 import functional as TF

    from deconvnet.data import limit_aspect

    img = _rgb(size)
    pre = Preprocessing(resize=resize, crop=crop, interpolation=interpolation)
    theirs = T.Compose(
        [
            limit_aspect,
            T.Resize(resize, interpolation=T.InterpolationMode(interpolation), antialias=True),
            T.CenterCrop(crop),
        ]
    )(img)
    ours = pre.geometry()(img)
    assert ours.size == theirs.size == (crop, crop)
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    assert torch.equal(pre(img), pre.normalize(TF.pil_to_tensor(theirs)))
