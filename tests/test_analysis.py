import json
import os
import shutil
import sys

import anndata as ad
import numpy as np
import pytest
import tifffile

from conftest import dino_full_checkpoint, sklearn_knn_top1, write_class_tiffs
from scdino.cells.cropstore import CropStore
from scdino.engine.attention import attention_command
from scdino.engine.evaluate import evaluate, raw_pixel_features
from scdino.engine.ingest import ingest
from scdino.engine.knn_report import knn_command
from scdino.engine.pipeline import RunConfig, run
from scdino.engine.umap import PRESETS, umap_command
from scdino.errors import InputError
from scdino.knn import dominant_channel_labels, evaluate_knn, knn_predict


def test_weighted_vote_against_hand_computed_answers():
    # reference vectors at known angles; the query is at angle 0
    ang = np.array([10, 20, 30, 80, 85]) * np.pi / 180
    ref = np.stack([np.cos(ang), np.sin(ang)], 1)
    lab = np.array([0, 0, 0, 1, 1])
    q = np.array([[1.0, 0.0]])
    # k=5, T=1: weights exp(cos): class 0 = e^.985+e^.940+e^.866, class 1 = e^.174+e^.087 -> class 0
    assert knn_predict(ref, lab, q, k=5, temperature=1.0).tolist() == [0]
    # a weighted vote that a plain majority would lose: 1 close neighbour of class 1 against 2 far ones of class 0
    ref2 = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    lab2 = np.array([1, 0, 0])
    sims = ref2 @ np.array([1.0, 0.0])
    w1, w0 = np.exp(sims[0] / 0.07), np.exp(sims[1] / 0.07) + np.exp(sims[2] / 0.07)
    assert w1 > w0
    assert knn_predict(ref2, lab2, np.array([[1.0, 0.0]]), k=3, temperature=0.07).tolist() == [1]
    # with T large the weights even out and the majority wins
    assert knn_predict(ref2, lab2, np.array([[1.0, 0.0]]), k=3, temperature=100.0).tolist() == [0]
    # leave-one-out never votes for itself
    pts = np.array([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]])
    assert knn_predict(pts, np.array([0, 0, 1, 1]), pts, k=1, exclude_self=True).tolist() == [0, 0, 1, 1]
    # chunking gives the same answer
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 8)), rng.integers(0, 4, 300)
    np.testing.assert_array_equal(knn_predict(x, y, x[:50], chunk=7), knn_predict(x, y, x[:50], chunk=4096))


def test_class_codes_stable_when_a_class_is_missing_from_a_split():
    x = np.eye(6)[[0, 0, 1, 1, 2, 2, 3, 3, 3, 4]] + 0.01
    labels = np.array(["a", "a", "b", "b", "c", "c", "d", "d", "d", "zz"])  # "zz" has one cell
    r = evaluate_knn(x, labels, k=3, train_fraction=0.7, seed=1)
    assert r["classes"] == ["a", "b", "c", "d", "zz"] and not r["stratified"]
    cm = np.array(r["confusion_matrix"])
    assert cm.shape == (5, 5) and cm.sum() == r["n_query"]


@pytest.fixture(scope="module")
def authors_folder(tmp_path_factory):
    """The paper's layout: FOLDER/<class>/*.tif, channels last, from real neocortex nucleus crops."""
    from scdino.data import packaged_crops

    crops = packaged_crops()[:, :, 4:44, 4:44]  # 48 real crops, 40 px
    labels = dominant_channel_labels(crops)
    root = tmp_path_factory.mktemp("authors")
    write_class_tiffs(root, crops, np.array(["CTIP2", "BRN2", "ROR"])[labels], stem="cell")
    return root, crops, labels


def test_ingest_keeps_every_crop_with_its_file(authors_folder, tmp_path):
    root, crops, _ = authors_folder
    meta = ingest(root, tmp_path / "c.zarr", channels=["CTIP2", "BRN2", "ROR"], chunk=16, progress=False)
    assert meta["n"] == 48 and meta["crop_size"] == 40
    store = CropStore(tmp_path / "c.zarr")
    table = store.table()
    data = store.read(np.arange(48), [0, 1, 2])
    for i, row in table.iterrows():
        np.testing.assert_array_equal(data[i], np.moveaxis(tifffile.imread(root / row["path"]), -1, 0))
        assert row["path"].split("/")[0] == row["class"]
    with pytest.raises(InputError, match="same shape"):
        bad = tmp_path / "bad"
        (bad / "x").mkdir(parents=True)
        tifffile.imwrite(bad / "x" / "a.tif", np.zeros((40, 40, 3), np.uint16))
        tifffile.imwrite(bad / "x" / "b.tif", np.zeros((30, 30, 3), np.uint16))
        ingest(bad, tmp_path / "bad.zarr", progress=False)


@pytest.fixture(scope="module")
def embedded_store(authors_folder, tmp_path_factory):
    """The authors' folder ingested into a crop store and embedded by ``run`` (an untrained test ViT)."""
    root, _, _ = authors_folder
    tmp = tmp_path_factory.mktemp("embedded")
    ingest(root, tmp / "c.zarr", channels=["CTIP2", "BRN2", "ROR"], progress=False)
    run(
        RunConfig(
            plate=str(tmp / "c.zarr"),
            out=str(tmp / "e.zarr"),
            model="random:vit_test16",
            input_size=64,
            progress=False,
            chunk_cells=20,
        )
    )
    return tmp


def test_run_on_a_crop_store_keeps_every_label(embedded_store):
    a = ad.read_zarr(embedded_store / "e.zarr")
    table = CropStore(embedded_store / "c.zarr").table()
    assert a.n_obs == 48 and list(a.obs["class"].astype(str)) == list(table["class"])


def test_knn_report_and_classification_against_a_reference(embedded_store, tmp_path):
    shutil.copytree(embedded_store / "e.zarr", tmp_path / "e.zarr")  # the classification writes into the store
    r = knn_command(str(tmp_path / "e.zarr"), "class", k=5, out=str(tmp_path / "k"))
    a = ad.read_zarr(tmp_path / "e.zarr")
    y = a.obs["class"].astype(str).to_numpy()
    assert r["top1"] == pytest.approx(sklearn_knn_top1(a.obsm["X_scdino"], y, k=5))
    assert os.path.getsize(tmp_path / "k" / "confusion.png") > 1000
    assert json.loads((tmp_path / "k" / "knn.json").read_text())["classes"] == ["BRN2", "CTIP2", "ROR"]
    # classify the store's cells against itself as a labelled reference: obs column written, store readable
    r2 = knn_command(
        str(tmp_path / "e.zarr"), "class", k=1, reference=str(tmp_path / "e.zarr"), out=str(tmp_path / "k2")
    )
    b = ad.read_zarr(tmp_path / "e.zarr")
    assert (b.obs["knn_class"].astype(str) == b.obs["class"].astype(str)).all()  # k=1: its own row wins
    assert r2["predicted_counts"]


@pytest.mark.slow  # umap-learn's first fit in a process pays about 50 s of numba compilation
def test_umap_fits_a_subsample_and_transforms_the_rest(embedded_store, tmp_path):
    shutil.copytree(embedded_store / "e.zarr", tmp_path / "e.zarr")  # UMAP writes obsm["X_umap"] into the store
    u = umap_command(str(tmp_path / "e.zarr"), "ipsc-morphology", {"n_epochs": 50}, fit_max=40, device="cpu")
    assert u["engine"] == "umap-learn" and u["fitted_on"] == 40 and u["transformed"] == 8
    assert u["n_neighbors"] == PRESETS["ipsc-morphology"]["n_neighbors"] and u["min_dist"] == 0.1
    c = ad.read_zarr(tmp_path / "e.zarr")
    assert c.obsm["X_umap"].shape == (48, 2) and np.isfinite(c.obsm["X_umap"]).all()
    assert os.path.getsize(u["png"]) > 1000 and "cuml" not in sys.modules


def test_attention_maps_of_seeded_cells(embedded_store, tmp_path):
    store = str(embedded_store / "c.zarr")
    att = attention_command(store, "random:vit_test16", str(tmp_path / "att"), per_class=2, input_size=64)
    npz = np.load(tmp_path / "att" / "attention.npz")
    assert npz["attention"].shape == (6, 2, 40, 40) and att["heads"] == 2
    again = attention_command(store, "random:vit_test16", str(tmp_path / "att2"), per_class=2, input_size=64)
    assert list(np.load(tmp_path / "att2" / "attention.npz")["ids"]) == list(npz["ids"])  # seeded choice
    assert again["cells"] == 6


@pytest.mark.slow
def test_evaluate_grid_with_baselines_and_epochs(authors_folder, tmp_path):
    root, crops, labels = authors_folder
    ingest(root, tmp_path / "c.zarr", channels=["CTIP2", "BRN2", "ROR"], progress=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for ep in (0, 10):
        dino_full_checkpoint(run_dir / f"checkpoint{ep:04d}.pth", arch="vit_test16", in_chans=3, seed=ep)
    r = evaluate(
        str(tmp_path / "c.zarr"),
        ["random:vit_test16"],
        [("CTIP2",), ("CTIP2", "BRN2", "ROR")],
        str(tmp_path / "report"),
        input_size=64,
        run_dir=str(run_dir),
        baseline_arch="vit_test16",
        progress=False,
    )
    top1 = np.array(r["top1"])
    assert top1.shape == (2, 3) and np.isfinite(top1).all()
    assert r["columns"] == ["random:vit_test16", "untrained vit_test16", "raw pixels"]
    assert [e["epoch"] for e in r["epochs"]] == [0, 10]
    for f in ("heatmap.png", "epochs.png", "results.json", "report.md"):
        assert os.path.getsize(tmp_path / "report" / f) > 200
    # the raw-pixel baseline is what its definition says, and its accuracy is the vote's on those pixels
    x = raw_pixel_features(crops[:2, :1])
    assert x.shape == (2, 40 * 40) and x.min() == 0 and x.max() == 1
    table = CropStore(tmp_path / "c.zarr").table()
    px = CropStore(tmp_path / "c.zarr").read(np.arange(len(table)), [0]).astype(np.float64)
    lo, hi = px.min(axis=(2, 3), keepdims=True), px.max(axis=(2, 3), keepdims=True)
    flat = ((px - lo) / np.where(hi > lo, hi - lo, 1)).reshape(len(px), -1)
    assert top1[0, 2] == pytest.approx(sklearn_knn_top1(flat, table["class"].astype(str).to_numpy(), k=20))
    # the same model twice gives the same accuracy: the grid is deterministic
    assert top1[0, 0] == top1[0, 1]
    # cross-validation over all cells: raw pixels' k-NN is scikit-learn's cosine-weighted vote on the same folds
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    cv = r["cv"]["CTIP2"]
    vote = KNeighborsClassifier(20, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1 - d) / 0.07))
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    y = table["class"].astype(str).to_numpy()
    pooled = (cross_val_predict(vote, flat, y, cv=folds) == y).mean()  # every cell a query once
    assert cv["scores"]["knn"]["raw pixels"]["top1"] == pytest.approx(pooled)
    comps = [(c["a"], c["b"]) for c in cv["comparisons"]["probe"]]
    assert comps == [("random:vit_test16", "untrained vit_test16"), ("random:vit_test16", "raw pixels")]
    # the same network twice: no difference, and the report says so rather than a winner
    same = cv["comparisons"]["knn"][0]["top1"]
    assert same["difference"] == 0 and same["verdict"] == "no difference shown"
    assert "Cross-validated, with intervals: CTIP2" in (tmp_path / "report" / "report.md").read_text()


def test_attention_figure_shows_each_channel_on_one_scale_for_all_cells(tmp_path):
    from scdino.engine.plots import DISPLAY_PERCENTILES, attention_png, channel_display_ranges, is_scdino_png

    rng = np.random.default_rng(0)
    crops = rng.integers(100, 200, size=(4, 2, 16, 16)).astype(np.uint16)
    crops[0, 1] = 5  # a marker-negative cell: its channel 1 must look dark, not stretched to white
    r = channel_display_ranges(crops)
    want = np.percentile(np.moveaxis(crops, 1, 0).reshape(2, -1).astype(np.float64), DISPLAY_PERCENTILES, axis=1).T
    np.testing.assert_allclose(r, want)
    att = rng.random((4, 3, 16, 16))
    attention_png(
        crops, att / att.sum(axis=(2, 3), keepdims=True), list("abcd"), ["DNA", "BF"], str(tmp_path / "a.png")
    )
    assert is_scdino_png(tmp_path / "a.png") and os.path.getsize(tmp_path / "a.png") > 5000


def test_umap_on_cuda_without_cuml_names_the_cuda_13_package(monkeypatch):
    from scdino.engine import umap
    from scdino.errors import ConfigError

    monkeypatch.setattr(umap, "_cuml_usable", lambda: False)
    with pytest.raises(ConfigError, match="needs cuML and a GPU: .*cuml-cu13 \\(CUDA 13\\)"):
        umap.fit_umap(np.zeros((4, 2), np.float32), PRESETS[next(iter(PRESETS))], device="cuda")
