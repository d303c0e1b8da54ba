"""Analytic FLOPs agree with the reference's figures for ViT-B on 1,232 tokens."""

import pytest

from configs import ct_rate
from fvlm_jax import flops


def test_vit_b_forward_matches_reference():
    cfg = ct_rate.get_config()
    v = cfg.model.vision
    tr = flops.transformer_flops(1232, v.width, v.depth, v.mlp_dim)
    assert tr["weights"] / 1e9 == pytest.approx(210, rel=0.02)  # FVLM_REFERENCE.md section 9
    assert tr["attention"] / 1e9 == pytest.approx(55, rel=0.03)
    assert flops.stem_flops(cfg.model.input_zyx, v.patch_zyx, (), v.width) / 1e9 == pytest.approx(15.5, rel=0.02)
    step = flops.train_step_flops(cfg, batch_size=1)
    assert step["vision"] / 3 / 1e9 == pytest.approx(280, rel=0.03)
    assert step["total"] == pytest.approx(3 * step["forward_per_volume"])


def test_conv_stem_counts_each_stage():
    # (8,8,8) patches, channels (16,): stage 1 stride 2 on 32^3 -> 16^3 outputs x 8 inputs x 16; stage 2 stride 4.
    got = flops.stem_flops((32, 32, 32), (8, 8, 8), (16,), 64)
    assert got == 2 * (16**3 * 8 * 1 * 16) + 2 * (4**3 * 64 * 16 * 64)
