"""The image's parameterisation (Olah et al. 2017; Lucid's ``fft_image`` and ``to_valid_rgb``): the
free parameters ``z`` are, per colour channel, the real and imaginary parts of the image's half
spectrum (``torch.fft.rfft2``, orthonormal), and

    x = sigmoid( M . irfft2( s * z ) / 4 ),   s(f) = 1 / max(|f|, 1 / max(H, W))

with ``|f|`` a frequency's magnitude in cycles per pixel and ``M`` Lucid's colour decorrelation (see
the package docstring). ``FourierImage.inverse`` maps an image back to parameters."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["COLOR_CORRELATION_SVD_SQRT", "FourierImage", "color_matrix"]

# Lucid's colour decorrelation: the square root (SVD factor) of ImageNet's RGB colour covariance
COLOR_CORRELATION_SVD_SQRT = np.asarray(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=np.float32
)


def color_matrix() -> torch.Tensor:
    """``M``: the decorrelation matrix, its columns scaled to a largest norm of 1 (Lucid's)."""
    m = torch.from_numpy(COLOR_CORRELATION_SVD_SQRT)
    return m / m.norm(dim=0).max()


class FourierImage:
    """The parameterisation of the module docstring for (N, 3, H, W) images: ``image(z)`` and its
    inverse. ``fourier=False``: ``z`` is the pre-sigmoid pixels themselves (``decorrelate`` still
    applies)."""

    MAGIC = 4.0  # Lucid's divisor of the inverse FFT's output

    def __init__(
        self, size: tuple[int, int], fourier: bool = True, decorrelate: bool = True, decay_power: float = 1.0
    ) -> None:
        self.size = (int(size[0]), int(size[1]))
        self.fourier = fourier
        self.decorrelate = decorrelate
        h, w = self.size
        freqs = torch.sqrt(torch.fft.fftfreq(h)[:, None] ** 2 + torch.fft.rfftfreq(w)[None, :] ** 2)
        self.scale = 1.0 / freqs.clamp_min(1.0 / max(h, w)) ** decay_power  # (H, W // 2 + 1)
        self.color = color_matrix()

    def shape(self, n: int) -> tuple[int, ...]:
        """The parameters' shape for ``n`` images."""
        h, w = self.size
        return (n, 3, h, w // 2 + 1, 2) if self.fourier else (n, 3, h, w)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """The pre-sigmoid image (N, 3, H, W)."""
        if self.fourier:
            spectrum = torch.view_as_complex(z.contiguous()) * self.scale.to(z.device)
            x = torch.fft.irfft2(spectrum, s=self.size, norm="ortho") / self.MAGIC
        else:
            x = z
        if self.decorrelate:
            x = torch.einsum("ij,njhw->nihw", self.color.to(x), x)
        return x

    def image(self, z: torch.Tensor) -> torch.Tensor:
        """The (N, 3, H, W) image in [0, 1] of parameters ``z``."""
        return torch.sigmoid(self.logits(z))

    def inverse(self, image: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        """Parameters whose image is ``image`` (N, 3, H, W), values clamped to [eps, 1 - eps]."""
        x = torch.logit(image.double().clamp(eps, 1 - eps))
        if self.decorrelate:
            x = torch.einsum("ij,njhw->nihw", torch.linalg.inv(self.color.double()), x)
        if not self.fourier:
            return x.float()
        spectrum = torch.fft.rfft2(x * self.MAGIC, norm="ortho") / self.scale.double().to(x.device)
        return torch.view_as_real(spectrum).float().contiguous()
