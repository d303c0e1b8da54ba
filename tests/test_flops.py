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


def test_train_step_total_is_the_hand_count():
    """The whole step of a batch of 2, counted by hand: 3 x forward of the ViT (linear patch embedding), one text
    encoder pass per anatomy at prep.text_len, and the anatomy pooling's K/V projections and attention."""
    cfg = ct_rate.get_config()
    v, t = cfg.model.vision, cfg.model.text
    assert tuple(v.stem_channels) == ()  # a linear patch embedding
    n = 1
    for size, patch in zip(cfg.model.input_zyx, v.patch_zyx):
        n *= size // patch

    def encoder(tokens, width, depth, mlp):  # per layer: q, k, v, out and MLP weights; Q K^T and P V
        return depth * (2 * tokens * (4 * width**2 + 2 * width * mlp) + 2 * 2 * tokens**2 * width)

    patch_voxels = v.patch_zyx[0] * v.patch_zyx[1] * v.patch_zyx[2]
    vision = encoder(n, v.width, v.depth, v.mlp_dim) + 2 * n * patch_voxels * v.width
    anatomies, levels = len(cfg.prep.anatomies), len(v.feature_blocks) + 1
    text = anatomies * encoder(cfg.prep.text_len, t.width, t.depth, t.mlp_dim)
    pool = levels * n * 2 * 2 * v.width**2 + anatomies * levels * n * 2 * 2 * v.width
    assert flops.train_step_flops(cfg, batch_size=2)["total"] == 3 * 2 * (vision + text + pool)


def test_conv_stem_counts_each_stage():
    # (8,8,8) patches, channels (16,): stage 1 stride 2 on 32^3 -> 16^3 outputs x 8 inputs x 16; stage 2 stride 4.
    got = flops.stem_flops((32, 32, 32), (8, 8, 8), (16,), 64)
    assert got == 2 * (16**3 * 8 * 1 * 16) + 2 * (4**3 * 64 * 16 * 64)
