"""Contrastive objectives: fVLM's anatomy-batched loss with false-negative correction, and whole-volume CLIP.

Both are pure functions of embeddings; they see the *global* batch (jit over a mesh gathers what it needs), so
gradients flow through every sample, unlike the public PyTorch code which only back-propagates the local shard.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -1e9  # finite "minus infinity": keeps softmax NaN-free on fully masked rows.


def anatomy_targets(valid, normal, text_id, disease, *, normal_pairs=True, same_text_pairs=True,
                    disease_pairs=True):
    """Binary positive-pair matrix per anatomy, before row normalisation.

    Args:
      valid: [A, B] bool, sample has a usable (present, intact, described) anatomy.
      normal: [A, B] bool, the anatomy's text says normal.
      text_id: [A, B] int, equal ids mean identical texts.
      disease: [A, B, K] bool, disease labels of the anatomy text.
    Returns:
      [A, B, B] bool: identity OR both normal OR same text OR both abnormal with the same non-empty disease set,
      restricted to pairs of valid samples.
    """
    b = valid.shape[1]
    pair_valid = valid[:, :, None] & valid[:, None, :]
    pos = jnp.broadcast_to(jnp.eye(b, dtype=bool), pair_valid.shape)
    if normal_pairs:
        pos = pos | (normal[:, :, None] & normal[:, None, :])
    if same_text_pairs:
        pos = pos | (text_id[:, :, None] == text_id[:, None, :])
    if disease_pairs:
        abnormal = ~normal & jnp.any(disease, axis=-1)
        same = jnp.all(disease[:, :, None, :] == disease[:, None, :, :], axis=-1)
        pos = pos | (same & abnormal[:, :, None] & abnormal[:, None, :])
    return pos & pair_valid


def _soft_xent(logits, targets, pair_valid, row_valid):
    """Mean over valid rows of -sum_j t_ij log softmax(logits_i)_j, softmax over valid columns only."""
    logits = jnp.where(pair_valid, logits, _NEG)
    logp = jax.nn.log_softmax(logits, axis=-1)
    t = targets / jnp.maximum(targets.sum(-1, keepdims=True), 1.0)
    per_row = -jnp.sum(jnp.where(pair_valid, t * logp, 0.0), axis=-1)  # [A, B]
    n = row_valid.sum(-1)
    return jnp.sum(jnp.where(row_valid, per_row, 0.0), -1) / jnp.maximum(n, 1)


def anatomy_contrastive_loss(img, txt, *, valid, normal, text_id, disease, temperature, normal_pairs=True,
                             same_text_pairs=True, disease_pairs=True, return_per_anatomy=False):
    """fVLM's fine-grained contrastive loss with false-negative correction.

    Args:
      img, txt: [A, B, D] L2-normalised anatomy image / text embeddings.
      valid, normal: [A, B] bool. text_id: [A, B] int. disease: [A, B, K] bool.
      temperature: scalar; logits = img @ txt^T / temperature.
      normal_pairs, same_text_pairs, disease_pairs: switch each false-negative correction.
    Returns:
      Scalar: sum over anatomies of 0.5 * (row + column soft cross-entropy), each averaged over valid rows; an
      anatomy with no valid abnormal sample contributes 0. With return_per_anatomy, also the [A] vector.
    """
    valid = valid.astype(bool)
    normal = normal.astype(bool)
    disease = disease.astype(bool)
    logits = jnp.einsum("abd,acd->abc", img.astype(jnp.float32), txt.astype(jnp.float32)) / temperature
    pos = anatomy_targets(valid, normal, text_id, disease, normal_pairs=normal_pairs,
                          same_text_pairs=same_text_pairs, disease_pairs=disease_pairs).astype(jnp.float32)
    pair_valid = valid[:, :, None] & valid[:, None, :]
    rows = _soft_xent(logits, pos, pair_valid, valid)
    cols = _soft_xent(jnp.swapaxes(logits, 1, 2), jnp.swapaxes(pos, 1, 2), pair_valid, valid)
    has_abnormal = jnp.any(valid & ~normal, axis=-1)
    per_anatomy = jnp.where(has_abnormal, 0.5 * (rows + cols), 0.0)
    loss = per_anatomy.sum()
    return (loss, per_anatomy) if return_per_anatomy else loss


def clip_loss(img, txt, *, temperature):
    """Whole-volume CLIP baseline: symmetric InfoNCE with identity targets. img, txt: [B, D] L2-normalised."""
    logits = img.astype(jnp.float32) @ txt.astype(jnp.float32).T / temperature
    labels = jnp.arange(img.shape[0])
    lr = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), labels[:, None], -1).mean()
    lc = -jnp.take_along_axis(jax.nn.log_softmax(logits.T, -1), labels[:, None], -1).mean()
    return 0.5 * (lr + lc)
