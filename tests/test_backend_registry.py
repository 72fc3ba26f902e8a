"""Adding a backend is one registry entry: a stand-in backend registered from outside the package is a --backend
choice and runs a whole engine run; an unknown or unfit backend is refused with the choices."""

from __future__ import annotations

import re

import anndata as ad
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from conftest import write_class_tiffs
from scdino.data import packaged_crops
from scdino.engine import backends
from scdino.engine.backends import BackendEntry, check_crops
from scdino.engine.cli import main
from scdino.engine.ingest import ingest
from scdino.errors import ConfigError
from scdino.models.card import ModelCard
from scdino.preprocess import Preprocessing


class ChannelMeans:
    """A stand-in model: each crop's mean per channel in the first columns, zeros after."""

    name = "channel-means"

    def __init__(self, spec) -> None:
        self.spec = spec
        self.embed_dim = spec.card.embed_dim
        self.info = {"stand_in": True}

    def infer(self, crops: np.ndarray) -> np.ndarray:
        check_crops(crops, self.spec.n_channels)
        out = np.zeros((len(crops), self.embed_dim), np.float32)
        out[:, : crops.shape[1]] = crops.astype(np.float64).mean(axis=(2, 3))
        return out

    def close(self) -> None:
        pass


@pytest.fixture()
def stand_in():
    entry = backends.register(
        # by "module:Class", so that the run's worker processes, which never ran this registration, open it too
        BackendEntry("channel-means", f"{__name__}:ChannelMeans", ("checkpoint",), ("cpu",), hint="pass a checkpoint")
    )
    yield entry
    backends.REGISTRY.pop(entry.name)


def test_a_backend_registered_from_outside_runs_a_whole_run(stand_in, tmp_path):
    crops = packaged_crops()[:12, :, 4:44, 4:44]
    root = write_class_tiffs(tmp_path / "tiffs", crops, ["a", "b"] * 6)
    ingest(root, tmp_path / "crops.zarr", channels=["CTIP2", "BRN2", "ROR"], chunk=4, progress=False)
    out = tmp_path / "emb.zarr"
    args = ["run", str(tmp_path / "crops.zarr"), "--model", "random:vit_test16", "--input-size", "32"]
    res = CliRunner().invoke(main, [*args, "--backend", "channel-means", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    a = ad.read_zarr(out)
    assert a.uns["scdino"]["backend"]["kind"] == "channel-means"
    assert a.obsm["X_scdino"].shape == (12, 32)  # the width of the model's card
    for i, path in enumerate(a.obs["path"]):  # every cell's row: the stand-in on that cell's own file
        cell = np.moveaxis(tifffile.imread(root / path), -1, 0).astype(np.float64)
        np.testing.assert_array_equal(a.obsm["X_scdino"][i, :3], cell.mean(axis=(1, 2)).astype(np.float32))
        assert not a.obsm["X_scdino"][i, 3:].any()


def test_the_command_line_choices_follow_the_registry(stand_in):
    res = CliRunner().invoke(main, ["run", "x.zarr", "--backend", "nope", "--out", "o.zarr"])
    assert res.exit_code == 2
    for name in ("auto", "torch", "onnxruntime", "tensorrt", "channel-means"):
        assert name in res.output
    assert "null" not in res.output  # a hidden backend is never a choice


def test_unknown_and_unfit_backends_are_refused_with_advice(stand_in):
    onnx = ModelCard("m.onnx", "onnx", "vit_test16", 32, 32, Preprocessing(32), False, 2, None, None)
    with pytest.raises(ConfigError, match="unknown backend 'nope'; expected one of auto, torch, .*channel-means"):
        backends.resolve("nope", "cpu", onnx)
    with pytest.raises(
        ConfigError, match="--backend channel-means cannot run m.onnx \\(a onnx model\\); pass a checkpoint"
    ):
        backends.resolve("channel-means", "cpu", onnx)
    with pytest.raises(ConfigError, match="formats \\['tiff'\\]; expected some of"):
        backends.register(BackendEntry("bad", ChannelMeans, ("tiff",)))
    assert "bad" not in backends.REGISTRY


def _card(fmt: str = "checkpoint") -> ModelCard:
    return ModelCard("x", fmt, "vit_test16", 32, 32, Preprocessing(32), True, 2, None, None)


def test_what_a_backend_does_differently_is_read_from_its_entry(stand_in):
    from scdino.engine.backends import BackendSpec
    from scdino.engine.stream import stream_plan

    class Source:  # what stream_plan reads of a source
        channels, crop_size, dtype = (0, 1), 16, np.uint16

    plain = BackendSpec(_card(), 2, kind="channel-means", device="cpu", batch_size=64)
    assert plain.precision == "fp32" and stream_plan(plain, Source(), 16, 1, 1, 0).group == 1
    backends.register(
        BackendEntry("channel-means", f"{__name__}:ChannelMeans", ("checkpoint",), ("cpu",), autocast_on=("cpu",),
                     grouped_on=("cpu",))  # fmt: skip
    )
    spec = BackendSpec(_card(), 2, kind="channel-means", device="cpu", batch_size=64, autocast="bfloat16")
    assert spec.precision == "bf16-autocast"  # the entry says it autocasts on this device
    assert stream_plan(spec, Source(), 16, 1, 1, 0).group > 1  # and groups blocks into tasks there


def test_the_export_cache_moves_only_backends_whose_entry_names_an_export(stand_in, monkeypatch):
    from scdino.engine.backends import BackendSpec
    from scdino.engine.export_cache import eligible

    monkeypatch.setenv("SCDINO_EXPORT_CACHE", "1")
    card = ModelCard("x.pth", "checkpoint", "vit_test16", 32, 32, Preprocessing(32), False, 2, None, "ab" * 32)
    spec = BackendSpec(card, 2, kind="channel-means", device="cpu")
    assert "already" in eligible(spec, "auto", True)  # no export named: its runs stay on it
    backends.register(BackendEntry("channel-means", f"{__name__}:ChannelMeans", ("checkpoint",), ("cpu",),
                                   exports_to="onnxruntime"))  # fmt: skip
    assert "already" not in (eligible(spec, "auto", True) or "")


#: a registered backend's name compared with something, or set as a kind, outside the registry's package
def _name_comparisons(names) -> re.Pattern:
    alt = "|".join(map(re.escape, names))
    q = r"[\"'](?:%s)[\"']" % alt
    return re.compile(
        rf"(==|!=)\s*{q}|{q}\s*(==|!=)|\bin\s*[\(\[\{{][^\)\]\}}]*{q}|\bkind\s*=\s*{q}|Choice\([^,]+,\s*{q}"
    )


def test_no_backend_name_is_compared_outside_the_registry():
    from pathlib import Path

    import scdino

    pattern = _name_comparisons(backends.REGISTRY)
    assert pattern.search('if spec.kind == "torch":') and pattern.search("replace(spec, kind='null')")
    assert pattern.search('return Choice(spec, "torch", why, {})') and not pattern.search('spec.kind == other.kind')
    root = Path(scdino.__file__).parents[2]
    #: not backends: scdino-export quantize's --target names what a quantised copy is made for (cpu or tensorrt), and
    #: a training config's "null" is JSON's None
    allowed = {"export/quantize.py": "target", "training/config.py": '("none", "null")'}
    hits = []
    for folder in ("src/scdino", "engine", "export", "training"):
        for f in sorted((root / folder).rglob("*.py")):
            rel = f.relative_to(root).as_posix()
            if rel.startswith("engine/backends/"):
                continue
            for n, line in enumerate(f.read_text().splitlines(), 1):
                if pattern.search(line) and not (rel in allowed and allowed[rel] in line):
                    hits.append(f"{rel}:{n}: {line.strip()}")
    assert hits == []
