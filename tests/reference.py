"""An independent implementation of SPEC sections 2-3 and of the cell crops, for oracle tests.

It shares no code with scdino: plain zarr + JSON for the plate, scikit-image's ``regionprops`` for the nuclei and their
intensity-weighted centroids, numpy for crops and min-max scaling, scikit-image for the bilinear resize, ``torch.load``
for a checkpoint's teacher backbone, and a functional float64 ViT forward with explicit softmax attention.

The crop rule (docs/engine.md, "Cells"): an S x S window whose top-left corner is the rounded intensity-weighted
centroid (on the segmentation channel) minus S // 2, raw pixels, zero outside the field.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.nn.functional as F


def ome(path: str) -> dict:
    for name in ("zarr.json", ".zattrs"):
        p = os.path.join(path, name)
        if os.path.exists(p):
            attrs = json.load(open(p))
            attrs = attrs.get("attributes", attrs)
            return attrs.get("ome", attrs)
    raise FileNotFoundError(path)


def read_level0(path: str) -> np.ndarray:
    import zarr

    meta = ome(path)
    return zarr.open_array(os.path.join(path, meta["multiscales"][0]["datasets"][0]["path"]), mode="r")[...]


def fields(plate: str):
    """(well path, field path, field folder) of every field, in the plate's order."""
    for w in ome(plate)["plate"]["wells"]:
        for im in ome(os.path.join(plate, w["path"]))["well"]["images"]:
            yield w["path"], im["path"], os.path.join(plate, w["path"], im["path"])


def channel_names(field: str) -> list[str]:
    return [c["label"] for c in ome(field)["omero"]["channels"]]


def nuclei(labels: np.ndarray, seg: np.ndarray) -> list[tuple[int, float, float]]:
    """(label, weighted centroid y, x) of every labelled object, by scikit-image's regionprops, in label order."""
    from skimage.measure import regionprops

    return [(r.label, *map(float, r.centroid_weighted)) for r in regionprops(labels, intensity_image=seg)]


def cut(img: np.ndarray, cy: float, cx: float, crop: int) -> np.ndarray:
    """The (C, crop, crop) window on the rounded centre, zero outside the image."""
    y0, x0 = int(np.round(cy)) - crop // 2, int(np.round(cx)) - crop // 2
    out = np.zeros((img.shape[0], crop, crop), img.dtype)
    ys, xs = slice(max(y0, 0), min(y0 + crop, img.shape[1])), slice(max(x0, 0), min(x0 + crop, img.shape[2]))
    out[:, ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = img[:, ys, xs]
    return out


def plate_cells(plate: str, labels: str, seg_channel: int | str, crop: int, channels=None):
    """Yield (well, field, label, crop (C, crop, crop)) for every labelled nucleus, mass-centred on ``seg_channel``
    (index or name), zero-padded; ``channels`` (names) selects and orders the crop's channels (all by default)."""
    for well, field, path in fields(plate):
        img = read_level0(path)
        names = channel_names(path)
        seg = img[names.index(seg_channel) if isinstance(seg_channel, str) else seg_channel].astype(np.float64)
        keep = [names.index(c) for c in channels] if channels else list(range(len(names)))
        for lid, cy, cx in nuclei(read_level0(os.path.join(path, "labels", labels)), seg):
            yield well, field, int(lid), cut(img[keep], cy, cx, crop)


def teacher_backbone(path, key: str = "teacher") -> dict:
    """The ViT state dict of a DINO full checkpoint: ``key``'s ``backbone.*`` entries, prefix removed."""
    ck = torch.load(path, map_location="cpu", weights_only=False)[key]
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in ck.items() if "backbone." in k}


def preprocess(crop: np.ndarray, size: int) -> np.ndarray:
    from skimage.transform import resize

    out = []
    for ch in crop.astype(np.float64):
        lo, hi = ch.min(), ch.max()
        ch = (ch - lo) / (hi - lo) if hi > lo else np.zeros_like(ch)
        out.append(resize(ch, (size, size), order=1, mode="edge", anti_aliasing=False, preserve_range=True))
    return np.stack(out)


def adapt_mean(w: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack([w.mean(1)] * n, dim=1)


def vit_cls(sd: dict, x: np.ndarray, heads: int, size: int) -> np.ndarray:
    """CLS token of DINO's ViT, written out op by op in float64."""
    p = {k: v.double() for k, v in sd.items()}
    t = torch.from_numpy(x).double()[None]
    w = p["patch_embed.proj.weight"]
    patch = w.shape[-1]
    tok = F.conv2d(t, w, p["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    pos = p["pos_embed"]
    g_old, g_new = int(round((pos.shape[1] - 1) ** 0.5)), size // patch
    if g_old != g_new:
        grid = pos[:, 1:].reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, g_new * g_new, -1)], 1)
    h = torch.cat([p["cls_token"], tok], 1) + pos
    d = h.shape[-1]
    nblocks = 1 + max(int(k.split(".")[1]) for k in p if k.startswith("blocks."))

    def ln(v, pre):
        mu = v.mean(-1, keepdim=True)
        var = ((v - mu) ** 2).mean(-1, keepdim=True)
        return (v - mu) / torch.sqrt(var + 1e-6) * p[pre + ".weight"] + p[pre + ".bias"]

    for i in range(nblocks):
        b = f"blocks.{i}."
        y = ln(h, b + "norm1")
        qkv = y @ p[b + "attn.qkv.weight"].T + p[b + "attn.qkv.bias"]
        q, k, v = qkv.split(d, -1)
        split = lambda z: z.reshape(1, -1, heads, d // heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, -1)
        o = (a @ v).transpose(1, 2).reshape(1, -1, d)
        h = h + o @ p[b + "attn.proj.weight"].T + p[b + "attn.proj.bias"]
        y = ln(h, b + "norm2")
        y = y @ p[b + "mlp.fc1.weight"].T + p[b + "mlp.fc1.bias"]
        y = 0.5 * y * (1 + torch.erf(y / 2**0.5))
        h = h + y @ p[b + "mlp.fc2.weight"].T + p[b + "mlp.fc2.bias"]
    return ln(h, "norm")[0, 0].numpy()
