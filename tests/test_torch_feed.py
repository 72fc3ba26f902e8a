"""The PyTorch backend's CUDA feed (pinned ring, raw dtype widened on the device, blocks launched without waiting),
run on the CPU with stand-ins for streams and events: the same embeddings as the plain per-batch loop. The same feed
on a GPU: tests/test_gpu_paths.py and benchmarks/gpu_check.py (marked gpu)."""

import numpy as np
import pytest
import torch

from scdino.engine.backends import BackendSpec
from scdino.engine.backends.torch_backend import RING, CudaFeed, TorchBackend
from scdino.models.card import describe_model


@pytest.fixture(scope="module")
def backend():
    card = describe_model("random:vit_test8", n_channels=2, input_size=32)
    return TorchBackend(BackendSpec(card, 2, "torch", "cpu", batch_size=3))


def _crops(n: int, seed: int, dtype=np.uint16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 65536, (n, 2, 20, 20)).astype(dtype)  # values above 32767: a signed view would differ


def test_the_feed_gives_the_plain_loops_embeddings_in_order(backend):
    feed = CudaFeed(backend.model, backend.prep, backend.spec, torch.device("cpu"))
    a, b = _crops(10, 0), _crops(7, 1)  # 4 and 3 batches of 3, the last ones partial
    wait_a = feed.launch(a)
    wait_b = feed.launch(b)  # launched before a's embeddings are taken
    got_b, got_a = wait_b(), wait_a()
    np.testing.assert_allclose(got_a, backend.infer(a), rtol=0, atol=1e-6)
    np.testing.assert_allclose(got_b, backend.infer(b), rtol=0, atol=1e-6)
    assert got_a.shape == (10, backend.embed_dim) and got_a.dtype == np.float32


def test_the_feed_sends_the_raw_16_bit_words_and_keeps_its_ring(backend):
    feed = CudaFeed(backend.model, backend.prep, backend.spec, torch.device("cpu"))
    feed.launch(_crops(8, 2))()
    out_buffer = feed.outputs[0][0].data_ptr()
    assert len(feed.ring) == RING
    assert all(s["dev"].dtype == torch.int16 and s["dev"].element_size() == 2 for s in feed.ring)  # not int32
    assert all(s["dev"].shape == (3, 2, 20, 20) for s in feed.ring)  # one batch each
    first = [s["host"].data_ptr() for s in feed.ring]
    feed.launch(_crops(5, 3))()
    assert [s["host"].data_ptr() for s in feed.ring] == first  # the same buffers, block after block
    assert [b.data_ptr() for b, _ in feed.outputs] == [out_buffer]  # one output buffer, given back and reused


def test_a_block_of_another_dtype_gets_its_own_ring(backend):
    feed = CudaFeed(backend.model, backend.prep, backend.spec, torch.device("cpu"))
    feed.launch(_crops(4, 4))()
    floats = _crops(4, 5).astype(np.float32)
    got = feed.launch(floats)()
    assert feed.ring[0]["dev"].dtype == torch.float32
    np.testing.assert_allclose(got, backend.infer(floats), rtol=0, atol=1e-6)
    assert feed.launch(floats[:0])().shape == (0, backend.embed_dim)
