"""Fast start: torch is not imported by ``scdino-engine --help`` nor by a warm run on the cached ONNX export (its card
and the export's card come from the cache); the cards the cache keeps are the cards the model file gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import anndata as ad
import numpy as np
import pytest

from conftest import dino_full_checkpoint
from scdino.cells.options import CellOptions
from scdino.engine import export_cache
from scdino.engine.pipeline import RunConfig, run
from scdino.errors import ConfigError
from scdino.models.card import ModelCard, describe_model
from scdino.models.sidecar import write_sidecar
from scdino.preprocess import Preprocessing

OPTS = CellOptions(labels="nuclei", crop_size=24)


def _python(code: str, env: dict | None = None) -> str:
    p = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"]])
def test_help_does_not_import_torch(argv):
    out = _python(
        f"""
        import runpy, sys
        sys.argv = ["scdino-engine", *{argv!r}]
        try:
            runpy.run_module("scdino.engine", run_name="__main__")
        except SystemExit as exc:
            assert exc.code in (0, None), exc.code
        print("torch imported:", "torch" in sys.modules)
        """
    )
    assert "Usage: scdino-engine" in out and out.strip().endswith("torch imported: False")


@pytest.mark.slow
def test_a_warm_run_on_the_cached_export_does_not_import_torch(tiny_plate, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SCDINO_CACHE_DIR", str(cache))
    ckpt = tmp_path / "vit_test16.pth"
    dino_full_checkpoint(ckpt, arch="vit_test16")
    timings = iter([0.1, 0.3])  # ONNX Runtime measured faster than PyTorch on the first run
    monkeypatch.setattr(export_cache, "_timing", lambda spec, crops: next(timings))
    cfg = RunConfig(plate=tiny_plate, out=str(tmp_path / "cold.zarr"), model=str(ckpt), cells=OPTS, progress=False)
    run(cfg)
    assert len(list((cache / "cards").glob("*.json"))) == 1  # the checkpoint's card, kept for the next run
    out = _python(
        f"""
        import sys
        from scdino.cells.options import CellOptions
        from scdino.engine.pipeline import RunConfig, run
        cells = CellOptions(labels="nuclei", crop_size=24)
        run(RunConfig(plate={tiny_plate!r}, out={str(tmp_path / "warm.zarr")!r}, model={str(ckpt)!r}, cells=cells,
                      progress=False))
        print("torch imported:", "torch" in sys.modules)
        """,
        {"SCDINO_CACHE_DIR": str(cache)},
    )
    assert out.strip().endswith("torch imported: False")
    cold, warm = ad.read_zarr(tmp_path / "cold.zarr"), ad.read_zarr(tmp_path / "warm.zarr")
    # the default (--precision auto) takes the same verified path both times; the warm run reads its check back
    assert warm.uns["scdino"]["path"]["path"] == cold.uns["scdino"]["path"]["path"]
    assert (
        warm.uns["scdino"]["path"]["path"].startswith("onnxruntime")
        and "cached export" in warm.uns["scdino"]["path"]["path"]
    )
    check = warm.uns["scdino"]["path"]["precision_check"]
    assert check["cached"] and check["crops"] == min(32, warm.n_obs)  # 32 crops, or every cell of a smaller plate
    np.testing.assert_array_equal(warm.obsm["X_scdino"], cold.obsm["X_scdino"])
    plain = lambda d: json.dumps(d, sort_keys=True, default=lambda a: a.tolist())  # noqa: E731 (arrays as lists)
    assert plain(warm.uns["scdino"]["model"]) == plain(cold.uns["scdino"]["model"])  # the kept card: the file's
    assert warm.uns["scdino"]["versions"]["torch"] == cold.uns["scdino"]["versions"]["torch"]


def test_the_kept_card_is_the_card_the_file_gives(tmp_path, monkeypatch):
    monkeypatch.setenv("SCDINO_CACHE_DIR", str(tmp_path / "cache"))
    ckpt = tmp_path / "c.pth"
    dino_full_checkpoint(ckpt, arch="vit_test16")
    settings = {"channels": ("DAPI", "GFP"), "input_size": 32, "checkpoint_key": "student", "adapt": "scaled"}
    fresh = export_cache.describe(str(ckpt), True, **settings)  # described (built), then kept
    monkeypatch.setattr(export_cache, "describe_model", lambda *a, **k: pytest.fail("described again"))
    kept = export_cache.describe(str(ckpt), True, **settings)
    assert kept == fresh and kept.to_dict() == fresh.to_dict() and kept.details == fresh.details
    assert kept.checkpoint_key == "student" and kept.adapt == "scaled" and kept.in_chans == 2


def test_a_card_record_round_trips_and_a_changed_file_is_described_again(tmp_path, monkeypatch):
    monkeypatch.setenv("SCDINO_CACHE_DIR", str(tmp_path / "cache"))
    ckpt = tmp_path / "c.pth"
    dino_full_checkpoint(ckpt, arch="vit_test16", seed=0)
    a = export_cache.describe(str(ckpt), True, n_channels=3)
    assert ModelCard.from_record(json.loads(json.dumps(a.to_record()))) == a
    dino_full_checkpoint(ckpt, arch="vit_test16", seed=5)  # new weights at the same path: a new sha256, a new card
    b = export_cache.describe(str(ckpt), True, n_channels=3)
    assert b.checkpoint_sha256 != a.checkpoint_sha256
    assert len(list((tmp_path / "cache" / "cards").glob("*.json"))) == 2
    export_cache.describe(str(ckpt), False, n_channels=3)  # the cache off: nothing kept
    assert len(list((tmp_path / "cache" / "cards").glob("*.json"))) == 2


def test_a_card_at_another_input_size_is_the_card_of_the_model_built_at_it(tmp_path):
    ckpt = tmp_path / "c.pth"
    dino_full_checkpoint(ckpt, arch="vit_test16")
    native = describe_model(str(ckpt), n_channels=2)
    for size in (32, 48, 16):
        built = describe_model(str(ckpt), n_channels=2, input_size=size)
        assert native.at_input_size(size) == built and native.at_input_size(size).to_dict() == built.to_dict()
    assert native.at_input_size(48).load().model.pos_embed.shape == (1, 3 * 3 + 1, 32)  # 48 / 16 = 3 patches a side
    with pytest.raises(ConfigError, match="not a multiple of the patch size 16"):
        native.at_input_size(40)


def test_a_plans_crop_size_is_checked_when_its_card_is_made(tmp_path):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"\0")
    meta = {
        "arch": "vit_test16",
        "embed_dim": 32,
        "input_size": 32,
        "in_chans": 2,
        "preprocessing": Preprocessing(32).to_dict(),
        "precision": "fp16",
        "dtype": "uint16",
        "input_dtype": "uint16",
        "crop_size": 64,
        "tensorrt": {"version": "10.0", "gpu": "H100", "compute_capability": "9.0", "max_batch": 256},
    }
    write_sidecar(plan, meta)
    assert describe_model(str(plan), n_channels=2, crop_size=64).crop_size == 64
    with pytest.raises(ConfigError, match="built for 64 px crops, the run cuts 32 px crops.*--crop-size 64"):
        describe_model(str(plan), n_channels=2, crop_size=32)


def test_an_exported_card_does_not_load_into_torch(tmp_path):
    card = ModelCard("m.onnx", "onnx", "vit_test16", 32, 32, Preprocessing(32), False, 2, None, None)
    with pytest.raises(ConfigError, match="runs on its own backend; PyTorch needs the checkpoint"):
        card.load()
    with pytest.raises(ConfigError, match="input size it was exported for"):
        card.at_input_size(16)


@pytest.mark.parametrize(
    "spec,kw",
    [
        ("random:vit_tiny16", {"n_channels": 3, "input_size": 32}),
        ("random:vit_small16", {"channels": ["DAPI", "GFP"]}),
        ("random:vit_test8", {"n_channels": 2, "input_size": 32, "seed": 3}),
    ],
)
def test_a_random_models_card_is_the_card_of_the_model_built(spec, kw):
    """A random model is described from its architecture (no torch, no weights drawn): the same card building it
    gives, and .load() builds the same network."""
    from scdino.models.loader import load_model

    card = describe_model(spec, **kw)
    n = len(kw["channels"]) if "channels" in kw else kw["n_channels"]
    lm = load_model(
        spec, n, kw.get("input_size"), "teacher", "mean", kw.get("seed", 0), channel_names=kw.get("channels")
    )
    assert card.details == lm.info and card.preprocessing == lm.prep
    assert (card.in_chans, card.embed_dim, card.input_size) == (
        lm.model.cfg.in_chans,
        lm.model.embed_dim,
        lm.prep.input_size,
    )
    assert card.channels is None and card.untrained and card.checkpoint_sha256 is None
    built = card.load().model.state_dict()
    assert all(np.array_equal(built[k].numpy(), v.numpy()) for k, v in lm.model.state_dict().items())
    with pytest.raises(ConfigError, match="patch size"):
        describe_model("random:vit_tiny16", n_channels=3, input_size=30)
    with pytest.raises(ConfigError, match="how many"):
        describe_model("random:vit_tiny16")
    code = (
        "import sys; from scdino.models.card import describe_model; describe_model(%r, n_channels=3); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code % spec], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
