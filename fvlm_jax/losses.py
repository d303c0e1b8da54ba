"""Contrastive objectives: fVLM's anatomy-batched loss with false-negative correction, and whole-volume CLIP.

Both are pure functions of embeddings; they see the *global* batch (jit over a mesh gathers what it needs), so
gradients flow through every sample, unlike the public PyTorch code which only back-propagates the local shard.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

_NEG = -1e9  # finite "minus infinity": keeps softmax NaN-free on fully masked rows.


def _pair_targets(row, col, *, normal_pairs, same_text_pairs, disease_pairs):
    """[A, R, C] bool positives between a set of rows and a set of columns (dicts of valid, normal, text_id,
    disease, index; `index` is the global sample index, so a sample is its own positive)."""
    pair_valid = row["valid"][:, :, None] & col["valid"][:, None, :]
    pos = row["index"][None, :, None] == col["index"][None, None, :]
    if normal_pairs:
        pos = pos | (row["normal"][:, :, None] & col["normal"][:, None, :])
    if same_text_pairs:
        pos = pos | (row["text_id"][:, :, None] == col["text_id"][:, None, :])
    if disease_pairs:
        def abnormal(s):
            return ~s["normal"] & jnp.any(s["disease"], axis=-1)
        same = jnp.all(row["disease"][:, :, None, :] == col["disease"][:, None, :, :], axis=-1)
        pos = pos | (same & abnormal(row)[:, :, None] & abnormal(col)[:, None, :])
    return pos & pair_valid, pair_valid


def _side(valid, normal, text_id, disease, index):
    return {"valid": valid.astype(bool), "normal": normal.astype(bool), "text_id": text_id,
            "disease": disease.astype(bool), "index": index}


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
      restricted to pairs of valid samples. The relation is symmetric.
    """
    side = _side(valid, normal, text_id, disease, jnp.arange(valid.shape[1]))
    return _pair_targets(side, side, normal_pairs=normal_pairs, same_text_pairs=same_text_pairs,
                         disease_pairs=disease_pairs)[0]


def _row_losses(queries, keys, row, col, temperature, switches, peer=None):
    """Soft cross-entropy of each query row over all key columns: -sum_j t_ij log softmax(q_i . k / T)_j, with
    targets t_i = positives / their count and softmax over valid columns only. Returns [A, R] (0 on invalid rows).

    peer: None, or (peer queries, peer keys, peer temperature, alpha) of the co-teaching peer: on the rows of valid
    abnormal samples the targets become (1 - alpha) t_i + alpha softmax(peer logits_i) over the valid columns, the
    peer's distribution without gradient.
    """
    logits = jnp.einsum("ard,acd->arc", queries.astype(jnp.float32), keys.astype(jnp.float32)) / temperature
    pos, pair_valid = _pair_targets(row, col, **switches)
    logits = jnp.where(pair_valid, logits, _NEG)
    logp = jax.nn.log_softmax(logits, axis=-1)
    t = pos.astype(jnp.float32)
    t = t / jnp.maximum(t.sum(-1, keepdims=True), 1.0)
    if peer is not None:
        peer_q, peer_k, peer_temp, alpha = jax.lax.stop_gradient(peer)
        peer_logits = jnp.einsum("ard,acd->arc", peer_q.astype(jnp.float32), peer_k.astype(jnp.float32)) / peer_temp
        peer_p = jax.nn.softmax(jnp.where(pair_valid, peer_logits, _NEG), axis=-1)
        abnormal = (row["valid"] & ~row["normal"])[:, :, None]
        t = jnp.where(abnormal, (1.0 - alpha) * t + alpha * peer_p, t)
    per_row = -jnp.sum(jnp.where(pair_valid, t * logp, 0.0), axis=-1)
    return jnp.where(row["valid"], per_row, 0.0)


def _non_positive_pairs(row, col, switches):
    """[A] count of valid (row, column) pairs that are not positives: 0 when every target row is uniform."""
    pos, pair_valid = _pair_targets(row, col, **switches)
    return jnp.sum(pair_valid & ~pos, axis=(1, 2))


def _combine(row_sum, col_sum, n_valid, n_abnormal, n_non_positive=None):
    """Per anatomy 0.5 * (mean row loss + mean column loss); 0 for an anatomy with no valid abnormal sample, and
    (when n_non_positive is given: loss.skip_all_positive) for one whose valid pairs are all positives."""
    per_anatomy = 0.5 * (row_sum + col_sum) / jnp.maximum(n_valid, 1)
    used = n_abnormal > 0
    if n_non_positive is not None:
        used = used & (n_non_positive > 0)
    return jnp.where(used, per_anatomy, 0.0)


def _peers(peer_img, peer_txt, peer_temperature, coteach_alpha):
    """The `peer` arguments of `_row_losses` for the image->text rows and the text->image rows (None, None without
    a peer)."""
    if peer_img is None:
        return None, None
    return ((peer_img, peer_txt, peer_temperature, coteach_alpha),
            (peer_txt, peer_img, peer_temperature, coteach_alpha))


def anatomy_contrastive_loss(img, txt, *, valid, normal, text_id, disease, temperature, normal_pairs=True,
                             same_text_pairs=True, disease_pairs=True, skip_all_positive=False,
                             return_per_anatomy=False, peer_img=None, peer_txt=None, peer_temperature=None,
                             coteach_alpha=0.0):
    """fVLM's fine-grained contrastive loss with false-negative correction.

    Args:
      img, txt: [A, B, D] L2-normalised anatomy image / text embeddings.
      valid, normal: [A, B] bool. text_id: [A, B] int. disease: [A, B, K] bool.
      temperature: scalar; logits = img @ txt^T / temperature.
      normal_pairs, same_text_pairs, disease_pairs: switch each false-negative correction.
      skip_all_positive: an anatomy whose valid pairs are all positives contributes 0 (the public code's rule).
      peer_img, peer_txt: None, or the co-teaching peer's [A, B, D] embeddings of the same samples, with its
        peer_temperature: the targets of each valid abnormal sample's row (image->text) and column (text->image)
        are mixed with the peer's softmax over the valid samples, weight coteach_alpha (no gradient to the peer).
    Returns:
      Scalar: sum over anatomies of 0.5 * (row + column soft cross-entropy), each averaged over valid rows; an
      anatomy with no valid abnormal sample contributes 0. With return_per_anatomy, also the [A] vector.
    """
    side = _side(valid, normal, text_id, disease, jnp.arange(img.shape[1]))
    sw = dict(normal_pairs=normal_pairs, same_text_pairs=same_text_pairs, disease_pairs=disease_pairs)
    # The positive relation is symmetric, so the column (text -> image) direction is the row function with the
    # roles of the two encoders swapped.
    peer_rows, peer_cols = _peers(peer_img, peer_txt, peer_temperature, coteach_alpha)
    rows = _row_losses(img, txt, side, side, temperature, sw, peer_rows).sum(-1)
    cols = _row_losses(txt, img, side, side, temperature, sw, peer_cols).sum(-1)
    non_pos = _non_positive_pairs(side, side, sw) if skip_all_positive else None
    per_anatomy = _combine(rows, cols, side["valid"].sum(-1), jnp.sum(side["valid"] & ~side["normal"], -1), non_pos)
    loss = per_anatomy.sum()
    return (loss, per_anatomy) if return_per_anatomy else loss


def sharded_anatomy_contrastive_loss(img, txt, *, valid, normal, text_id, disease, temperature, mesh,
                                     batch_axes=("data", "fsdp"), normal_pairs=True, same_text_pairs=True,
                                     disease_pairs=True, skip_all_positive=False, return_per_anatomy=False,
                                     peer_img=None, peer_txt=None, peer_temperature=None, coteach_alpha=0.0):
    """`anatomy_contrastive_loss` as a `jax.shard_map` over the batch axes of `mesh` (same arguments and result).

    Each device keeps its own samples as rows and all-gathers only the [A, B, D] embeddings and the per-sample
    labels of the other direction: it computes its local image->text rows and local text->image rows against the
    full batch, never the whole [A, B, B] matrix, and the row sums and counts are summed over devices. The
    all-gather's transpose is a reduce-scatter, so gradients still reach every sample's encoder pass. A co-teaching
    peer's embeddings are split and gathered the same way.
    """
    batch_axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    sw = dict(normal_pairs=normal_pairs, same_text_pairs=same_text_pairs, disease_pairs=disease_pairs)
    spec2, spec3 = P(None, batch_axes), P(None, batch_axes, None)

    def local(img, txt, valid, normal, text_id, disease, temperature, *peer):
        b_local = img.shape[1]
        shard = jnp.zeros((), jnp.int32)
        for ax in batch_axes:  # linear index of this shard along the (major-to-minor) batch axes
            shard = shard * jax.lax.axis_size(ax) + jax.lax.axis_index(ax)
        mine = _side(valid, normal, text_id, disease, shard * b_local + jnp.arange(b_local))

        def gather(x):
            return jax.lax.all_gather(x, batch_axes, axis=1, tiled=True)

        full = _side(gather(valid), gather(normal), gather(text_id), gather(disease),
                     jnp.arange(b_local * jax.lax.psum(1, batch_axes)))
        peer_rows = peer_cols = None
        if peer:  # (peer_img, peer_txt, peer_temperature, coteach_alpha): local rows against the gathered columns
            p_img, p_txt, p_temp, alpha = peer
            peer_rows, peer_cols = (p_img, gather(p_txt), p_temp, alpha), (p_txt, gather(p_img), p_temp, alpha)
        rows = _row_losses(img, gather(txt), mine, full, temperature, sw, peer_rows).sum(-1)
        cols = _row_losses(txt, gather(img), mine, full, temperature, sw, peer_cols).sum(-1)
        n_valid = jax.lax.psum(mine["valid"].sum(-1), batch_axes)
        n_abnormal = jax.lax.psum(jnp.sum(mine["valid"] & ~mine["normal"], -1), batch_axes)
        non_pos = jax.lax.psum(_non_positive_pairs(mine, full, sw), batch_axes) if skip_all_positive else None
        return _combine(jax.lax.psum(rows, batch_axes), jax.lax.psum(cols, batch_axes), n_valid, n_abnormal, non_pos)

    args = (img, txt, valid, normal, text_id, disease, temperature)
    specs = (spec3, spec3, spec2, spec2, spec2, spec3, P())
    if peer_img is not None:
        args, specs = (*args, peer_img, peer_txt, peer_temperature, coteach_alpha), (*specs, spec3, spec3, P(), P())
    per_anatomy = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())(*args)
    loss = per_anatomy.sum()
    return (loss, per_anatomy) if return_per_anatomy else loss


def clip_loss(img, txt, *, temperature):
    """Whole-volume CLIP baseline: symmetric InfoNCE with identity targets. img, txt: [B, D] L2-normalised."""
    logits = img.astype(jnp.float32) @ txt.astype(jnp.float32).T / temperature
    labels = jnp.arange(img.shape[0])
    lr = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), labels[:, None], -1).mean()
    lc = -jnp.take_along_axis(jax.nn.log_softmax(logits.T, -1), labels[:, None], -1).mean()
    return 0.5 * (lr + lc)
