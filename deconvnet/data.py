"""Images in, tensors out: robust image loading, the preprocessing of each model, ImageFolder datasets
with an in-memory uint8 cache, and the training augmentations (the paper's 10 sub-crops, or
random-resized crops).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import math
import os
import stat
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DeconvnetError

# torchvision is imported only where a tensor transform needs it (training augmentations): importing
# it costs about 1.4 s (torchvision.ops pulls in torch._dynamo), which every CLI command would pay at
# start-up. The resize and centre crop of PIL images below are the two PIL calls torchvision makes for
# them (tests/test_data.py checks they match torchvision's pixel for pixel).

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The one list of image types every command, the atlas and the server accept: PIL format -> file
# extensions. Decoding is restricted to these formats (PIL would otherwise try every plugin).
IMAGE_FORMATS: dict[str, tuple[str, ...]] = {
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"),
    "PNG": (".png",),
    "GIF": (".gif",),
    "BMP": (".bmp",),
    "WEBP": (".webp",),
    "TIFF": (".tif", ".tiff"),
    "PPM": (".ppm", ".pgm", ".pbm", ".pnm"),
}
IMAGE_EXTENSIONS = tuple(sorted({e for exts in IMAGE_FORMATS.values() for e in exts}))  # torchvision's included
SUPPORTED_TYPES = "JPEG, PNG, GIF, BMP, WebP, TIFF, PPM/PGM"

# Bounds that make every path from a file to a tensor cost bounded memory, whatever the file says:
# at most MAX_IMAGE_PIXELS decoded pixels (checked from the header, before decoding), and the long
# side cut (centred) to MAX_ASPECT x the short side before any resize, so that resizing the short
# side cannot blow up a thin strip (a 10000x10 PNG resized to short side 256 would be 256000x256).
MAX_IMAGE_PIXELS = 40_000_000
MAX_ASPECT = 2.0

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Preprocessing",
    "load_image",
    "decode_image",
    "check_image_file",
    "limit_aspect",
    "list_images",
    "IMAGE_EXTENSIONS",
    "IMAGE_FORMATS",
    "MAX_IMAGE_PIXELS",
    "ImageFolderCache",
    "scan_image_folder",
    "ten_crop_boxes",
    "mixed_seed",
]


def _stat_error(path: Path, e: OSError) -> DeconvnetError:
    if e.errno == errno.ELOOP:
        return DeconvnetError(f"{path}: a symbolic link loop (the link points, through others, back to itself)")
    if e.errno == errno.ENOENT:
        return DeconvnetError(f"no such file: {path}")
    if e.errno == errno.EACCES:
        return DeconvnetError(f"{path}: permission denied")
    return DeconvnetError(f"cannot read {path} ({e.strerror or e})")


def _checked_file(path: Path) -> Path:
    try:
        info = path.stat()
    except OSError as e:
        raise _stat_error(path, e) from None
    if stat.S_ISDIR(info.st_mode):
        raise DeconvnetError(f"{path} is a folder, not an image file")
    if not stat.S_ISREG(info.st_mode):
        raise DeconvnetError(f"{path} is not a regular file")
    return path


def _too_large(name: str, width: int, height: int, max_pixels: int) -> DeconvnetError:
    return DeconvnetError(
        f"{name}: image too large ({width}x{height} = {width * height / 1e6:.1f} megapixels; the limit is "
        f"{max_pixels / 1e6:g} megapixels); resize it first"
    )


def _open_header(source: str | os.PathLike | IO[bytes], name: str, max_pixels: int) -> Image.Image:
    """Open an image reading only its header; refuse unknown formats and oversized pixel counts."""
    try:
        img = Image.open(source, formats=tuple(IMAGE_FORMATS))
    except UnidentifiedImageError:
        raise DeconvnetError(f"{name}: not an image file (supported: {SUPPORTED_TYPES})") from None
    except Image.DecompressionBombError:
        # PIL's own guard (far above ours) fired before we could read the size: quote only our limit
        raise DeconvnetError(
            f"{name}: image too large (over {max_pixels / 1e6:g} megapixels, the limit); resize it first"
        ) from None
    except OSError as e:
        if isinstance(source, (str, os.PathLike)) and e.errno is not None:
            raise _stat_error(Path(source), e) from None
        raise DeconvnetError(f"{name}: cannot read image header ({e})") from None
    except (SyntaxError, ValueError, EOFError) as e:
        raise DeconvnetError(f"{name}: cannot read image header ({e})") from None
    width, height = img.size
    if width < 1 or height < 1:
        img.close()
        raise DeconvnetError(f"{name}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        img.close()
        raise _too_large(name, width, height, max_pixels)
    return img


def _decode(img: Image.Image, name: str, max_pixels: int) -> Image.Image:
    try:
        with img:
            if img.format == "JPEG":
                width, height = img.size
                img.draft("RGB", (min(width, 1024), min(height, 1024)))  # decode at a reduced scale when large
            img.load()
            oriented = ImageOps.exif_transpose(img) or img
            return to_rgb(oriented)
    except Image.DecompressionBombError:
        raise DeconvnetError(
            f"{name}: image too large (over {max_pixels / 1e6:g} megapixels, the limit); resize it first"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DeconvnetError(f"{name}: cannot decode image ({e}); the file may be truncated or corrupt") from None


def load_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open any common image as 8-bit RGB, whatever its mode (greyscale, RGBA, palette, CMYK, 16-bit).

    EXIF orientation is applied (phone photos). Transparent pixels are composited on white. Raises
    ``DeconvnetError`` with a one-line reason for a missing, unreadable, corrupt or oversized file
    (more than ``max_pixels`` pixels: refused from the header, before anything is decoded).
    """
    path = _checked_file(Path(path))
    return _decode(_open_header(path, str(path), max_pixels), str(path), max_pixels)


def decode_image(data: bytes, name: str = "upload", max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Bytes -> 8-bit RGB PIL image, like ``load_image`` (same formats, limits and messages)."""
    if not data:
        raise DeconvnetError(f"{name}: empty file")
    return _decode(_open_header(io.BytesIO(data), name, max_pixels), name, max_pixels)


def check_image_file(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) of an image file from its header alone: the cheap check that lets a command
    refuse a bad file among many before the slow part, without holding any pixels."""
    path = _checked_file(Path(path))
    with _open_header(path, str(path), max_pixels) as img:
        return img.size


def limit_aspect(img: Image.Image, max_aspect: float = MAX_ASPECT) -> Image.Image:
    """Cut the long side (centred) to at most ``max_aspect`` x the short side.

    Every preprocessing resizes the short side and keeps (at most) the centre, so this changes
    nothing the model sees for ordinary images and bounds the resized size for thin strips.
    """
    width, height = img.size
    short = min(width, height)
    longest = max(1, int(math.ceil(short * max_aspect)))
    if width > longest:
        left = (width - longest) // 2
        return img.crop((left, 0, left + longest, height))
    if height > longest:
        top = (height - longest) // 2
        return img.crop((0, top, width, top + longest))
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; 16/32-bit greyscale is rescaled by its actual range."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # float32 and in place: a 40-megapixel 16-bit image costs 160 MB here, not 4 float64 copies
        arr = np.asarray(img).astype(np.float32)
        if img.mode.startswith("I;16"):
            arr *= 255.0 / 65535.0
        else:
            lo, hi = float(arr.min()), float(arr.max())
            if hi > lo:
                arr -= lo
                arr *= 255.0 / (hi - lo)
            else:
                arr[...] = 0.0
        arr += 0.5
        np.clip(arr, 0, 255, out=arr)
        grey = arr.astype(np.uint8)
        del arr
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def list_images(root: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """All files under ``root`` with an image extension, sorted (a single file is returned as is)."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DeconvnetError(f"no such folder: {root}")
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in root.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class Preprocessing:
    """How a model expects its input: resize the shorter side, center crop, normalise.

    ``pixel_mean`` (optional, a path to a .npy of shape (3, crop, crop) in [0, 1]) replaces the
    per-channel mean with the paper's per-pixel mean image.
    """

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    pixel_mean: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        d = dict(d)
        d["mean"] = tuple(d.get("mean", IMAGENET_MEAN))
        d["std"] = tuple(d.get("std", IMAGENET_STD))
        return cls(**d)

    def geometry(self) -> Callable[[Image.Image], Image.Image]:
        """PIL image -> cropped PIL image (what the model sees, before normalisation)."""
        return functools.partial(
            _resize_center_crop, resize=self.resize, crop=self.crop, interpolation=self.interpolation
        )

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float tensor (..., 3, H, W) -> model input."""
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
        if self.pixel_mean:
            mean = torch.from_numpy(np.load(self.pixel_mean)).to(x)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model input -> [0, 1] image tensor (inverse of ``normalize``)."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
        if self.pixel_mean:
            mean = torch.from_numpy(np.load(self.pixel_mean)).to(x)
        return (x * std + mean).clamp(0, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """PIL image -> normalised float tensor (3, crop, crop): the model's input."""
        return self.normalize(pil_to_tensor(self.geometry()(img)))

    def load(self, path: str | os.PathLike) -> tuple[torch.Tensor, Image.Image]:
        """Load a file; return (model input, the cropped RGB image it shows)."""
        shown = self.geometry()(load_image(path))
        return self.normalize(pil_to_tensor(shown)), shown


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[Path, int]]]:
    """``root/<class>/**/image`` -> (class names sorted, [(path, class index)]); clear errors if empty."""
    root = Path(root)
    if not root.is_dir():
        raise DeconvnetError(f"no such folder: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DeconvnetError(f"{root} has no class sub-folders; expected {root}/<class name>/<images>")
    samples: list[tuple[Path, int]] = []
    empty = []
    for index, name in enumerate(classes):
        files = list_images(root / name)
        if not files:
            empty.append(name)
        samples.extend((f, index) for f in files)
    if empty:
        raise DeconvnetError(f"{root}: class folder(s) with no images: {', '.join(empty)}")
    return classes, samples


def square_uint8(img: Image.Image, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Resize the shorter side to ``size`` and center-crop a square: (3, size, size) uint8."""
    return pil_to_tensor(_resize_center_crop(img, size, size, interpolation))


_PIL_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


def _resize_center_crop(img: Image.Image, resize: int, crop: int, interpolation: str = "bilinear") -> Image.Image:
    """torchvision's ``Resize(resize)`` then ``CenterCrop(crop)`` on a PIL image, after ``limit_aspect``:
    the short side to ``resize`` (the long side ``int(resize * long / short)``), then the centred
    ``crop x crop`` box (offsets rounded as torchvision rounds them; zeros outside the image)."""
    if interpolation not in _PIL_RESAMPLING:
        raise ValueError(f"interpolation must be one of {', '.join(_PIL_RESAMPLING)}, got {interpolation!r}")
    img = limit_aspect(img)
    width, height = img.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize, int(resize * long / short)
    size = (new_short, new_long) if width <= height else (new_long, new_short)
    if size != img.size:
        img = img.resize(size, resample=_PIL_RESAMPLING[interpolation])
    width, height = img.size
    left = int(round((width - crop) / 2.0)) if crop <= width else -((crop - width) // 2)
    top = int(round((height - crop) / 2.0)) if crop <= height else -((crop - height) // 2)
    return img.crop((left, top, left + crop, top + crop))


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> (3, H, W) uint8 tensor (torchvision's ``pil_to_tensor``)."""
    return torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)


class ImageFolderCache(torch.utils.data.Dataset):
    """An ImageFolder whose images are decoded once into ``size x size`` uint8 squares.

    Images are resized (shorter side ``size``) and center-cropped, the paper's "center 256x256" step.
    With ``cache=True`` they are all held in one uint8 tensor (about 196 KB an image at 256 px) when
    that fits in half the available memory (else a warning, and decoding from disk); with
    ``cache=False`` every access decodes from disk. Unreadable files are skipped with a warning
    naming them (``self.skipped``).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        size: int = 256,
        cache: bool = True,
        classes: Sequence[str] | None = None,
        num_workers: int = 0,
        progress: bool = True,
        samples: list[tuple[Path, int]] | None = None,
    ) -> None:
        self.root = Path(root)
        self.size = size
        found_classes, found = scan_image_folder(self.root) if samples is None else (list(classes or []), samples)
        if classes is not None and list(classes) != list(found_classes):
            missing = sorted(set(classes) - set(found_classes))
            extra = sorted(set(found_classes) - set(classes))
            raise DeconvnetError(
                f"{self.root}: classes differ from the training set (missing: {missing or 'none'}; "
                f"unexpected: {extra or 'none'})"
            )
        self.classes = list(found_classes)
        self.samples = found
        self.skipped: list[tuple[Path, str]] = []
        self.images: torch.Tensor | None = None
        if cache:
            needed = len(self.samples) * 3 * size * size
            available = _available_memory()
            if available is not None and needed > available // 2:
                warnings.warn(
                    f"{self.root}: caching {len(self.samples)} images needs {needed / 2**30:.1f} GiB, more than half "
                    f"of the {available / 2**30:.1f} GiB available; decoding from disk instead",
                    stacklevel=2,
                )
                cache = False
        if cache:
            self._fill_cache(num_workers, progress)
        else:
            self.samples = [s for s in self.samples if self._readable(s[0])]
        self.targets = torch.tensor([t for _, t in self.samples], dtype=torch.long)
        if self.skipped:
            listed = "; ".join(f"{p} ({why})" for p, why in self.skipped[:20])
            more = f" and {len(self.skipped) - 20} more" if len(self.skipped) > 20 else ""
            warnings.warn(f"skipped {len(self.skipped)} unreadable image(s): {listed}{more}", stacklevel=2)
        if not self.samples:
            raise DeconvnetError(f"{self.root}: no readable images")

    def _readable(self, path: Path) -> bool:
        try:
            with Image.open(path) as img:
                img.verify()
            return True
        except Exception as e:  # any decoder failure means "skip and report"
            self.skipped.append((path, type(e).__name__))
            return False

    def _fill_cache(self, num_workers: int, progress: bool) -> None:
        from tqdm.auto import tqdm

        decoder = _Decoder(self.samples, self.size)
        loader = torch.utils.data.DataLoader(decoder, batch_size=None, num_workers=num_workers, collate_fn=lambda x: x)
        images = torch.empty((len(self.samples), 3, self.size, self.size), dtype=torch.uint8)
        keep: list[tuple[Path, int]] = []
        for index, tensor, error in tqdm(
            loader, total=len(decoder), desc=f"decoding {self.root.name}", disable=not progress, unit="img"
        ):
            if tensor is None:
                self.skipped.append((self.samples[index][0], error))
            else:
                images[len(keep)] = tensor
                keep.append(self.samples[index])
        self.images = images[: len(keep)].clone() if len(keep) < len(self.samples) else images
        self.samples = keep

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, index: int) -> torch.Tensor:
        """The (3, size, size) uint8 square of sample ``index``."""
        if self.images is not None:
            return self.images[index]
        return square_uint8(load_image(self.samples[index][0]), self.size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.image(index), int(self.targets[index])

    def class_counts(self) -> list[int]:
        return torch.bincount(self.targets, minlength=len(self.classes)).tolist()


def _available_memory() -> int | None:
    """Bytes of memory available now (Linux/macOS), or None where unknown."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


class _Decoder(torch.utils.data.Dataset):
    def __init__(self, samples: list[tuple[Path, int]], size: int) -> None:
        self.samples, self.size = samples, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return index, square_uint8(load_image(self.samples[index][0]), self.size), ""
        except DeconvnetError as e:
            return index, None, str(e).split(": ", 1)[-1]


def compute_pixel_mean(dataset: ImageFolderCache, crop: int, path: str | os.PathLike | None = None) -> np.ndarray:
    """The paper's per-pixel mean: the average (3, crop, crop) center crop of a dataset's images, in
    [0, 1]. With ``path`` it is also saved as .npy, for ``Preprocessing(pixel_mean=path)``."""
    from torchvision.transforms.v2 import functional as TF

    total = torch.zeros(3, crop, crop, dtype=torch.float64)
    for i in range(len(dataset)):
        total += TF.center_crop(dataset.image(i), crop).double()
    mean = (total / (255.0 * len(dataset))).float().numpy()
    if path is not None:
        from .atomic import save_npy

        save_npy(path, mean)
    return mean


def ten_crop_boxes(size: int, crop: int) -> list[tuple[int, int]]:
    """Top-left corners of the 4 corner crops and the center crop (the paper's 5 positions)."""
    m = size - crop
    return [(0, 0), (0, m), (m, 0), (m, m), (m // 2, m // 2)]


class AugmentedView(torch.utils.data.Dataset):
    """Training view over an ``ImageFolderCache``: deterministic per (seed, epoch, index) augmentation.

    ``mode="paper"``: one of the 10 fixed sub-crops (4 corners + center, each maybe flipped) of the
    cached square; ``mode="rrc"``: random-resized crop (scale range ``scale``) and horizontal flip.
    Determinism per sample (not per worker) makes resumed and multi-process runs reproduce exactly.
    """

    def __init__(
        self,
        base: ImageFolderCache,
        crop: int = 224,
        mode: str = "paper",
        scale: tuple[float, float] = (0.25, 1.0),
        seed: int = 0,
    ) -> None:
        if mode not in ("paper", "rrc", "center"):
            raise ValueError(f"augmentation must be 'paper', 'rrc' or 'center', got {mode!r}")
        self.base, self.crop, self.mode, self.scale, self.seed = base, crop, mode, scale, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from torchvision.transforms.v2 import functional as TF

        img, target = self.base[index]
        g = torch.Generator().manual_seed(mixed_seed(self.seed, self.epoch, index))
        if self.mode == "center":
            return TF.center_crop(img, self.crop), target
        if self.mode == "paper":
            choice = int(torch.randint(10, (1,), generator=g))
            top, left = ten_crop_boxes(img.shape[-1], self.crop)[choice % 5]
            out = img[:, top : top + self.crop, left : left + self.crop]
            return (out.flip(-1) if choice >= 5 else out).contiguous(), target
        top, left, h, w = _random_resized_box(img.shape[-2], img.shape[-1], self.scale, g)
        out = TF.resized_crop(img, top, left, h, w, [self.crop, self.crop], antialias=True)
        if torch.rand((), generator=g) < 0.5:
            out = out.flip(-1)
        return out.contiguous(), target


def mixed_seed(*values: int) -> int:
    """A 63-bit seed that depends on every value (run seed, epoch, index...), stable across runs."""
    digest = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def _random_resized_box(
    height: int, width: int, scale: tuple[float, float], g: torch.Generator, ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, driven by an explicit generator."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect = torch.exp(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]), generator=g)).item()
        w = int(round((target_area * aspect) ** 0.5))
        h = int(round((target_area / aspect) ** 0.5))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return top, left, h, w
    return 0, 0, height, width


def ten_crops(images: torch.Tensor, crop: int) -> torch.Tensor:
    """(N, C, S, S) -> (N, 10, C, crop, crop): the paper's 5 crops and their mirror images."""
    crops = [images[..., t : t + crop, l : l + crop] for t, l in ten_crop_boxes(images.shape[-1], crop)]
    stacked = torch.stack(crops, 1)
    return torch.cat([stacked, stacked.flip(-1)], 1)


def iter_batches(items: Sequence[Any], batch_size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]
