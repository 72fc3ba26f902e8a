"""Screen-level outputs: per-well profiles, normalisation against controls, plate maps, replicate consistency, the
single-cell export and plate views, with exact answers on synthetic embeddings."""

import json

import numpy as np
import pandas as pd
import pytest

from scdino.engine.output import EmbeddingStore
from scdino.engine.profiles import (
    MAD_SCALE,
    ProfileOptions,
    aggregate,
    canonical_well,
    export_cells,
    profiles,
    replicate_consistency,
)
from scdino.errors import ConfigError, InputError

#: what a run of a plate records of its source (the store names its cells by it: well/field/label)
PLATE_SOURCE = {"kind": "plate", "capabilities": ["wells", "label_images"], "path": "plate.zarr"}


def synthetic_store(path, wells, per_well=5, dim=4, chunk=3, plates=("p1",), seed=0, interleave=False):
    """An embeddings store as ``run`` writes it: ``per_well`` cells in each well (two fields), known embeddings."""
    rng = np.random.default_rng(seed)
    rows, xs = [], []
    for k, plate in enumerate(plates):
        for w in wells:
            for i in range(per_well):
                rows.append(
                    {
                        "plate": plate,
                        "well": w,
                        "field": str(i % 2),
                        "label": 1000 * k + i + 1,  # cell ids unique across plates
                        "border": i == 0,
                    }
                )
                xs.append(rng.normal(size=dim) + 3 * (ord(w[0]) - 65) + int(w.split("/")[1]))
    table = pd.DataFrame(rows)
    x = np.asarray(xs, np.float32)
    if interleave:  # cells of a well not contiguous (as a crop store's might be)
        order = np.r_[np.arange(0, len(table), 2), np.arange(1, len(table), 2)]
        table, x = table.iloc[order].reset_index(drop=True), x[order]
    store = EmbeddingStore.create(str(path), table, dim, chunk, {"status": "running", "source": PLATE_SOURCE}, "fp")
    for i in range(store.n_blocks):
        a, b = store.block_range(i)
        store.write_block(i, x[a:b])
    store.finish({"status": "complete"})
    return table, x


def expected(table, x, keys, fn):
    g = table.groupby(keys, sort=False).indices
    return {k: fn(x[idx].astype(np.float64), axis=0) for k, idx in g.items()}


@pytest.mark.parametrize("agg", ["median", "mean"])
@pytest.mark.parametrize("interleave", [False, True])
def test_well_profiles_are_the_exact_aggregates(tmp_path, agg, interleave):
    table, x = synthetic_store(tmp_path / "c.zarr", ["A/1", "A/2", "B/1"], interleave=interleave)
    p = aggregate(str(tmp_path / "c.zarr"), "well", agg, block=4)  # blocks cut across wells
    wells = table.assign(well=table["well"].str.replace("/", "0"))  # A/1 in the plate, A01 in profiles
    want = expected(wells, x, ["plate", "well"], np.median if agg == "median" else np.mean)
    assert list(p.columns[:4]) == [
        "Metadata_Plate",
        "Metadata_Well",
        "Metadata_Count_Cells",
        "Metadata_Border_Fraction",
    ]
    assert p.columns[4:].tolist() == [f"Cells_scdino_000{i}" for i in range(4)]
    for _, row in p.iterrows():
        np.testing.assert_allclose(row.iloc[4:].to_numpy(float), want[(row.iloc[0], row.iloc[1])], rtol=1e-6)
        assert row["Metadata_Count_Cells"] == 5 and row["Metadata_Border_Fraction"] == pytest.approx(0.2)
    f = aggregate(str(tmp_path / "c.zarr"), "field", agg)
    assert len(f) == 6 and set(f["Metadata_Field"]) == {"0", "1"} and f["Metadata_Count_Cells"].sum() == 15


def test_normalisation_against_controls_per_plate(tmp_path):
    synthetic_store(tmp_path / "c.zarr", ["A/1", "A/2", "B/1", "B/2"], plates=("p1", "p2"))
    raw = aggregate(str(tmp_path / "c.zarr"))
    feats = [c for c in raw if c.startswith("Cells_scdino_")]
    assert len(feats) == 4
    for method in ("standardise", "robust"):
        out = profiles(
            str(tmp_path / "c.zarr"),
            str(tmp_path / f"{method}.parquet"),
            ProfileOptions(normalise=method, controls=("A01", "A/2")),
        )
        for plate in ("p1", "p2"):
            r = raw[raw["Metadata_Plate"] == plate]
            ref = r[r["Metadata_Well"].isin(["A01", "A02"])][feats].to_numpy(np.float64)
            if method == "standardise":
                centre, scale = ref.mean(0), ref.std(0)
            else:
                centre = np.median(ref, 0)
                scale = np.median(np.abs(ref - centre), 0) * MAD_SCALE
            got = out[out["Metadata_Plate"] == plate][feats].to_numpy(np.float64)
            np.testing.assert_allclose(got, (r[feats].to_numpy(np.float64) - centre) / scale, rtol=1e-5, atol=1e-5)
    back = pd.read_parquet(tmp_path / "robust.parquet")  # what pandas, pycytominer and CytoTable read
    assert back.shape == out.shape and back["Metadata_Well"].dtype == object
    assert all(back[c].dtype == np.float32 for c in feats) and back["Metadata_Count_Cells"].dtype == np.int64
    with pytest.raises(ConfigError, match="no cells in well\\(s\\) H12"):
        profiles(
            str(tmp_path / "c.zarr"), str(tmp_path / "x.parquet"), ProfileOptions(normalise="robust", controls=("H12",))
        )


def test_plate_map_joins_by_well_and_names_controls(tmp_path, caplog):
    synthetic_store(tmp_path / "c.zarr", ["A/1", "A/2", "B/1"])
    pm = tmp_path / "map.csv"
    pm.write_text("Well,treatment,dose\nA01,DMSO,0\nA02,drug,1\nB1,drug,2\nC07,drug,3\n")
    out = profiles(
        str(tmp_path / "c.zarr"),
        str(tmp_path / "p.parquet"),
        ProfileOptions(metadata=str(pm), control_key="treatment=DMSO", normalise="standardise"),
    )
    assert out["Metadata_treatment"].tolist() == ["DMSO", "drug", "drug"]
    assert out["Metadata_dose"].tolist() == ["0", "1", "2"] and "C07" in caplog.text  # a well without cells: said
    assert [c for c in out.columns if not c.startswith("Metadata_")] == [f"Cells_scdino_{i:04d}" for i in range(4)]
    dmso = out[out["Metadata_treatment"] == "DMSO"].filter(like="scdino_").to_numpy()
    np.testing.assert_allclose(dmso, 0, atol=1e-6)  # one control well: centred on itself, constant -> only centred
    bad = tmp_path / "bad.csv"
    bad.write_text("treatment\nDMSO\n")
    with pytest.raises(InputError, match="no 'well' column"):
        profiles(str(tmp_path / "c.zarr"), str(tmp_path / "q.parquet"), ProfileOptions(metadata=str(bad)))
    with pytest.raises(ConfigError, match="no well has treatment = 'water'"):
        profiles(
            str(tmp_path / "c.zarr"),
            str(tmp_path / "q.parquet"),
            ProfileOptions(metadata=str(pm), control_key="treatment=water", normalise="robust"),
        )
    assert canonical_well("b03") == "B/3" and canonical_well("AF/48") == "AF/48"


def test_replicate_consistency_tells_consistent_treatments_from_noise():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(24, 16))
    direction = rng.normal(size=16) * 5
    x[0], x[1], x[2] = direction + rng.normal(size=16) * 0.1, direction + rng.normal(size=16) * 0.1, direction
    treatment = ["good"] * 3 + ["noise"] * 3 + [f"single{i}" for i in range(18)]
    df = pd.DataFrame(x, columns=[f"scdino_{i:04d}" for i in range(16)])
    df.insert(0, "Metadata_treatment", treatment)
    r = replicate_consistency(df, "treatment", n_null=500, seed=0)
    by = {t["treatment"]: t for t in r["per_treatment"]}
    assert set(by) == {"good", "noise"} and r["treatments"] == 2  # singletons have no replicates
    assert by["good"]["consistent"] and by["good"]["p_value"] < 0.01
    assert not by["noise"]["consistent"]
    assert r["fraction_consistent"] == 0.5 and r["null"]["3"]["draws"] == 500


def test_single_cell_export_streams_row_groups(tmp_path):
    import pyarrow.parquet as pq

    table, x = synthetic_store(tmp_path / "c.zarr", ["A/1", "A/2", "B/1"], per_well=7)
    n = export_cells(str(tmp_path / "c.zarr"), str(tmp_path / "cells.parquet"), block=5)
    f = pq.ParquetFile(tmp_path / "cells.parquet")
    assert n == 21 and f.metadata.num_row_groups == 5  # one per block of 5 cells: never all in memory
    back = pd.read_parquet(tmp_path / "cells.parquet")
    assert back["Metadata_Well"].astype(str).tolist() == table["well"].str.replace("/", "0").tolist()  # A/1 -> A01
    np.testing.assert_array_equal(back.filter(like="scdino_").to_numpy(), x)


def test_plate_view_draws_the_plate_and_measures_distance_from_controls(tmp_path):
    from scdino.engine.plate_view import plate_view

    synthetic_store(tmp_path / "c.zarr", ["A/1", "A/2", "B/1", "H/12"])
    s = plate_view(str(tmp_path / "c.zarr"), str(tmp_path / "plate"), ProfileOptions(controls=("A/1",)))
    p = s["plates"]["p1"]
    prof = aggregate(str(tmp_path / "c.zarr"))
    x = prof.filter(like="scdino_").to_numpy(np.float64)
    want = [1 - float(v @ x[0]) / float(np.linalg.norm(v) * np.linalg.norm(x[0])) for v in x]  # 1 - cosine, by hand
    got = [p["wells"][w]["distance_from_controls"] for w in prof["Metadata_Well"]]
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert p["wells"]["A01"]["distance_from_controls"] == pytest.approx(0, abs=1e-6) and p["cells"] == 20
    from scdino.engine.plots import is_scdino_png, plate_format

    assert plate_format(["A/1", "H/12"]) == (8, 12) and plate_format(["P/24"]) == (16, 24)
    for f in p["figures"].values():
        assert is_scdino_png(f)
    assert json.loads((tmp_path / "plate" / "summary.json").read_text())["plates"]["p1"]["reference"] == "control wells"


def test_profiles_need_a_plate_run(tmp_path):
    table, x = synthetic_store(tmp_path / "c.zarr", ["A/1"])
    import zarr

    from scdino.engine.output import write_obs_column  # noqa: F401

    g = zarr.open_group(str(tmp_path / "c.zarr"), mode="r+", use_consolidated=False)
    del g["obs"]["well"]
    with pytest.raises(InputError, match="no well column.*not of a crop store"):
        aggregate(str(tmp_path / "c.zarr"))


def test_wells_are_one_whichever_form_the_plate_uses(tmp_path):
    synthetic_store(tmp_path / "c.zarr", ["A/01", "B/03"])
    out = profiles(
        str(tmp_path / "c.zarr"),
        str(tmp_path / "p.parquet"),
        ProfileOptions(controls=("B03",), normalise="standardise"),
    )
    assert out["Metadata_Well"].tolist() == ["A01", "B03"]
    np.testing.assert_allclose(out.iloc[1].filter(like="scdino_").to_numpy(float), 0, atol=1e-6)


def test_wells_the_plate_map_does_not_name_are_no_treatment():
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(6, 4)), columns=[f"scdino_{i:04d}" for i in range(4)])
    df.insert(0, "Metadata_treatment", ["a", "a", None, None, None, "b"])
    r = replicate_consistency(df, "treatment", n_null=50)
    assert [t["treatment"] for t in r["per_treatment"]] == ["a"] and r["wells"] == 3


def test_the_control_the_profiles_were_normalised_to_is_not_scored_as_a_treatment(tmp_path, caplog):
    import logging

    from click.testing import CliRunner

    from scdino.engine.cli import main

    # 5 cells a well (two fields): every control profile is thin, and the warning names each well and its count
    synthetic_store(tmp_path / "c.zarr", ["A/1", "A/2", "B/1", "B/2", "C/1", "C/2"], per_well=5)
    pm = tmp_path / "map.csv"
    pm.write_text("Well,treatment\nA01,DMSO\nA02,DMSO\nB01,drug\nB02,drug\nC01,other\nC02,other\n")
    with caplog.at_level(logging.WARNING):
        profiles(
            str(tmp_path / "c.zarr"),
            str(tmp_path / "p.parquet"),
            ProfileOptions(metadata=str(pm), control_key="treatment=DMSO", normalise="standardise"),
        )
    assert "2 of 2 control profiles come from fewer than 50 cells: A01 (5 cells), A02 (5 cells)" in caplog.text
    r = CliRunner().invoke(
        main, ["replicates", str(tmp_path / "p.parquet"), "--key", "treatment", "--null-draws", "50"]
    )
    assert r.exit_code == 0, r.output
    assert "DMSO: 2 wells" in r.output and "control (the profiles are normalised to it; not scored)" in r.output
    assert "of 2 treatments" in r.output  # drug and other; DMSO is not counted
    report = json.loads((tmp_path / "p.replicates.json").read_text())
    assert report["controls"] == ["DMSO"] and report["treatments"] == 2
    # wells named as controls (--controls) mark the treatment all of whose wells they are
    profiles(
        str(tmp_path / "c.zarr"),
        str(tmp_path / "w.parquet"),
        ProfileOptions(metadata=str(pm), controls=("A/1", "A/2"), normalise="robust"),
    )
    from scdino.engine.profiles import control_treatments, read_profile_settings

    w = pd.read_parquet(tmp_path / "w.parquet")
    assert control_treatments(w, "treatment", read_profile_settings(str(tmp_path / "w.parquet"))) == ["DMSO"]
    # a CSV records nothing: the user names the control
    w.to_csv(tmp_path / "w.csv", index=False)
    r = CliRunner().invoke(main, ["replicates", str(tmp_path / "w.csv"), "--key", "treatment", "--control", "DMSO"])
    assert r.exit_code == 0 and "of 2 treatments" in r.output, r.output
