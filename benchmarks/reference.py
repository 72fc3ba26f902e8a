"""The engine against the authors' approach, side by side in one run, with the machine's practical fp32 peak.

The reference is the scDINO authors' feature extraction rebuilt for comparison only (SPEC section 7), not their code:
one TIFF per cell read from disk, per-image and per-channel min-max on the CPU, a bilinear resize to the input size
on the CPU, an eager fp32 ViT with explicit softmax attention (written out below: patch embedding, CLS token, position
embedding, pre-norm blocks, final LayerNorm), batches of 24, features gathered in memory. Its weights are the ones the
engine runs (the same checkpoint, adapted to the plate's channels the same way), so the two must give the same
embeddings (cosine >= 0.999 per cell).

Cells: every nucleus of the neocortex sample plate's ``--wells`` (default A/1, 235 cells), found and cut by the
engine; the reference reads them from TIFFs written beforehand (not timed: the authors' input). Model: a ViT-S/16
checkpoint at 224 px, DINO's backbone layout (random weights: speed does not depend on their values;
``--checkpoint`` takes a real one).

Timed, each the median of ``--repeats`` whole commands (a new process each: interpreter, imports, weights, cells,
features) after one warm-up run (so the export cache is warm; the cold first run, which exports and verifies, is
reported on its own):

- the reference, as a command of its own (this script with ``--reference-run``): the baseline of every ratio; its
  loop alone (in this process, weights already loaded: no start-up) is shown beside it;
- ``scdino-engine run`` with defaults (``--precision auto``: the cached export's int8 copy where every one of 32 check
  crops keeps cosine >= 0.999 to fp32, else the fp32 path; the check is read from ``uns``);
- ``--precision fp32`` (the cached, verified ONNX export when it measures faster, else PyTorch);
- ``--no-export-cache --precision fp32`` (PyTorch);
- ``--precision int8`` (the cached export's dynamic int8 copy);
- ``--fast`` (int8 at half the input size).

The practical peak: a 2048 x 2048 fp32 matrix product through torch (all cores), median of 20.

    python benchmarks/reference.py [--repeats 3] [--checkpoint FILE] [--out benchmarks/results/reference.json]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from harness import write_results

SEG = ["--segment-channel", "CTIP2,BRN2,ROR", "--sigma", "1", "--min-distance", "4", "--min-area", "15"]
CROP = 32
BATCH = 24


# ----------------------------------------------------------------------------------------------- the reference ViT
class RefViT(torch.nn.Module):
    """DINO's ViT forward, written out with explicit softmax attention, from a backbone state dict."""

    def __init__(self, sd: dict, heads: int, patch: int) -> None:
        super().__init__()
        self.sd = {k: v.float() for k, v in sd.items()}
        self.heads, self.patch = heads, patch
        self.depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))

    def _ln(self, x, name):
        return F.layer_norm(x, x.shape[-1:], self.sd[f"{name}.weight"], self.sd[f"{name}.bias"], 1e-6)

    def _lin(self, x, name):
        return x @ self.sd[f"{name}.weight"].T + self.sd[f"{name}.bias"]

    def forward(self, x):
        sd = self.sd
        x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=self.patch)
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([sd["cls_token"].expand(len(x), -1, -1), x], 1) + sd["pos_embed"]
        b, n, c = x.shape
        h = self.heads
        for i in range(self.depth):
            p = f"blocks.{i}"
            y = self._ln(x, f"{p}.norm1")
            qkv = self._lin(y, f"{p}.attn.qkv").reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            attn = ((q @ k.transpose(-2, -1)) * (c // h) ** -0.5).softmax(-1)
            x = x + self._lin((attn @ v).transpose(1, 2).reshape(b, n, c), f"{p}.attn.proj")
            y = self._ln(x, f"{p}.norm2")
            x = x + self._lin(F.gelu(self._lin(y, f"{p}.mlp.fc1")), f"{p}.mlp.fc2")
        return self._ln(x, "norm")[:, 0]


def reference(files: list[Path], vit: RefViT, size: int, mean, std) -> np.ndarray:
    """The authors' approach: TIFF per cell, min-max per image and channel, CPU resize, eager ViT, batches of 24."""
    import tifffile

    feats = []
    with torch.inference_mode():
        for a in range(0, len(files), BATCH):
            imgs = []
            for f in files[a : a + BATCH]:
                im = tifffile.imread(f).astype(np.float32)  # (C, S, S)
                lo = im.reshape(len(im), -1).min(1)[:, None, None]
                hi = im.reshape(len(im), -1).max(1)[:, None, None]
                im = np.where(hi > lo, (im - lo) / np.where(hi > lo, hi - lo, 1), 0)
                t = F.interpolate(torch.from_numpy(im)[None], size=(size, size), mode="bilinear", align_corners=False)
                if mean is not None:
                    t = (t - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
                imgs.append(t)
            feats.append(vit(torch.cat(imgs)).numpy())
    return np.concatenate(feats)


# ------------------------------------------------------------------------------------------------------- helpers
def sgemm_peak(n: int = 2048, repeats: int = 20) -> float:
    """fp32 GFLOP/s of an n x n matrix product (torch, this process's threads), median of ``repeats``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / float(np.median(times)) / 1e9


def vit_gflop(depth: int, dim: int, patch: int, size: int, chans: int, mlp: float = 4.0) -> float:
    """Multiply-adds x 2 of one forward pass (matrix products only)."""
    t = (size // patch) ** 2 + 1
    macs = (t - 1) * chans * patch * patch * dim
    macs += depth * (t * dim * 3 * dim + 2 * t * t * dim + t * dim * dim + 2 * t * dim * int(mlp * dim))
    return 2 * macs / 1e9


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def timed(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t


def reference_command(workdir: str, threads: int) -> None:
    """The reference as a command of its own, as the authors run theirs: a new process that loads the weights, reads
    the TIFFs listed in ``workdir``, embeds them and saves the features (``features.npy``)."""
    torch.set_num_threads(threads)
    w = torch.load(Path(workdir) / "weights.pth", map_location="cpu", weights_only=True)
    files = [Path(p) for p in (Path(workdir) / "files.txt").read_text().split()]
    vit = RefViT(w["state_dict"], int(w["heads"]), int(w["patch"]))
    np.save(Path(workdir) / "features.npy", reference(files, vit, int(w["size"]), w["mean"], w["std"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference-run", metavar="DIR", help=argparse.SUPPRESS)  # the reference's own process
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--checkpoint", help="a ViT-S/16 checkpoint (default: random weights in DINO's layout)")
    ap.add_argument("--wells", default="A/1", help="wells of the sample plate to embed (A/1: 235 cells; A/1,A/2: 604)")
    ap.add_argument("--threads", type=int, help="threads of every path and of the peak (default: all cores)")
    ap.add_argument("--out", default="benchmarks/results/reference.json")
    args = ap.parse_args()
    threads = args.threads or os.cpu_count() or 1
    if args.reference_run:
        reference_command(args.reference_run, threads)
        return
    torch.set_num_threads(threads)
    import anndata as ad
    import tifffile

    from scdino.cells.options import CellOptions
    from scdino.cells.source import open_source
    from scdino.engine.sample import write_sample_plate
    from scdino.models import arch_config, build_model, load_model

    tmp = Path(tempfile.mkdtemp(prefix="scdino-reference-"))
    env = {**os.environ, "SCDINO_CACHE_DIR": str(tmp / "cache")}
    plate = write_sample_plate(tmp / "neocortex.zarr", "neocortex")
    ckpt = args.checkpoint
    if ckpt is None:
        torch.manual_seed(0)
        ckpt = str(tmp / "vit_small16.pth")
        torch.save(build_model(arch_config("vit_small16")).state_dict(), ckpt)
    lm = load_model(ckpt, 3)
    size, cfg = lm.prep.input_size, lm.model.cfg
    run = [sys.executable, "-m", "scdino.engine", "run", plate, *SEG, "--crop-size", str(CROP), "--no-progress"]
    run += ["--threads", str(threads), "--wells", args.wells]

    def engine(name: str, *extra: str, model: str = ckpt) -> tuple[float, Path]:
        out = tmp / f"{name}.zarr"
        cmd = [*run, "--model", model, "--out", str(out), "--overwrite", *extra]
        timed(cmd, env)  # warm-up (and, for the default, the export into the cache)
        return float(np.median([timed(cmd, env) for _ in range(args.repeats)])), out

    # the cold first run of the default path: export + verification + side-by-side timing, then the run
    cold = timed([*run, "--model", ckpt, "--out", str(tmp / "cold.zarr")], env)
    obs = ad.read_zarr(tmp / "cold.zarr")
    n = obs.n_obs
    # the reference's input: one TIFF per cell, cut exactly as the engine cuts them (not timed)
    source = open_source(
        plate, CellOptions(segment_channel="CTIP2,BRN2,ROR", crop_size=CROP, wells=tuple(args.wells.split(",")))
    )
    table = obs.obs.reset_index(drop=True)
    crops = source.read(table[list(source.read_columns)])
    files = []
    for i, c in enumerate(crops):
        files.append(tmp / "cells" / f"cell{i:05d}.tif")
        files[-1].parent.mkdir(exist_ok=True)
        tifffile.imwrite(files[-1], c)
    vit = RefViT(lm.model.state_dict(), cfg.num_heads, cfg.patch_size)
    reference(files[:BATCH], vit, size, lm.prep.mean, lm.prep.std)  # warm-up
    ref_times, ref = [], None
    for _ in range(args.repeats):
        t = time.perf_counter()
        ref = reference(files, vit, size, lm.prep.mean, lm.prep.std)
        ref_times.append(time.perf_counter() - t)
    # the reference as a whole command, like every engine path: its weights are the adapted ones (an N-channel
    # checkpoint of the authors' kind), the TIFFs as above
    work = tmp / "reference"
    work.mkdir()
    (work / "files.txt").write_text("\n".join(map(str, files)))
    weights = {"state_dict": lm.model.state_dict(), "heads": cfg.num_heads, "patch": cfg.patch_size, "size": size}
    torch.save({**weights, "mean": lm.prep.mean, "std": lm.prep.std}, work / "weights.pth")
    ref_cmd = [sys.executable, __file__, "--reference-run", str(work), "--threads", str(threads)]
    timed(ref_cmd, env)
    ref_s = float(np.median([timed(ref_cmd, env) for _ in range(args.repeats)]))
    if float(cosine(np.load(work / "features.npy"), ref).min()) < 0.999999:
        raise SystemExit("the reference command and the reference loop disagree")
    peak = sgemm_peak()
    gflop = vit_gflop(cfg.depth, cfg.embed_dim, cfg.patch_size, size, cfg.in_chans)
    rows = [
        {"path": "reference (authors' approach), whole command", "seconds": ref_s},
        {"path": "reference, its loop alone (no start-up)", "seconds": float(np.median(ref_times))},
    ]
    default_s, default_out = engine("default")
    rows.append({"path": "scdino-engine run (defaults: --precision auto)", "seconds": default_s, "out": default_out})
    s, o = engine("fp32", "--precision", "fp32")
    rows.append({"path": "--precision fp32 (cached ONNX export or PyTorch, fp32)", "seconds": s, "out": o})
    torch_s, torch_out = engine("torch", "--no-export-cache", "--precision", "fp32")
    rows.append({"path": "--no-export-cache (PyTorch)", "seconds": torch_s, "out": torch_out})
    cached = ad.read_zarr(default_out).uns["scdino"]["path"]
    s, o = engine("int8", "--precision", "int8")
    rows.append({"path": "--precision int8 (cached dynamic int8)", "seconds": s, "out": o})
    s, o = engine("fast", "--fast")
    rows.append({"path": f"--fast (int8 at {size // 2} px)", "seconds": s, "out": o})
    base = None
    for r in rows:
        r["cells_per_s"] = n / r["seconds"]
        r["vs_reference"] = ref_s / r["seconds"]
        r["gflops"] = r["cells_per_s"] * gflop
        if "out" in r:
            emb = ad.read_zarr(r.pop("out")).obsm["X_scdino"]
            r["min_cosine_to_reference"] = float(cosine(emb, ref).min()) if emb.shape == ref.shape else None
            if r["path"].startswith("scdino-engine run"):
                base = emb
            elif base is not None and emb.shape == base.shape:
                r["min_cosine_to_default"] = float(cosine(emb, base).min())
    print(
        f"\n{n} cells of the neocortex sample plate ({args.wells}), ViT-S/16 at {size} px, "
        f"{gflop:.2f} GFLOP per cell; practical fp32 peak (sgemm 2048) {peak:.0f} GFLOP/s; "
        f"{threads} thread(s) on {os.cpu_count()} cores; medians of {args.repeats} whole commands\n"
    )
    print("| path | s | cells/s | x reference | fp32-equivalent GFLOP/s (% of peak) | min cosine to reference |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cos = r.get("min_cosine_to_reference")
        print(
            f"| {r['path']} | {r['seconds']:.1f} | {r['cells_per_s']:.1f} | {r['vs_reference']:.2f} | "
            f"{r['gflops']:.0f} ({100 * r['gflops'] / peak:.0f}%) | {'' if cos is None else f'{cos:.6f}'} |"
        )
    print(f"\ncold first run of the default path (export, verification, timing, run): {cold:.1f} s")
    print(f"the default's precision check: {cached.get('precision_check')}")
    res = {
        "benchmark": "reference",
        "cells": n,
        "wells": args.wells,
        "model": {"arch": "vit_small16", "input_size": size, "gflop_per_cell": gflop, "checkpoint": args.checkpoint},
        "sgemm_gflops": peak,
        "cold_default_seconds": cold,
        "default_path": cached,
        "rows": rows,
        "repeats": args.repeats,
        "threads": threads,
    }
    write_results(args.out, res)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
