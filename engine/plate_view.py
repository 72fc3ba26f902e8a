"""``scdino-engine plate-view``: a plate at a glance, for failures and effects (empty wells, edge effects, out-of-focus
fields, treatments): plate-layout heatmaps of cells per well, of the share of border cells and of each well profile's
cosine distance from the control profile, and a 2-D map of the well profiles coloured by a metadata column."""

from __future__ import annotations

import json
import logging

import numpy as np

from scdino.engine.profiles import META, ProfileOptions, aggregate, control_mask, join_plate_map
from scdino.errors import ConfigError

log = logging.getLogger(__name__)

#: below this many wells the profile map is a PCA (UMAP needs more points than neighbours)
MIN_UMAP_WELLS = 16


def cosine_distance(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    rn = ref / max(float(np.linalg.norm(ref)), 1e-12)
    return 1.0 - xn @ rn


def profile_map(x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str, tuple[str, str]]:
    """2-D coordinates of well profiles: UMAP from :data:`MIN_UMAP_WELLS` wells up, else PCA (said in the title);
    with the axes' labels (a PCA's say the share of the variance of the standardised profiles each axis holds)."""
    z = (x - x.mean(0)) / np.maximum(x.std(0), 1e-12)
    if len(x) >= MIN_UMAP_WELLS:
        import warnings

        from umap import UMAP

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*n_jobs value.*overridden.*")
            nn = min(15, len(x) - 1)
            xy = UMAP(n_neighbors=nn, min_dist=0.3, random_state=seed).fit_transform(z)
            return xy, f"UMAP ({nn} neighbours)", ("UMAP 1", "UMAP 2")
    if len(x) < 3:
        xy = np.c_[np.arange(len(x), dtype=float), np.zeros(len(x))]
        return xy, "wells in order (too few for a map)", ("wells in order", "")
    u, s, _ = np.linalg.svd(z - z.mean(0), full_matrices=False)
    share = s**2 / max(float(np.sum(s**2)), 1e-300)
    labels = (f"PC 1 ({100 * share[0]:.1f}% of variance)", f"PC 2 ({100 * share[1]:.1f}% of variance)")
    return u[:, :2] * s[:2], f"PCA (fewer than {MIN_UMAP_WELLS} wells for UMAP)", labels


def plate_view(cells: str, out: str, opts: ProfileOptions = ProfileOptions(), color_by: str | None = None) -> dict:
    """Write the plate views of ``cells`` into the folder ``out``; returns what ``summary.json`` holds."""
    from scdino.engine.plots import plate_heatmap_png, scatter_labels_png
    from scdino.outputs import claim_dir

    outdir = claim_dir(out, "scdino-engine plate-view", inputs=[cells])
    prof = aggregate(cells, "well", opts.agg)
    if opts.metadata:
        prof = join_plate_map(prof, opts.metadata)
    ctrl = control_mask(prof, opts.controls, opts.control_key)
    colour = None
    if color_by:
        colour = color_by if color_by in prof else f"{META}{color_by}"
        if colour not in prof:
            meta = [c.removeprefix(META) for c in prof if c.startswith(META)]
            raise ConfigError(f"--color-by: no column {color_by!r}; metadata columns are {', '.join(meta)}")
    feats = [c for c in prof if not c.startswith(META)]
    summary: dict = {"cells": cells, "plates": {}}
    for plate, idx in prof.groupby(f"{META}Plate", sort=False).indices.items():
        p = prof.iloc[idx].reset_index(drop=True)
        wells = p[f"{META}Well"].tolist()
        n_cells = int(p[f"{META}Count_Cells"].sum())
        x = p[feats].to_numpy(np.float64)
        ref_rows = ctrl[idx]
        ref = x[ref_rows].mean(0) if ref_rows.any() else x.mean(0)
        ref_name = "control wells" if (opts.controls or opts.control_key) and ref_rows.any() else "all wells"
        dist = cosine_distance(x, ref)
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(plate))
        head = f"plate {plate}: {n_cells} cells in {len(wells)} wells"
        files = {}
        files["cells"] = str(outdir / f"{safe}_cells_per_well.png")
        plate_heatmap_png(dict(zip(wells, p[f"{META}Count_Cells"])), files["cells"], f"{head}\ncells per well", "cells")
        if f"{META}Border_Fraction" in p:
            files["border"] = str(outdir / f"{safe}_border_fraction.png")
            plate_heatmap_png(
                dict(zip(wells, p[f"{META}Border_Fraction"])),
                files["border"],
                f"{head}\nshare of cells whose crop leaves the field",
                "border share",
                cmap="magma",
            )
        files["distance"] = str(outdir / f"{safe}_distance_from_controls.png")
        plate_heatmap_png(
            dict(zip(wells, dist)),
            files["distance"],
            f"{head}\ncosine distance of each well's {opts.agg} profile from the mean of {ref_name}",
            "cosine distance",
            cmap="inferno",
        )
        xy, how, axis_labels = profile_map(x)
        files["map"] = str(outdir / f"{safe}_profiles_map.png")
        labels = p[colour].astype(str).tolist() if colour else ["control" if c else "well" for c in ref_rows]
        scatter_labels_png(
            xy,
            labels,
            wells,
            files["map"],
            f"{head}\nwell profiles, {how}; colour: {color_by or 'controls'}",
            axis_labels,
        )
        summary["plates"][str(plate)] = {
            "cells": n_cells,
            "wells": {
                w: {"cells": int(c), "distance_from_controls": float(d)}
                for w, c, d in zip(wells, p[f"{META}Count_Cells"], dist)
            },
            "reference": ref_name,
            "map": how,
            "figures": files,
        }
    (outdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
