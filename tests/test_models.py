import os
import urllib.error

import numpy as np
import pytest
import torch

from conftest import dino_full_checkpoint
from reference import vit_cls
from scdino.errors import CheckpointError, ConfigError
from scdino.models import adapt_patch_weight, arch_config, build_model, load_model, read_checkpoint
from scdino.models import checkpoint as ckmod


def _keys(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel (the 'bicubic' of PyTorch and OpenCV)."""
    t = np.abs(t)
    return np.where(
        t <= 1, (a + 2) * t**3 - (a + 3) * t**2 + 1, np.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a, 0.0)
    )


def _bicubic_grid(pos: torch.Tensor, new: int) -> torch.Tensor:
    """A (1, 1 + g*g, D) position embedding resized to new x new patches, written from the definition: half-pixel
    centres, Keys kernel over the 4 x 4 nearest samples, edges repeated; the CLS row unchanged."""
    p = pos[0, 1:].double().numpy()
    g = int(round(len(p) ** 0.5))
    grid = p.reshape(g, g, -1)
    src = (np.arange(new) + 0.5) * g / new - 0.5
    base = np.floor(src).astype(int)
    taps = [(np.clip(base + k, 0, g - 1), _keys(src - (base + k))) for k in (-1, 0, 1, 2)]
    rows = sum(w[:, None, None] * grid[i] for i, w in taps)  # (new, g, D)
    out = sum(w[None, :, None] * rows[:, i] for i, w in taps)  # (new, new, D)
    return torch.cat([pos[0, :1].double(), torch.from_numpy(out.reshape(new * new, -1))])[None]


def _embed(lm, x):
    with torch.inference_mode():
        return lm.model(x)


def test_dino_full_checkpoint_teacher_and_student(tmp_path):
    path = tmp_path / "checkpoint.pth"
    teacher = dino_full_checkpoint(path, in_chans=3)
    ck = read_checkpoint(path)
    assert ck.layout == "dino-full" and ck.key == "teacher"
    assert set(ck.state_dict) == set(teacher)
    for k in teacher:
        assert torch.equal(ck.state_dict[k], teacher[k])
    st = read_checkpoint(path, key="student")
    assert not torch.equal(st.state_dict["cls_token"], teacher["cls_token"])
    assert ck.config.embed_dim == 32 and ck.config.num_heads == 2 and ck.config.patch_size == 16
    assert ck.config.depth == 2 and ck.config.img_size == 224 and len(ck.sha256) == 64


def test_missing_checkpoint_key_is_clear(tmp_path):
    path = tmp_path / "c.pth"
    dino_full_checkpoint(path)
    with pytest.raises(CheckpointError, match="no 'ema' entry.*--checkpoint-key"):
        read_checkpoint(path, key="ema")


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_backbone_only_and_wrapped_files(tmp_path, wrap):
    torch.manual_seed(3)
    m = build_model(arch_config("vit_test8", in_chans=4))
    sd = m.state_dict()
    path = tmp_path / "b.pth"
    torch.save({wrap: sd} if wrap else sd, path)
    lm = load_model(str(path), 4, 224)
    x = torch.rand(2, 4, 224, 224)
    torch.testing.assert_close(_embed(lm, x), m(x), rtol=0, atol=0)
    assert lm.info["untrained"] is False and "adaptation" not in lm.info


def test_refuses_a_checkpoint_that_would_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pth"
    torch.save({"teacher": {"backbone.cls_token": torch.zeros(1, 1, 8)}, "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused.*could run code"):
        read_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "c.pth"
    dino_full_checkpoint(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(path)


def test_checkpoint_of_another_architecture(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 64)}, path)
    with pytest.raises(CheckpointError, match="not a DINO ViT checkpoint"):
        load_model(str(path), 3)
    torch.manual_seed(0)
    sd = build_model(arch_config("vit_test16")).state_dict()
    sd["blocks.1.extra.weight"] = torch.zeros(3)
    del sd["blocks.0.mlp.fc2.bias"]
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="missing.*fc2.bias.*unexpected.*extra"):
        load_model(str(path), 3)


def test_channel_count_of_trained_model_must_match(tmp_path):
    path = tmp_path / "five.pth"
    torch.manual_seed(0)
    torch.save(build_model(arch_config("vit_test16", in_chans=5)).state_dict(), path)
    with pytest.raises(ConfigError, match="expects 5 channels.*give 3.*--channels"):
        load_model(str(path), 3)


def test_adaptation_formulas():
    w = torch.randn(8, 3, 4, 4)
    m = adapt_patch_weight(w, 5, "mean")
    assert m.shape == (8, 5, 4, 4)
    for c in range(5):
        torch.testing.assert_close(m[:, c], (w[:, 0] + w[:, 1] + w[:, 2]) / 3)
    s = adapt_patch_weight(w, 5, "scaled")
    torch.testing.assert_close(s, torch.cat([w, w[:, :2]], 1) * 3 / 5)
    cm = adapt_patch_weight(w, 4, "map:B,G,R,R")
    torch.testing.assert_close(cm, w[:, [2, 1, 0, 0]])
    with pytest.raises(ConfigError, match="once per input channel"):
        adapt_patch_weight(w, 4, "map:R,G")


def test_adapted_model_is_invariant_to_channel_permutation(tmp_path):
    path = tmp_path / "c.pth"
    dino_full_checkpoint(path)
    lm = load_model(str(path), 5, 64)
    assert lm.info["adaptation"] == "mean"
    x = torch.rand(3, 5, 64, 64)
    perm = x[:, [3, 0, 4, 2, 1]]
    torch.testing.assert_close(_embed(lm, x), _embed(lm, perm), rtol=1e-5, atol=1e-5)
    # the timm-style adaptation is not invariant: the test above can fail
    lm2 = load_model(str(path), 5, 64, adapt="scaled")
    assert not torch.allclose(_embed(lm2, x), _embed(lm2, perm), atol=1e-4)


def test_position_embedding_interpolated_once(tmp_path):
    path = tmp_path / "c.pth"
    teacher = dino_full_checkpoint(path)
    lm = load_model(str(path), 1, 96)
    assert lm.model.pos_embed.shape == (1, 1 + 6 * 6, 32)
    ref = _bicubic_grid(teacher["pos_embed"], 6)
    torch.testing.assert_close(lm.model.pos_embed.data.double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(lm.model.pos_embed[:, 0], teacher["pos_embed"][:, 0])
    with pytest.raises(ValueError, match="built for 96x96"):
        lm.model(torch.rand(1, 1, 112, 112))
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        load_model(str(path), 1, 100)


def test_independent_vit_forward_matches(tmp_path):
    path = tmp_path / "c.pth"
    teacher = dino_full_checkpoint(path, arch="vit_test8")
    lm = load_model(str(path), 2, 48)
    x = torch.rand(2, 2, 48, 48)
    got = _embed(lm, x).double().numpy()
    sd = dict(teacher)
    sd["patch_embed.proj.weight"] = torch.stack([sd["patch_embed.proj.weight"].mean(1)] * 2, 1)
    for i in range(2):
        ref = vit_cls(sd, x[i].double().numpy(), heads=2, size=48)
        np.testing.assert_allclose(got[i], ref, rtol=1e-4, atol=1e-4)


def test_last_selfattention_rows_are_distributions():
    torch.manual_seed(0)
    m = build_model(arch_config("vit_test16", in_chans=2, img_size=64))
    a = m.get_last_selfattention(torch.rand(2, 2, 64, 64))
    assert a.shape == (2, 2, 17, 17)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, 17))


def test_random_arch_is_marked_untrained_and_seeded():
    a = load_model("random:vit_test16", 3, 32)
    b = load_model("random:vit_test16", 3, 32)
    assert a.info["untrained"] is True and a.info["arch"] == "vit_test16"
    assert torch.equal(a.model.pos_embed, b.model.pos_embed)
    with pytest.raises(ConfigError, match="unknown architecture"):
        load_model("random:resnet50", 3)


def test_hub_name_offline_fails_with_advice(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_network(url, dst, progress=True):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(
        CheckpointError, match="dino_vits16: the download .* failed.*pass its path instead of dino_vits16"
    ):
        load_model("dino_vits16", 3)


def test_hub_name_uses_the_cached_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    dest = tmp_path / "hub" / "checkpoints" / ckmod.HUB_URLS["dino_vits8"].rsplit("/", 1)[-1]
    dest.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(build_model(arch_config("vit_test8")).state_dict(), dest)  # backbone-only, as DINO publishes
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded again"))
    lm = load_model("dino_vits8", 2, 32)
    assert lm.info["checkpoint_sha256"] == ckmod.sha256_of(dest)


def test_forward_with_attention_matches_the_two_separate_paths():
    torch.manual_seed(1)
    m = build_model(arch_config("vit_test16", in_chans=2, img_size=64))
    x = torch.rand(3, 2, 64, 64)
    with torch.inference_mode():
        cls, att = m.forward_with_attention(x)
        torch.testing.assert_close(cls, m(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(att, m.get_last_selfattention(x)[:, :, 0, 1:])
    assert att.shape == (3, 2, 16)


def test_a_checkpoint_is_read_once_per_process_while_the_file_is_unchanged(tmp_path, monkeypatch):
    path = tmp_path / "c.pth"
    dino_full_checkpoint(path)
    loads = []
    real = ckmod.safe_load
    monkeypatch.setattr(ckmod, "safe_load", lambda p: loads.append(p) or real(p))
    ckmod.forget_checkpoints()
    a = load_model(str(path), 3)
    b = load_model(str(path), 3, input_size=112)  # described, then built again at another size: one read
    assert len(loads) == 1 and a.info["checkpoint_sha256"] == b.info["checkpoint_sha256"]
    read_checkpoint(path, key="student")  # another entry of the file is another read
    assert len(loads) == 2
    dino_full_checkpoint(path, in_chans=3, seed=1)  # the file changes: read again, with its new hash
    os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 1))
    c = read_checkpoint(path, key="student")
    assert len(loads) == 3 and c.sha256 != a.info["checkpoint_sha256"]
    ckmod.forget_checkpoints()
    read_checkpoint(path, key="student")
    assert len(loads) == 4
