import numpy as np
import pytest
import torch

from reference import preprocess as ref_preprocess
from scdino.preprocess import Preprocessing, apply, minmax_scale, preprocess


def test_minmax_per_image_per_channel():
    x = torch.tensor(
        [[[[0, 10], [20, 40]], [[5, 5], [5, 5]]], [[[100, 100], [100, 300]], [[1, 2], [3, 4]]]], dtype=torch.int32
    )
    y = minmax_scale(x)
    torch.testing.assert_close(y[0, 0], torch.tensor([[0, 0.25], [0.5, 1.0]]))
    torch.testing.assert_close(y[0, 1], torch.zeros(2, 2))  # constant channel -> 0
    torch.testing.assert_close(y[1, 0], torch.tensor([[0, 0], [0, 1.0]]))
    torch.testing.assert_close(y[1, 1], torch.tensor([[0, 1 / 3], [2 / 3, 1.0]]))
    assert y.dtype == torch.float32


def test_constant_and_saturated_crops_give_no_nan():
    x = torch.full((2, 3, 16, 16), 65535, dtype=torch.uint16)
    x[1, 2] = 0
    y = preprocess(x, 32)
    assert torch.isfinite(y).all() and float(y.abs().max()) == 0.0


@pytest.mark.parametrize("size", [8, 50, 100])
def test_matches_independent_implementation(size):
    rng = np.random.default_rng(size)
    crops = rng.integers(0, 65535, (3, 4, size, size)).astype(np.uint16)
    crops[1, 2] = 7
    got = preprocess(torch.from_numpy(crops), 224).numpy()
    ref = np.stack([ref_preprocess(c, 224) for c in crops])
    np.testing.assert_allclose(got, ref, atol=1e-5)  # float32 source coordinates vs float64


def test_mean_std_normalisation():
    x = torch.rand(2, 2, 10, 10)
    p = Preprocessing(input_size=10, mean=(0.5, 0.25), std=(0.5, 2.0))
    y = apply(x, p)
    xn = x.numpy().astype(np.float64)  # min-max by hand, per image and channel
    lo, hi = xn.min(axis=(2, 3), keepdims=True), xn.max(axis=(2, 3), keepdims=True)
    s = torch.from_numpy((xn - lo) / (hi - lo)).float()
    torch.testing.assert_close(y[:, 0], (s[:, 0] - 0.5) / 0.5)
    torch.testing.assert_close(y[:, 1], (s[:, 1] - 0.25) / 2.0)
    with pytest.raises(ValueError, match="one value per channel"):
        preprocess(x, 10, mean=(0.5,), std=(1.0,))


def test_fixed_intensity_range_keeps_absolute_levels():
    x = torch.tensor([[[[0, 50], [100, 200]], [[7, 7], [7, 7]]], [[[0, 5], [10, 20]], [[7, 7], [7, 7]]]])
    p = Preprocessing(input_size=2, scale_lo=(0.0, 7.0), scale_hi=(100.0, 7.0))
    y = apply(x, p)
    torch.testing.assert_close(y[0, 0], torch.tensor([[0.0, 0.5], [1.0, 1.0]]))  # clipped above the range
    torch.testing.assert_close(y[1, 0], torch.tensor([[0.0, 0.05], [0.1, 0.2]]))  # a dim crop stays dim
    assert torch.equal(y[:, 1], torch.zeros(2, 2, 2))  # an empty range gives 0, never NaN
    torch.testing.assert_close(minmax_scale(x)[1, 0], minmax_scale(x)[0, 0])  # per-crop min-max makes them alike
    d = p.to_dict()
    assert p.scaling == "fixed" and d["scale_lo"] == [0.0, 7.0] and d["steps"][1].startswith("fixed_range")
    assert Preprocessing().scaling == "minmax" and "scale_lo" not in Preprocessing().to_dict()
    with pytest.raises(ValueError, match="lo and hi for each"):
        preprocess(x, 2, scale_lo=(0.0,), scale_hi=(1.0,))
    with pytest.raises(ValueError, match="go together"):
        Preprocessing(scale_lo=(0.0, 0.0))


def test_intensity_range_warnings_name_the_channel_and_the_cause():
    from scdino.preprocess import intensity_range_warnings

    rng = np.random.default_rng(0)
    crops = rng.integers(0, 1000, (10, 3, 8, 8)).astype(np.uint16)
    crops[:, 2] = 4000  # channel 2 saturates the range
    w = intensity_range_warnings(crops, (0, 0, 0), (1000, 40000, 2000), ["A", "B", "C"], "p.zarr")
    assert len(w) == 2
    assert w[0].startswith("p.zarr, channel B") and "bottom 5%" in w[0] and "brighter" in w[0]
    assert w[1].startswith("p.zarr, channel C") and "100% of pixels" in w[1] and "clipped" in w[1]
    assert intensity_range_warnings(crops[:, :1], (0,), (1000,), ["A"]) == []  # fits: nothing to say


def test_preprocessing_round_trips_and_selects_channels():
    p = Preprocessing(input_size=16, mean=(0.1, 0.2, 0.3), std=(1.0, 2.0, 3.0), scale_lo=(0, 1, 2), scale_hi=(9, 8, 7))
    assert Preprocessing.from_dict(p.to_dict()) == p
    assert Preprocessing.from_dict(Preprocessing(input_size=8).to_dict()) == Preprocessing(input_size=8)
    q = p.select([2, 0])
    assert (q.mean, q.std, q.scale_lo, q.scale_hi, q.input_size) == ((0.3, 0.1), (3.0, 1.0), (2, 0), (7, 9), 16)
    assert Preprocessing(input_size=8).select([0]) == Preprocessing(input_size=8)
