"""Test-time augmentation (``run --tta``): the transforms against the dihedral group written out by hand, invariance of
the averaged embedding on the PyTorch, ONNX Runtime and null backends, and the run's record and resume check."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from scdino.cells.options import CellOptions
from scdino.engine.backends.base import BackendSpec
from scdino.engine.pipeline import RunConfig, run
from scdino.engine.stream import embed_block
from scdino.engine.tta import transforms
from scdino.errors import ConfigError, OutputError
from scdino.models.card import describe_model

# the eight arrangements of [[a, b], [c, d]] under flips and quarter turns, listed by hand
D8 = {"abcd", "cadb", "dcba", "bdac", "badc", "acbd", "cdab", "dbca"}
FLIPS = {"abcd", "badc", "cdab", "dcba"}


def _arrangements(mode: str) -> list[str]:
    x = np.array([[["a", "b"], ["c", "d"]]], dtype=object)[None]  # (1, 1, 2, 2)
    return ["".join(t(x)[0, 0].ravel()) for t in transforms(mode)]


def test_transforms_are_the_dihedral_group_and_its_flips():
    assert _arrangements("none") == ["abcd"]
    assert sorted(_arrangements("flips")) == sorted(FLIPS) and _arrangements("flips")[0] == "abcd"
    assert sorted(_arrangements("d8")) == sorted(D8) and _arrangements("d8")[0] == "abcd"
    with pytest.raises(ConfigError, match="--tta 'd4': expected one of none, flips, d8"):
        transforms("d4")
    with pytest.raises(ConfigError, match="--tta 'x'"):
        RunConfig(plate="p", out="o", tta="x").validate()


def _crops(n=5, c=2, s=40, seed=0):
    return np.random.default_rng(seed).integers(0, 4000, size=(n, c, s, s)).astype(np.uint16)


def _by_hand(crops, spec, mode):
    """The mean embedding over the transforms, each embedded separately without augmentation."""
    plain = [lambda x: x, lambda x: x[..., ::-1], lambda x: x[..., ::-1, :], lambda x: x[..., ::-1, ::-1]]
    if mode == "d8":  # the four quarter turns (counter-clockwise: column j of the turned crop is row S-1-j) and mirrors
        turns = [lambda x, k=k: np.rot90(x, k, axes=(2, 3)) for k in range(4)]
        plain = turns + [lambda x, t=t: t(x)[..., ::-1] for t in turns]
    return np.mean([embed_block(np.ascontiguousarray(t(crops)), spec) for t in plain], axis=0)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    from scdino.export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "m.onnx"
    export_onnx("random:vit_test16", out, n_channels=2, crop_size=40, input_size=32)
    return str(out)


@pytest.mark.parametrize("kind", ["torch", "onnxruntime", "null"])
def test_averaged_embedding_is_the_mean_over_transforms_and_invariant(kind, onnx_model):
    model = onnx_model if kind == "onnxruntime" else "random:vit_test16"
    card = describe_model(model, n_channels=2, input_size=32, crop_size=40)
    crops = _crops()
    specs = {m: BackendSpec(card=card, n_channels=2, kind=kind, tta=m) for m in ("none", "flips", "d8")}
    plain = embed_block(crops, specs["none"])
    for mode in ("flips", "d8"):
        got = embed_block(crops, specs[mode])
        assert got.shape == plain.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, _by_hand(crops, specs["none"], mode), rtol=1e-5, atol=1e-6)
    # the average over a group does not change when its crop is moved by a member of the group
    mirrored, turned = np.ascontiguousarray(crops[..., ::-1]), np.ascontiguousarray(np.rot90(crops, 1, axes=(2, 3)))
    np.testing.assert_allclose(embed_block(mirrored, specs["flips"]), embed_block(crops, specs["flips"]), atol=2e-5)
    np.testing.assert_allclose(embed_block(turned, specs["d8"]), embed_block(crops, specs["d8"]), atol=2e-5)
    if kind != "null":  # a network's embedding is not invariant by itself: the test above can fail
        assert np.abs(embed_block(turned, specs["none"]) - plain).max() > 1e-3


def test_a_run_records_its_augmentation_and_never_resumes_with_another(scratch_plate, tmp_path):
    def cfg(out, tta, **kw):
        return RunConfig(
            plate=scratch_plate, out=str(out), model="random:vit_test8", input_size=32, progress=False, tta=tta,
            cells=CellOptions(labels="nuclei", crop_size=24), **kw,
        )  # fmt: skip

    flips = run(cfg(tmp_path / "f.zarr", "flips"))
    none = run(cfg(tmp_path / "n.zarr", "none"))
    a, b = ad.read_zarr(flips.out), ad.read_zarr(none.out)
    assert a.uns["scdino"]["tta"] == {"mode": "flips", "transforms": 4}
    assert a.uns["scdino"]["backend"]["tta"] == "flips" and "tta" not in b.uns["scdino"]["backend"]
    assert b.uns["scdino"]["tta"] == {"mode": "none", "transforms": 1}
    assert a.n_obs == b.n_obs and not np.allclose(a.obsm["X_scdino"], b.obsm["X_scdino"], atol=1e-4)
    # the same run again is complete; another augmentation is another run, refused over this one
    assert run(cfg(tmp_path / "f.zarr", "flips")).blocks_run == 0
    with pytest.raises(OutputError, match="other settings"):
        run(cfg(tmp_path / "f.zarr", "d8"))
    assert run(cfg(tmp_path / "f.zarr", "d8", overwrite=True)).blocks_run > 0
    assert ad.read_zarr(flips.out).uns["scdino"]["tta"]["mode"] == "d8"
