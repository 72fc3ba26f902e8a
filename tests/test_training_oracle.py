"""The whole DINO step and its schedule, step after step across epochs, against ``tests/dino_oracle.py``: teacher
temperature warm-up, lr and weight-decay schedules, per-parameter clipping, last-layer freezing, AdamW with its
no-decay groups, the teacher's momentum schedule and the centre, all written out from DINO's definitions; and drop
path, deterministic under a seed."""

from __future__ import annotations

import copy

import dino_oracle
import numpy as np
import pytest
import torch

from scdino.data import packaged_crops
from scdino.training import loop as loop_mod
from scdino.training.augment import make_generator
from scdino.training.config import build_config
from scdino.training.data import epoch_order

EPOCHS, BATCH, CLIP, FREEZE = 4, 4, 0.02, 1
RECIPE = {
    "global_size": 32, "local_size": 16, "local_crops": 2, "out_dim": 64, "head_hidden": 64, "head_bottleneck": 32,
    "drop_path": 0.0, "precision": "fp32", "saveckp_freq": 0,
    "lr": 0.05, "min_lr": 1e-4, "warmup_epochs": 1, "weight_decay": 0.1, "weight_decay_end": 0.5,
    "clip_grad": CLIP, "freeze_last_layer": FREEZE, "momentum_teacher": 0.9,
    "warmup_teacher_temp": 0.02, "teacher_temp": 0.06, "warmup_teacher_temp_epochs": 2,
}  # fmt: skip


def _trainer(tmp_path, **over):
    sets = [f"{k}={v}" for k, v in {**RECIPE, **over}.items()]
    cfg = build_config(
        None, sets, data="crops", out=str(tmp_path / "run"), arch="vit_test", patch=8, epochs=EPOCHS,
        batch_size_per_device=BATCH, device="cpu",
    )  # fmt: skip
    crops = torch.from_numpy(packaged_crops()[: 2 * BATCH, :, 8:40, 8:40].astype(np.int32))
    return cfg, crops, loop_mod.build(cfg, loop_mod.data_from_crops(cfg, crops, ["a", "b", "c"]))


def _close(got, want, what, rtol=1e-3, rel_atol=1e-4):
    scale = float(want.abs().max()) if want.numel() else 0.0
    atol = rel_atol * scale + 1e-12
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("recompute", [False, True], ids=["kept", "activation_checkpointing"])
def test_every_step_of_four_epochs_follows_dino_from_its_definition(tmp_path, recompute):
    """With ``activation_checkpointing`` the blocks are recomputed in the backward pass: the same oracle holds."""
    cfg, crops, tr = _trainer(tmp_path, activation_checkpointing=recompute)
    assert tr.student.backbone.checkpoint_blocks is recompute
    assert tr.n_iter == 2
    r = RECIPE
    base_lr = r["lr"] * BATCH / 256
    names = [n for n, p in tr.student.named_parameters() if p.requires_grad]
    moments = {n: (0.0, 0.0) for n in names}
    steps = dict.fromkeys(names, 0)
    clipped = unclipped = 0
    for epoch in range(EPOCHS):
        order = epoch_order(len(crops), epoch, cfg.seed)
        for it in range(tr.n_iter):
            gi = epoch * tr.n_iter + it
            student0 = copy.deepcopy(tr.student.state_dict())
            teacher0 = copy.deepcopy(tr.teacher.state_dict())
            center0 = tr.loss_fn.center.clone()
            raw = crops[order[it * BATCH : (it + 1) * BATCH]]
            views = tr.augment(raw, make_generator(cfg.seed, epoch, it), BATCH, 0)
            loss = loop_mod._step(tr, epoch, it, order, None)
            temp = dino_oracle.teacher_temp_at(epoch, r["warmup_teacher_temp"], r["teacher_temp"], 2)
            o_loss, o_grads, _, o_center, _ = dino_oracle.step(
                student0, teacher0, center0, views, heads=2, teacher_temp=temp, student_temp=cfg.student_temp,
                center_momentum=cfg.center_momentum,
            )  # fmt: skip
            where = f"epoch {epoch}, step {it}"
            assert loss == pytest.approx(float(o_loss), rel=1e-5), f"{where}: loss at teacher temperature {temp}"
            lr = dino_oracle.cosine_at(gi, base_lr, r["min_lr"], EPOCHS, tr.n_iter, r["warmup_epochs"])
            wd = dino_oracle.cosine_at(gi, r["weight_decay"], r["weight_decay_end"], EPOCHS, tr.n_iter)
            momentum = dino_oracle.cosine_at(gi, r["momentum_teacher"], 1.0, EPOCHS, tr.n_iter)
            params = dict(tr.student.named_parameters())
            for n in names:
                p, state = params[n], tr.optimizer.state[params[n]]
                if "last_layer" in n and epoch < FREEZE:  # frozen: no gradient, so AdamW leaves it alone entirely
                    assert torch.equal(p.detach(), student0[n]), f"{where}: {n} moved while the last layer is frozen"
                    assert not state, f"{where}: AdamW kept moments for the frozen {n}"
                    continue
                g, was_clipped = dino_oracle.clip(o_grads[n], CLIP)
                clipped, unclipped = clipped + was_clipped, unclipped + (not was_clipped)
                steps[n] += 1
                m, v = dino_oracle.adam_moments(*moments[n], g)
                moments[n] = (m, v)
                _close(state["exp_avg"], m, f"{where}: Adam's first moment of {n} (clipped gradient)")
                _close(state["exp_avg_sq"], v, f"{where}: Adam's second moment of {n}", rel_atol=1e-3)
                assert int(state["step"]) == steps[n], f"{where}: AdamW steps of {n}"
                decay = wd if dino_oracle.decays(n, p.shape) else 0.0
                want = dino_oracle.adamw_parameter(
                    student0[n].double(), state["exp_avg"].double(), state["exp_avg_sq"].double(), steps[n], lr, decay
                )
                torch.testing.assert_close(
                    p.detach().double(), want, rtol=1e-6, atol=1e-7,
                    msg=lambda msg: f"{where}: {n} after AdamW (lr {lr:.3g}, weight decay {decay:.3g}): {msg}",
                )  # fmt: skip
            student1 = tr.student.state_dict()
            for n, t in tr.teacher.state_dict().items():
                torch.testing.assert_close(
                    t, momentum * teacher0[n] + (1 - momentum) * student1[n], rtol=1e-6, atol=1e-7,
                    msg=lambda msg: f"{where}: teacher {n} at momentum {momentum:.4f}: {msg}",
                )  # fmt: skip
            torch.testing.assert_close(tr.loss_fn.center.double(), o_center, rtol=1e-5, atol=1e-7)
    assert clipped > 0 and unclipped > 0  # the limit bites: clipping is tested, not only the path around it


def test_drop_path_is_deterministic_under_a_seed_and_acts(tmp_path):
    def first_step(folder, drop, **over):
        _, crops, tr = _trainer(tmp_path / folder, drop_path=drop, clip_grad=0, **over)
        order = epoch_order(len(crops), 0, 0)
        loss = loop_mod._step(tr, 0, 0, order, None)
        return loss, torch.cat([p.detach().flatten() for p in tr.student.parameters()])

    a_loss, a = first_step("a", 0.5)
    b_loss, b = first_step("b", 0.5)
    off_loss, _ = first_step("c", 0.0)
    assert a_loss == b_loss and torch.equal(a, b)
    assert a_loss != pytest.approx(off_loss, rel=1e-4)  # the paths are dropped, not ignored
    # recomputed blocks replay the random state: the same paths are dropped, the same step results
    c_loss, c = first_step("d", 0.5, activation_checkpointing=True)
    assert c_loss == pytest.approx(a_loss, rel=1e-6) and torch.allclose(c, a, rtol=1e-6, atol=1e-7)
