"""Multi-crop augmentation for microscopy (SPEC section 5), batched on the device.

Each channel is a grey image: no colour jitter. For every crop of every view: random resized crop (area scale range,
aspect ratio ``aspect_ratio``, 3/4..4/3 as DINO by default; a box that does not fit is drawn again, never clamped
and stretched; with ``centre_views`` every view keeps the crop's centre, the cell, in its middle half)
resampled bilinearly to the view size, horizontal and vertical flips, a rotation by a random angle up to
``rotation`` degrees either way (off by default; cells in flow cytometry have no orientation), brightness scaled per
channel (or by one factor per view, ``brightness_per_channel=False``), gaussian blur, solarisation (global view 2),
then per-channel mean/std normalisation. Intensities are scaled first, per crop (min-max, the paper) or by the
training set's fixed per-channel range (``intensity_scaling=dataset``).

Randomness comes from a generator seeded by (seed, epoch, iteration) and is drawn for the *global* batch, of which
each DDP rank takes its slice: one process with batch 2B and two with batch B see identical views, and a resumed run
repeats exactly the views of an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scdino.preprocess import scale_intensity


@dataclass(frozen=True)
class ViewSpec:
    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float = 0.0


def views_of(cfg) -> list[ViewSpec]:
    """2 global views then ``local_crops`` local views, with the recipe's probabilities."""
    g1 = ViewSpec(cfg.global_size, tuple(cfg.global_scale), cfg.blur_p[0])
    g2 = ViewSpec(cfg.global_size, tuple(cfg.global_scale), cfg.blur_p[1], cfg.solarize_p)
    loc = ViewSpec(cfg.local_size, tuple(cfg.local_scale), cfg.blur_p[2])
    return [g1, g2] + [loc] * cfg.local_crops


def make_generator(seed: int, epoch: int, it: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + epoch) * 1_000_033 + it)
    return g


def _uniform(g: torch.Generator, n: int, lo: float, hi: float, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def crop_params(
    g: torch.Generator,
    n: int,
    scale: tuple[float, float],
    device,
    centred: bool = False,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> torch.Tensor:
    """(n, 4) random resized crop boxes (half-width, half-height, centre x, centre y, in grid units: the image spans
    -1..1), drawn as torchvision's RandomResizedCrop draws them: an area fraction in ``scale`` and a log-uniform aspect
    ratio in ``ratio``, up to ``attempts`` tries for a box that fits inside the crop, else the whole crop (torchvision
    then takes a centred box clamped to the ratio range; the two agree whenever the range holds 1, as every default
    does). A box is never clamped, so the only change of aspect is the drawn ratio (``ratio=(1, 1)``: none). ``centred``: each box
    keeps the image centre (the cell of a cell-centred crop) in its middle half."""
    area = torch.rand(attempts, n, generator=g, device=device) * (scale[1] - scale[0]) + scale[0]
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    r = (torch.rand(attempts, n, generator=g, device=device) * (hi - lo) + lo).exp()
    w_try, h_try = (area * r).sqrt(), (area / r).sqrt()
    fits = (w_try <= 1) & (h_try <= 1)
    first = fits.to(torch.uint8).argmax(0, keepdim=True)  # the first box that fits
    found = fits.any(0)
    w = torch.where(found, w_try.gather(0, first)[0], torch.ones_like(area[0]))
    h = torch.where(found, h_try.gather(0, first)[0], torch.ones_like(area[0]))
    sx, sy = (1 - w, 1 - h) if not centred else (torch.minimum(1 - w, w / 2), torch.minimum(1 - h, h / 2))
    cx = (torch.rand(n, generator=g, device=device) * 2 - 1) * sx
    cy = (torch.rand(n, generator=g, device=device) * 2 - 1) * sy
    return torch.stack([w, h, cx, cy], 1)


def _affine(
    box: torch.Tensor, flip_x: torch.Tensor, flip_y: torch.Tensor, angle: torch.Tensor | None = None
) -> torch.Tensor:
    """Sampling grids' affine maps: scale and flip the output grid, rotate it by ``angle`` (radians) about the box
    centre, then move it to the box centre."""
    w, h, cx, cy = box.unbind(1)
    sx = w * torch.where(flip_x, -1.0, 1.0)
    sy = h * torch.where(flip_y, -1.0, 1.0)
    theta = torch.zeros(len(box), 2, 3, device=box.device)
    if angle is None:
        theta[:, 0, 0] = sx
        theta[:, 1, 1] = sy
    else:
        cos, sin = angle.cos(), angle.sin()
        theta[:, 0, 0], theta[:, 0, 1] = cos * sx, -sin * sy
        theta[:, 1, 0], theta[:, 1, 1] = sin * sx, cos * sy
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    return theta


def gaussian_blur(
    x: torch.Tensor, sigma: torch.Tensor, apply: torch.Tensor, max_sigma: float | None = None
) -> torch.Tensor:
    """Blur each sample with its own sigma (where ``apply``), each channel separately. The kernel radius is
    3 x ``max_sigma`` (default: the largest sigma given), the same whichever samples a process holds."""
    b, c, h, w = x.shape
    if not bool(apply.any()):
        return x
    radius = int(math.ceil(3 * (max_sigma if max_sigma is not None else float(sigma.max()))))
    radius = min(radius, h - 1, w - 1)
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)
    delta = (t == 0).to(x.dtype)[None].expand(b, -1)
    k = torch.where(apply[:, None], k, delta)
    k = k.repeat_interleave(c, 0)  # (b*c, taps)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=b * c)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=b * c)
    return y.reshape(b, c, h, w)


class MultiCrop:
    """Raw crops (B, C, S, S) -> list of normalised views, global views first."""

    def __init__(
        self,
        cfg,
        mean: torch.Tensor,
        std: torch.Tensor,
        scale_lo: torch.Tensor | None = None,
        scale_hi: torch.Tensor | None = None,
    ) -> None:
        self.cfg = cfg
        self.views = views_of(cfg)
        self.mean = mean.view(1, -1, 1, 1)
        self.std = std.view(1, -1, 1, 1)
        self.scale_lo, self.scale_hi = scale_lo, scale_hi

    def __call__(
        self, raw: torch.Tensor, g: torch.Generator, n_global: int | None = None, offset: int = 0
    ) -> list[torch.Tensor]:
        """Views of ``raw``. Parameters are drawn for ``n_global`` crops (the global batch; default ``len(raw)``) and
        this process uses rows ``offset .. offset + len(raw)`` of them."""
        cfg = self.cfg
        dev = raw.device
        x = scale_intensity(raw, self.scale_lo, self.scale_hi)
        n_total = n_global or len(x)
        sl = slice(offset, offset + len(x))
        out = []
        for v in self.views:
            box = crop_params(g, n_total, v.scale, dev, cfg.centre_views, tuple(cfg.aspect_ratio))
            fx = torch.rand(n_total, generator=g, device=dev) < cfg.flip_p
            fy = torch.rand(n_total, generator=g, device=dev) < cfg.flip_p
            bright = _uniform(g, n_total * x.shape[1], cfg.brightness[0], cfg.brightness[1], dev).view(n_total, -1)
            if not cfg.brightness_per_channel:  # the same draws, the first channel's factor for every channel
                bright = bright[:, :1].expand_as(bright)
            do_bright = torch.rand(n_total, generator=g, device=dev) < cfg.brightness_p
            sigma = _uniform(g, n_total, cfg.blur_sigma[0], cfg.blur_sigma[1], dev)
            do_blur = torch.rand(n_total, generator=g, device=dev) < v.blur_p
            do_sol = torch.rand(n_total, generator=g, device=dev) < v.solarize_p
            angle = None
            if cfg.rotation:  # drawn only when asked: runs without rotation keep their views
                angle = _uniform(g, n_total, -cfg.rotation, cfg.rotation, dev).deg2rad()[sl]
            theta = _affine(box[sl], fx[sl], fy[sl], angle)
            grid = F.affine_grid(theta, [len(x), x.shape[1], v.size, v.size], align_corners=False)
            y = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
            factor = torch.where(do_bright[sl, None], bright[sl], torch.ones_like(bright[sl]))
            y = (y * factor[:, :, None, None]).clamp(0, 1)
            y = gaussian_blur(y, sigma[sl], do_blur[sl], cfg.blur_sigma[1])
            y = torch.where(do_sol[sl, None, None, None] & (y > 0.5), 1 - y, y)
            out.append((y - self.mean) / self.std)
        return out


def intensity_range(
    raw: torch.Tensor, percentiles: tuple[float, float], max_crops: int = 2048, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (low, high) percentiles of the pixels of the training crops (of a seeded sample of at most
    ``max_crops`` crops): the fixed range of ``intensity_scaling=dataset``. The same in every DDP rank."""
    import numpy as np

    if len(raw) > max_crops:
        g = torch.Generator()
        g.manual_seed(seed)
        raw = raw[torch.randperm(len(raw), generator=g)[:max_crops].sort().values]
    px = raw.transpose(0, 1).reshape(raw.shape[1], -1).double().numpy()
    lo, hi = np.percentile(px, percentiles, axis=1)
    return torch.from_numpy(lo).float(), torch.from_numpy(hi).float()


def channel_stats(
    raw: torch.Tensor,
    chunk: int = 4096,
    scale_lo: torch.Tensor | None = None,
    scale_hi: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of intensity-scaled training crops (stored with the model)."""
    s = torch.zeros(raw.shape[1], dtype=torch.float64)
    s2 = torch.zeros_like(s)
    n = 0
    for a in range(0, len(raw), chunk):
        x = scale_intensity(raw[a : a + chunk], scale_lo, scale_hi).double()
        s += x.sum((0, 2, 3))
        s2 += (x * x).sum((0, 2, 3))
        n += x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(1e-12).sqrt()
    return mean.float(), std.float().clamp_min(1e-3)
