"""The trained default model shipped in the package."""

import anndata as ad
import numpy as np
import pytest

from scdino.cells.options import CellOptions
from scdino.data import default_model_path
from scdino.engine.pipeline import RunConfig, run
from scdino.engine.sample import neocortex_segment_params
from scdino.errors import ConfigError
from scdino.models import load_model


def test_default_model_is_shipped_small_and_complete():
    path = default_model_path()
    assert path.is_file() and path.stat().st_size < 20e6
    lm = load_model("default", 3)
    assert lm.info["untrained"] is False and lm.channels == ["CTIP2", "BRN2", "ROR"]
    assert lm.prep.mean is not None and lm.prep.input_size == lm.model.cfg.img_size
    assert lm.model.pos_embed.dtype.is_floating_point and str(lm.model.pos_embed.dtype) == "torch.float32"


@pytest.mark.slow
def test_run_without_model_uses_it(neocortex_plate, tmp_path):
    seg = neocortex_segment_params()
    res = run(
        RunConfig(
            plate=neocortex_plate,
            out=str(tmp_path / "c.zarr"),
            progress=False,
            cells=CellOptions(segment_channel="CTIP2,BRN2,ROR", crop_size=32, wells=("A/1",), segment=seg),
        )
    )
    a = ad.read_zarr(tmp_path / "c.zarr")
    assert not res.untrained and a.uns["scdino"]["model"]["model"] == "default"
    assert a.n_obs == res.n_cells > 100 and np.isfinite(a.obsm["X_scdino"]).all()


def test_default_model_on_other_channels_says_what_to_do(tiny_plate, tmp_path):
    with pytest.raises(ConfigError, match="the default model: trained on channels CTIP2, BRN2, ROR.*pass --model"):
        run(
            RunConfig(
                plate=tiny_plate,
                out=str(tmp_path / "x.zarr"),
                progress=False,
                cells=CellOptions(labels="nuclei", channels=("DAPI", "GFP", "DAPI"), crop_size=16),
            )
        )
