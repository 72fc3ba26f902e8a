"""From cells to a screen: per-well (or per-field) profiles, normalised against controls, in files profiling tools read.

* :func:`profiles`: aggregate each well's cells (median or mean of their embeddings), add the cell count and per-well
  metadata (a plate map CSV keyed by well), normalise per plate against control wells (``standardise``: mean / std;
  ``robust``: median / MAD x 1.4826, the robust z-score), write parquet (pyarrow). Metadata columns are prefixed
  ``Metadata_`` (pycytominer's and CytoTable's convention), wells are written ``A01`` (CellProfiler's form, and that of
  most plate maps: pycytominer's ``annotate`` matches wells exactly); features are ``Cells_scdino_0000``,
  ``Cells_scdino_0001``, ...: the ``Cells_`` compartment prefix is how pycytominer's ``normalize``, ``feature_select``
  and ``aggregate`` find features by default (the embedding describes the whole crop around a cell).
* :func:`export_cells`: every cell, metadata and embedding, streamed into parquet row groups.
* :func:`replicate_consistency`: for a treatment column, the share of treatments whose replicate wells are more alike
  than random groups of wells of the same size (the 95th percentile of that null).

Embeddings are read from the store in blocks of rows, so memory is flat in the number of cells: means are running
sums; medians are taken a group at a time over the store's rows in group order (a well's cells are contiguous in a
run's output, so that is one pass).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd

from scdino.bounds import Bound, check, declare
from scdino.cells.plate import canonical_well
from scdino.engine.output import run_source
from scdino.errors import ConfigError, InputError

log = logging.getLogger(__name__)

declare(null_draws=Bound("random well groups in the null", low=1, integer=True))

KEY = "X_scdino"
META = "Metadata_"
#: robust z-score: the MAD scaled to a normal distribution's standard deviation
MAD_SCALE = 1.4826
#: rows of the embedding matrix read at a time
BLOCK = 16384
AGGREGATES = ("median", "mean")
NORMALISATIONS = ("none", "standardise", "robust")


#: feature columns: a CellProfiler compartment (pycytominer infers features by ``Cells_``, ``Cytoplasm_``, ``Nuclei_``)
FEATURE_PREFIX = "Cells_scdino_"


def feature_names(dim: int) -> list[str]:
    return [f"{FEATURE_PREFIX}{i:04d}" for i in range(dim)]


def well_id(well: str) -> str:
    """``A/1``, ``A/01``, ``A1``, ``a01`` -> ``A01``: ``Metadata_Well`` of profiles and exported cells. CellProfiler
    names wells so, and so do most plate maps; pycytominer's ``annotate`` joins on the exact string."""
    row, col = canonical_well(well).split("/")
    return f"{row}{int(col):02d}"


# ---------------------------------------------------------------------------------------------- reading the store


def _store(path: str):
    import zarr

    from scdino.engine.output import finished_status

    finished_status(path)
    g = zarr.open_group(path, mode="r", use_consolidated=False)
    if "obsm" not in g or KEY not in g["obsm"]:
        raise InputError(f"{path}: no obsm/{KEY}; expected an embeddings store of 'scdino-engine run'")
    return g


def cell_metadata(path: str, columns: Sequence[str]) -> pd.DataFrame:
    """The ``columns`` of an embeddings store's cell table (those it has), without the embeddings."""
    from anndata.io import read_elem

    g = _store(path)["obs"]
    return pd.DataFrame({c: read_elem(g[c]) for c in columns if c in g})


def metadata_blocks(path: str, block: int = BLOCK) -> Iterator[pd.DataFrame]:
    """The cell table, ``block`` rows at a time, read column by column from the store (never all cells at once)."""
    from anndata.io import read_elem

    store = _store(path)
    g = store["obs"]
    names = [c for c in g.attrs.get("column-order", []) if c in g]
    n = int(store["obsm"][KEY].shape[0])
    categories = {c: read_elem(g[c]["categories"]) for c in names if hasattr(g[c], "keys") and "codes" in g[c]}
    for a in range(0, n, block):
        cols = {}
        for c in names:
            if c in categories:
                cols[c] = pd.Categorical.from_codes(np.asarray(g[c]["codes"][a : a + block]), categories[c])
            else:
                cols[c] = np.asarray(g[c][a : a + block])
        yield pd.DataFrame(cols)


def embedding_blocks(path: str, rows: np.ndarray | None = None, block: int = BLOCK) -> Iterator[np.ndarray]:
    """The embeddings, ``block`` rows at a time (all rows in order, or ``rows`` in the given order)."""
    x = _store(path)["obsm"][KEY]
    if rows is None:
        for a in range(0, x.shape[0], block):
            yield np.asarray(x[a : a + block], dtype=np.float32)
        return
    for a in range(0, len(rows), block):
        idx = rows[a : a + block]
        if len(idx) and np.all(np.diff(idx) == 1):
            yield np.asarray(x[int(idx[0]) : int(idx[-1]) + 1], dtype=np.float32)
        else:
            yield np.asarray(x.oindex[idx, :], dtype=np.float32)


# ------------------------------------------------------------------------------------------------ aggregation


def group_keys(obs: pd.DataFrame, by: str, source: dict | None = None) -> list[str]:
    """The columns cells are grouped by; ``source``: what the run recorded of its cell source (its capabilities)."""
    if by not in ("well", "field"):
        raise ConfigError(f"--by {by!r}: expected well or field")
    if source and "wells" not in source.get("capabilities", ()):
        raise InputError(
            f"the cells come from a {source.get('kind')} ({source.get('path')}), which has no wells: profiles need "
            "cells of plate wells (a run on an OME-Zarr plate or a LoadData CSV)"
        )
    keys = ["plate", "well"] + (["field"] if by == "field" else [])
    missing = [k for k in keys if k not in obs]
    if missing:
        raise InputError(
            f"the cell table has no {', '.join(missing)} column: profiles need cells of plate wells (a run on an "
            "OME-Zarr plate or a LoadData CSV), not of a crop store"
        )
    return keys


def aggregate(path: str, by: str = "well", agg: str = "median", block: int = BLOCK) -> pd.DataFrame:
    """One row per well (or field): its plate/well(/field), cell count, border-cell share and aggregated embedding."""
    if agg not in AGGREGATES:
        raise ConfigError(f"--agg {agg!r}: expected {' or '.join(AGGREGATES)}")
    obs = cell_metadata(path, ["plate", "well", "field", "border"])
    keys = group_keys(obs, by, run_source(path))
    codes = obs.groupby(keys, sort=False, observed=True).ngroup().to_numpy()
    meta = obs[keys].iloc[np.unique(codes, return_index=True)[1]].astype(str).reset_index(drop=True)
    meta["well"] = meta["well"].map(well_id)  # B/03 and B/3 are one well B03, whichever form the plate uses
    n_groups = len(meta)
    dim = int(_store(path)["obsm"][KEY].shape[1])
    counts = np.bincount(codes, minlength=n_groups)
    border = (
        np.bincount(codes, weights=obs["border"].astype(float).to_numpy(), minlength=n_groups)
        if "border" in obs
        else None
    )
    values = np.zeros((n_groups, dim), np.float64)
    if agg == "mean":
        from scipy.sparse import csr_matrix

        a = 0
        for x in embedding_blocks(path, block=block):
            c = codes[a : a + len(x)]
            onehot = csr_matrix((np.ones(len(x)), (c, np.arange(len(x)))), shape=(n_groups, len(x)))
            values += onehot @ x.astype(np.float64)  # each group's sum over this block
            a += len(x)
        values /= np.maximum(counts, 1)[:, None]
    else:
        order = np.argsort(codes, kind="stable")  # each group's rows together (already so in a run's output)
        sorted_codes = codes[order]
        pending: list[np.ndarray] = []
        current, a = None, 0
        for x in embedding_blocks(path, order, block=block):
            c = sorted_codes[a : a + len(x)]
            a += len(x)
            cuts = np.flatnonzero(np.diff(c)) + 1
            for part, code in zip(np.split(x, cuts), c[np.r_[0, cuts]]):
                if current is not None and code != current:
                    values[current] = np.median(np.concatenate(pending), axis=0)
                    pending = []
                current = code
                pending.append(part)
        if current is not None:
            values[current] = np.median(np.concatenate(pending), axis=0)
    out = pd.DataFrame({f"{META}{k.capitalize()}": meta[k] for k in keys})
    out[f"{META}Count_Cells"] = counts
    if border is not None:
        out[f"{META}Border_Fraction"] = border / np.maximum(counts, 1)
    feats = pd.DataFrame(values.astype(np.float32), columns=feature_names(dim))
    return pd.concat([out, feats], axis=1)


def join_plate_map(profiles: pd.DataFrame, csv: str) -> pd.DataFrame:
    """Per-well metadata from a CSV with a ``well`` or ``well_position`` (pycytominer's name; either may have the
    ``Metadata_`` prefix) column, written ``A01``, ``A1`` or ``A/1``, and optionally ``plate``."""
    try:
        pm = pd.read_csv(csv, dtype=str)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InputError(f"{csv}: cannot be read as a CSV plate map ({exc})") from exc
    lower = {c.lower().removeprefix("metadata_"): c for c in pm.columns}
    wkey = next((k for k in ("well", "well_position") if k in lower), None)
    if wkey is None:
        raise InputError(
            f"{csv}: no 'well' column (nor 'well_position'; columns: {', '.join(pm.columns)}); the plate map is keyed "
            "by well"
        )
    pm = pm.rename(columns={c: f"{META}{c.removeprefix(META)}" for c in pm.columns})
    wcol, pcol = f"{META}{lower[wkey].removeprefix(META)}", lower.get("plate")
    pm[f"{META}Well"] = pm.pop(wcol).map(well_id)  # A01, A1 and A/1 all match
    on = [f"{META}Well"]
    if pcol is not None:
        pm[f"{META}Plate"] = pm.pop(f"{META}{pcol.removeprefix(META)}")
        on.append(f"{META}Plate")
    if pm.duplicated(on).any():
        raise InputError(f"{csv}: well {pm[pm.duplicated(on)][on[0]].iloc[0]} is listed twice")
    unknown = sorted(set(pm[f"{META}Well"]) - set(profiles[f"{META}Well"]))
    if unknown:
        log.warning("%s: wells %s are not in the profiles (no cells, or another plate)", csv, ", ".join(unknown[:8]))
    extra = [c for c in pm.columns if c not in on and c in profiles]
    if extra:
        raise InputError(f"{csv}: columns {', '.join(extra)} clash with the profiles' own metadata")
    merged = profiles.merge(pm, on=on, how="left")
    meta = [c for c in merged.columns if c.startswith(META)]
    return merged[meta + [c for c in merged.columns if not c.startswith(META)]]


def control_mask(profiles: pd.DataFrame, controls: Sequence[str] | None, control_key: str | None) -> np.ndarray:
    """Which rows are control wells: ``--controls A/1,B/1`` or ``--control-key COLUMN=VALUE``; all rows if neither."""
    if controls and control_key:
        raise ConfigError("pass either --controls or --control-key, not both")
    if controls:
        want = {well_id(w) for w in controls}
        mask = profiles[f"{META}Well"].isin(want).to_numpy()
        missing = want - set(profiles[f"{META}Well"])
        if missing:
            raise ConfigError(f"--controls: no cells in well(s) {', '.join(sorted(missing))}")
        return mask
    if control_key:
        if "=" not in control_key:
            raise ConfigError(f"--control-key {control_key!r}: expected COLUMN=VALUE, e.g. treatment=DMSO")
        col, value = (s.strip() for s in control_key.split("=", 1))
        name = col if col in profiles else f"{META}{col}"
        if name not in profiles:
            meta = [c.removeprefix(META) for c in profiles if c.startswith(META)]
            raise ConfigError(f"--control-key: no column {col!r}; metadata columns are {', '.join(meta)}")
        mask = (profiles[name].astype(str) == value).to_numpy()
        if not mask.any():
            raise ConfigError(f"--control-key: no well has {col} = {value!r}")
        return mask
    return np.ones(len(profiles), bool)


#: a control profile aggregated from fewer cells than this is warned of: its median or mean is mostly noise, and every
#: profile of the plate is measured against it
MIN_CONTROL_CELLS = 50


def _warn_thin_controls(ctrl: pd.DataFrame, plate: str) -> None:
    """Warn of control profiles (rows of ``ctrl``) made from fewer than :data:`MIN_CONTROL_CELLS` cells."""
    count, by = f"{META}Count_Cells", [c for c in (f"{META}Well", f"{META}Field") if c in ctrl]
    if count not in ctrl:
        return
    thin = ctrl[ctrl[count] < MIN_CONTROL_CELLS]
    if len(thin):
        names = ", ".join(
            f"{'/'.join(str(r[c]) for c in by)} ({int(r[count])} cells)" for _, r in thin.head(8).iterrows()
        )
        more = f" and {len(thin) - 8} more" if len(thin) > 8 else ""
        log.warning(
            "plate %s: %d of %d control profiles come from fewer than %d cells: %s%s; the plate is normalised to "
            "them, so its profiles carry their noise. Add control wells, or check that these wells were imaged",
            plate, len(thin), len(ctrl), MIN_CONTROL_CELLS, names, more,
        )  # fmt: skip


def normalise(profiles: pd.DataFrame, method: str, controls: np.ndarray) -> pd.DataFrame:
    """Each plate's features against its own control wells: ``standardise`` (x - mean) / std, ``robust`` (x - median)
    / (MAD x 1.4826); a feature constant in the controls is only centred."""
    if method not in NORMALISATIONS:
        raise ConfigError(f"--normalise {method!r}: expected {', '.join(NORMALISATIONS)}")
    if method == "none":
        return profiles
    feats = [c for c in profiles if not c.startswith(META)]
    out = profiles.copy()
    for plate, idx in profiles.groupby(f"{META}Plate", sort=False).indices.items():
        ctrl = idx[controls[idx]]
        if len(ctrl) == 0:
            raise ConfigError(f"plate {plate}: no control wells to normalise against")
        _warn_thin_controls(profiles.iloc[ctrl], plate)
        ref = profiles.iloc[ctrl][feats].to_numpy(np.float64)
        x = profiles.iloc[idx][feats].to_numpy(np.float64)
        if method == "standardise":
            centre, scale = ref.mean(0), ref.std(0)
        else:
            centre = np.median(ref, 0)
            scale = np.median(np.abs(ref - centre), 0) * MAD_SCALE
        scale = np.where(scale > 0, scale, 1.0)
        out.loc[out.index[idx], feats] = ((x - centre) / scale).astype(np.float32)
    return out


@dataclass(frozen=True)
class ProfileOptions:
    by: str = "well"
    agg: str = "median"
    normalise: str = "none"
    controls: tuple[str, ...] | None = None
    control_key: str | None = None
    metadata: str | None = None


def profiles(cells: str, out: str, opts: ProfileOptions = ProfileOptions()) -> pd.DataFrame:
    """Profiles of the store ``cells`` written to ``out`` (.parquet, or .csv); returns them."""
    from scdino.outputs import claim_file

    claim_file(out, inputs=[cells], ours=_ours)
    df = aggregate(cells, opts.by, opts.agg)
    if opts.metadata:
        df = join_plate_map(df, opts.metadata)
    df = normalise(df, opts.normalise, control_mask(df, opts.controls, opts.control_key))
    write_table(df, out, {"cells": str(cells), **{k: v for k, v in vars(opts).items()}})
    return df


def _ours(path: Path) -> bool:
    """A table scdino wrote (its metadata says so)."""
    try:
        if str(path).endswith(".csv"):
            header = path.read_text().split("\n", 1)[0].split(",")
            return header[0].startswith(META) and any(h.endswith("scdino_0000") for h in header)
        import pyarrow.parquet as pq

        return b"scdino" in (pq.read_schema(path).metadata or {})
    except Exception:  # not parquet, unreadable: not ours
        return False


def write_table(df: pd.DataFrame, out: str, about: dict) -> None:
    """Parquet (with what made it in the schema metadata) or, for a ``.csv`` path, CSV."""
    if str(out).endswith(".csv"):
        df.to_csv(out, index=False)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"scdino": json.dumps(about).encode()})
    tmp = f"{out}.partial"
    pq.write_table(table, tmp)
    Path(tmp).replace(out)


def export_cells(cells: str, out: str, block: int = BLOCK) -> int:
    """Every cell's metadata (``Metadata_`` columns) and embedding into parquet, one row group per block of cells:
    memory stays flat whatever the number of cells. Returns the number of cells written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from scdino.outputs import claim_file
    from scdino.progress import Progress

    claim_file(out, inputs=[cells], ours=_ours)
    shape = _store(cells)["obsm"][KEY].shape
    names = feature_names(int(shape[1]))
    source = run_source(cells)
    tmp = f"{out}.partial"
    writer = None
    a = 0
    with Progress(int(shape[0]), "export-cells", "cell") as bar:
        for obs, x in zip(metadata_blocks(cells, block), embedding_blocks(cells, block=block)):
            # a store that recorded no source (older test stores) says by its table whether its cells have wells
            if ("wells" in source["capabilities"]) if source else ("well" in obs):  # A/1 written as A01
                w = obs["well"].astype(str)
                obs["well"] = pd.Categorical(w.map({v: well_id(v) for v in w.unique()}))
            meta = obs.rename(columns={c: f"{META}{c[:1].upper()}{c[1:]}" for c in obs.columns})
            part = pd.concat([meta, pd.DataFrame(x, columns=names)], axis=1)
            table = pa.Table.from_pandas(part, preserve_index=False)
            if writer is None:
                schema = table.schema.with_metadata({b"scdino": json.dumps({"cells": str(cells)}).encode()})
                writer = pq.ParquetWriter(tmp, schema)
            writer.write_table(table.cast(writer.schema))
            a += len(x)
            bar.update(len(x))
    if writer is None:
        raise InputError(f"{cells}: the store holds no cells")
    writer.close()
    Path(tmp).replace(out)
    return a


# ------------------------------------------------------------------------------------------ replicate consistency


def read_profiles(path: str) -> pd.DataFrame:
    try:
        return pd.read_csv(path) if str(path).endswith(".csv") else pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot be read as a profiles table ({exc}); make one with 'scdino-engine profiles'")


def _median_pairwise(x: np.ndarray) -> float:
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    s = x @ x.T
    iu = np.triu_indices(len(x), 1)
    return float(np.median(s[iu]))


def read_profile_settings(path: str) -> dict:
    """What ``scdino-engine profiles`` recorded of how it made the table at ``path`` (normalisation, controls); {}
    for a CSV or a table made elsewhere."""
    if str(path).endswith(".csv"):
        return {}
    try:
        import pyarrow.parquet as pq

        return json.loads((pq.read_schema(path).metadata or {}).get(b"scdino", b"{}"))
    except Exception:  # not a table scdino wrote: it says nothing of its controls
        return {}


def control_treatments(profiles_df: pd.DataFrame, key: str, settings: Mapping[str, Any]) -> list[str]:
    """The treatments of column ``key`` the profiles were normalised to (``settings``: what ``profiles`` recorded):
    the value of ``--control-key KEY=VALUE``, or the treatments whose every well is one of ``--controls``."""
    if settings.get("normalise", "none") == "none":
        return []
    col = key if key in profiles_df else f"{META}{key}"
    ck = settings.get("control_key")
    if ck and "=" in ck:
        name, value = (s.strip() for s in ck.split("=", 1))
        return [value] if name.removeprefix(META) == key.removeprefix(META) else []
    wells = {well_id(w) for w in settings.get("controls") or ()}
    if not wells or f"{META}Well" not in profiles_df or col not in profiles_df:
        return []
    is_ctrl = profiles_df[f"{META}Well"].astype(str).map(well_id).isin(wells)
    by = is_ctrl.groupby(profiles_df[col].astype(str)).all()
    return sorted(by.index[by])


def replicate_consistency(
    profiles_df: pd.DataFrame, key: str, n_null: int = 1000, seed: int = 0, controls: Sequence[str] = ()
) -> dict:
    """For each treatment in column ``key`` with at least two wells: the median cosine similarity of its replicate
    wells, against a null of the same statistic for ``n_null`` random groups of as many wells; a treatment is
    consistent above the null's 95th percentile. Returns the share consistent and every number behind it.

    ``controls``: the treatments the profiles were normalised to. Their wells sit at the origin of the normalised
    space, so their cosine to each other says nothing of their replicates (it is near -1 or +1 by chance): they are
    reported apart, flagged, and left out of the share."""
    check(null_draws=n_null, seed=seed)
    col = key if key in profiles_df else f"{META}{key}"
    if col not in profiles_df:
        meta = [c.removeprefix(META) for c in profiles_df if c.startswith(META)]
        raise ConfigError(f"no column {key!r} naming treatments; metadata columns are {', '.join(meta)}")
    profiles_df = profiles_df[profiles_df[col].notna()].reset_index(drop=True)  # wells the plate map does not name
    feats = [c for c in profiles_df if not c.startswith(META)]
    x = profiles_df[feats].to_numpy(np.float64)
    groups = profiles_df.groupby(profiles_df[col].astype(str), sort=True).indices
    rng = np.random.default_rng(seed)
    nulls: dict[int, np.ndarray] = {}
    rows = []
    for treatment, idx in groups.items():
        if len(idx) < 2:
            continue
        n = len(idx)
        if n not in nulls:
            nulls[n] = np.array([_median_pairwise(x[rng.choice(len(x), n, replace=False)]) for _ in range(n_null)])
        value = _median_pairwise(x[idx])
        p95 = float(np.percentile(nulls[n], 95))
        rows.append(
            {
                "treatment": treatment,
                "wells": int(n),
                "median_cosine": value,
                "null_p95": p95,
                "consistent": value > p95,
                "p_value": float((np.sum(nulls[n] >= value) + 1) / (n_null + 1)),
                "control": treatment in set(controls),
            }
        )
    scored = [r for r in rows if not r["control"]]
    if not scored:
        besides = f" besides the controls ({', '.join(controls)})" if rows else ""
        raise ConfigError(f"column {key!r}: no treatment{besides} has two or more wells; replicates are needed")
    share = float(np.mean([r["consistent"] for r in scored]))
    return {
        "key": key,
        "treatments": len(scored),
        "controls": [r["treatment"] for r in rows if r["control"]],
        "fraction_consistent": share,
        "null": {
            str(n): {"p50": float(np.median(v)), "p95": float(np.percentile(v, 95)), "draws": n_null}
            for n, v in nulls.items()
        },
        "per_treatment": rows,
        "wells": len(profiles_df),
        "seed": seed,
    }
