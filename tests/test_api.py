"""The Python API (docs/api.md): the notebook example runs; ``load().embed`` equals a run's embeddings of the same
cells, cut from the plate by hand; ``embed`` equals the command line's store, in memory and on disk; a plate's stored
cell settings apply where no option is given; ``import scdino`` stays light."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import zarr
from click.testing import CliRunner

import scdino
from conftest import blob_field, dino_full_checkpoint
from scdino.cells.stored import KEY, stored_settings
from scdino.engine import pipeline
from scdino.engine.cli import main as engine_cli
from scdino.engine.config import run_config
from scdino.engine.sample import write_plate
from scdino.errors import ConfigError, InputError

ROOT = Path(__file__).resolve().parent.parent
#: the options both routes give: a trained-layout checkpoint at a small input, on PyTorch in fp32 (exact, no export)
SMALL = dict(input_size=32, backend="torch", precision="fp32", progress=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ckpt") / "dino.pth"
    dino_full_checkpoint(path)
    return str(path)


@pytest.fixture(scope="module")
def carrying_plate(tmp_path_factory) -> str:
    """A tiny plate (2 channels, exact nucleus labels) that carries its cell settings: its labels and a crop size."""
    rng = np.random.default_rng(3)
    wells = {"A/1": [blob_field(rng, [(20, 20), (50, 64), (70, 100), (30, 110)]), blob_field(rng, [(48, 30)])]}
    path = tmp_path_factory.mktemp("plates") / "carrying.zarr"
    return write_plate(path, wells, ["DAPI", "GFP"], cell_settings={"labels": "nuclei", "crop_size": 12})


def test_import_scdino_is_light():
    code = "import sys, scdino; scdino.embed, scdino.load, scdino.Model; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_notebook_example_runs(neocortex_plate, tmp_path, monkeypatch):
    text = (ROOT / "docs" / "api.md").read_text()
    notebook = text.split("## A notebook", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", notebook, re.S)
    assert len(blocks) == 3
    os.symlink(neocortex_plate, tmp_path / "sample.zarr")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), namespace)
    assert (tmp_path / "cells.zarr").is_dir() and namespace["x"].shape == (48, 192)


def _cut(plate: str, obs, s: int) -> np.ndarray:
    """The crops (s px) of ``obs``'s cells, cut by hand from the plate's level-0 images at the run's windows."""
    root = zarr.open_group(plate, mode="r")
    out = []
    for _, r in obs.iterrows():
        image = root[f"{r['well']}/{r['field']}"]
        attrs = dict(image.attrs)
        level0 = attrs.get("ome", attrs)["multiscales"][0]["datasets"][0]["path"]
        img = np.asarray(image[level0])
        y0, x0 = int(r["crop_y0"]), int(r["crop_x0"])
        out.append(img[:, y0 : y0 + s, x0 : x0 + s])
    return np.stack(out)


def test_load_embed_equals_a_run_of_the_same_cells(carrying_plate, checkpoint, tmp_path):
    cells = scdino.embed(carrying_plate, model=checkpoint, out=tmp_path / "c.zarr", **SMALL)
    obs = cells.obs[~cells.obs["border"].astype(bool)].copy()
    assert len(obs) >= 4
    crops = _cut(carrying_plate, obs, 12)  # the plate's stored crop size
    with scdino.load(checkpoint, n_channels=2, input_size=32, backend="torch") as model:
        got = model.embed(crops)
        assert model.backend == "torch on cpu" and model.embed_dim == 32
    want = cells.obsm["X_scdino"][~cells.obs["border"].astype(bool).to_numpy()]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_load_refuses_bad_crops_in_one_line(checkpoint):
    model = scdino.load(checkpoint, channels="DAPI,GFP", input_size=32, backend="torch")
    cases = [
        (np.zeros((2, 16, 16), np.uint16), r"one crop; expected \(N, 2, S, S\): pass crops\[None\]"),
        (np.zeros((16, 16), np.uint16), "expected a 4-d array"),
        (np.zeros((1, 3, 16, 16), np.uint16), "takes 2 channels.*got 3"),
        (np.zeros((1, 16, 16, 2), np.uint16), r"channels last\? pass crops.transpose\(0, 3, 1, 2\)"),
        (np.zeros((1, 2, 16, 12), np.uint16), "expected square crops"),
        (np.zeros((1, 2, 16, 16), bool), "dtype bool: expected integer or float"),
        (np.full((1, 2, 16, 16), np.nan, np.float32), "NaN or infinite"),
    ]
    for crops, message in cases:
        with pytest.raises(InputError, match=message) as err:
            model.embed(crops)
        assert "\n" not in str(err.value)
    assert model.embed(np.zeros((0, 2, 16, 16), np.uint16)).shape == (0, 32)
    model.close()
    with pytest.raises(InputError, match="closed"):
        model.embed(np.zeros((1, 2, 16, 16), np.uint16))
    with pytest.raises(ConfigError, match="say how many"):  # an RGB model needs to be told its channel count
        scdino.load(checkpoint)


def _plain(value):
    """``uns`` as JSON (AnnData reads lists back as arrays)."""
    return json.loads(json.dumps(value, default=lambda a: np.asarray(a).tolist()))


def test_embed_equals_the_command_line_store(carrying_plate, checkpoint, tmp_path, monkeypatch):
    cli_out = tmp_path / "cli.zarr"
    args = ["run", carrying_plate, "--out", str(cli_out), "--model", checkpoint, "--crop-size", "16"]
    args += ["--input-size", "32", "--backend", "torch", "--precision", "fp32", "--no-progress"]
    res = CliRunner().invoke(engine_cli, args)
    assert res.exit_code == 0, res.output
    cli = ad.read_zarr(cli_out)
    # the crop size given wins over the plate's 12; the labels come from the plate
    assert cli.uns["scdino"]["cells_from"] == {"crop_size": "option", "labels": "plate"}
    assert cli.uns["scdino"]["crop_size"] == 16 and cli.uns["scdino"]["cells"]["labels"] == "nuclei"

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    mem = scdino.embed(carrying_plate, model=checkpoint, crop_size=16, **SMALL)
    assert list(scratch.iterdir()) == []  # the temporary store is gone
    disk = scdino.embed(carrying_plate, model=checkpoint, out=tmp_path / "api.zarr", crop_size=16, **SMALL)
    for got in (mem, disk):
        np.testing.assert_array_equal(got.obsm["X_scdino"], cli.obsm["X_scdino"])
        assert got.obs.equals(cli.obs)
        for key in ("model", "cells", "cells_from", "channels", "crop_size", "preprocessing", "backend", "source"):
            assert _plain(got.uns["scdino"][key]) == _plain(cli.uns["scdino"][key]), key

    def no_block(*a, **k):
        raise AssertionError("a complete store embeds nothing")

    monkeypatch.setattr(pipeline, "_embed_block", no_block)  # the finished store is returned as it is
    again = scdino.embed(carrying_plate, model=checkpoint, out=tmp_path / "api.zarr", crop_size=16, **SMALL)
    np.testing.assert_array_equal(again.obsm["X_scdino"], cli.obsm["X_scdino"])


def test_stored_settings_apply_where_no_option_is_given(carrying_plate, tmp_path):
    cfg = run_config(carrying_plate, str(tmp_path / "o.zarr"))
    assert (cfg.cells.labels, cfg.cells.crop_size) == ("nuclei", 12)
    assert cfg.cells_from == (("crop_size", "plate"), ("labels", "plate"))
    cfg = run_config(carrying_plate, str(tmp_path / "o.zarr"), crop_size=20, sigma=1.5, channels="GFP")
    assert (cfg.cells.crop_size, cfg.cells.segment.sigma, cfg.cells.channels) == (20, 1.5, ("GFP",))
    assert dict(cfg.cells_from) == {"crop_size": "option", "sigma": "option", "channels": "option", "labels": "plate"}
    with pytest.raises(ConfigError, match="unknown option.*crop_sise"):
        run_config(carrying_plate, str(tmp_path / "o.zarr"), crop_sise=20)


def test_a_plate_with_bad_stored_settings_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    path = write_plate(tmp_path / "p.zarr", {"A/1": [blob_field(rng, [(20, 20)])]}, ["DAPI", "GFP"])
    assert stored_settings(path) == {}
    zarr.open_group(path, mode="r+").attrs[KEY] = {"sigmaa": 1}
    with pytest.raises(InputError, match=f"p.zarr: attribute '{KEY}' names unknown option.*sigmaa"):
        stored_settings(path)


def test_embed_without_out_refuses_a_large_input(tmp_path, monkeypatch):
    import scdino.api.embedding as embedding

    monkeypatch.setattr(embedding, "IN_MEMORY_MAX_BYTES", 10)
    (tmp_path / "p.zarr").mkdir()
    (tmp_path / "p.zarr" / "zarr.json").write_text("{" + " " * 100 + "}")
    with pytest.raises(ConfigError, match="pass out='cells.zarr'"):
        scdino.embed(tmp_path / "p.zarr")
    with pytest.raises(ConfigError, match="no such plate"):
        scdino.embed(tmp_path / "none.zarr")


def test_export_and_train_take_the_commands_options(checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="format 'pdf'"):
        scdino.export_model(checkpoint, tmp_path / "m.pdf", format="pdf")
    with pytest.raises(ConfigError, match="unexpected keyword argument 'fp16'"):
        scdino.export_model(checkpoint, tmp_path / "m.onnx", fp16=True)
    info = scdino.export_model(checkpoint, tmp_path / "b.pth", format="backbone")
    assert info["arch"] == "vit_test16" and (tmp_path / "b.pth").is_file()
    with pytest.raises(ConfigError, match="unknown option.*epoch\\b"):
        scdino.train(tmp_path / "x.zarr", tmp_path / "run", epoch=2)
