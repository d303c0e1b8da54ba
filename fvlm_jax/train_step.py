"""The train step as a pure, module-level function: loss, gradients (optionally accumulated exactly over
micro-batches), optimizer update and the step's metrics. `train.Trainer` jits it with the state's shardings; a test
can call it on its own (`jax.jit(functools.partial(train_step, **static))`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from fvlm_jax import augment, losses, sharding
from fvlm_jax.models.fvlm import FVLM, clamp_temperature
from fvlm_jax.models.transformer import train_dropout


def embed(model: FVLM, batch: dict, method: str, lengths=None):
    """Encoder pass of one (micro-)batch: image [B, A, E] and text [B, A, E] embeddings, and intact [B, A].
    lengths: tokens per anatomy text (fVLM; None = all stored tokens), see fvlm_jax.text_lengths."""
    image = batch["image"].astype(jnp.float32) / 255.0
    img, _, intact = model.encode_image(image, batch["labels"])
    if method == "clip":
        txt = model.encode_text(batch["report_tokens"])
    else:
        txt = model.encode_anatomy_texts(batch["text_tokens"], lengths)
    return img, txt, intact


def loss_from_embeddings(img, txt, intact, temperature, batch, method, loss_cfg, mesh, peer=None):
    """The contrastive loss of the global batch from its embeddings ([B, A, E] each). Returns (loss, per-anatomy
    losses [A]; empty for CLIP). peer: None, or the co-teaching peer's (img, txt, temperature, alpha) of the same
    samples (fVLM only)."""
    with jax.named_scope("loss"):
        if method == "clip":
            return losses.clip_loss(img[:, 0], txt, temperature=temperature), jnp.zeros((0,))
        kw = dict(valid=(intact & batch["has_text"]).T, normal=batch["normal"].T, text_id=batch["text_id"].T,
                  disease=jnp.swapaxes(batch["disease"], 0, 1), temperature=temperature,
                  normal_pairs=loss_cfg.normal_pairs, same_text_pairs=loss_cfg.same_text_pairs,
                  disease_pairs=loss_cfg.disease_pairs, skip_all_positive=loss_cfg.skip_all_positive,
                  return_per_anatomy=True)
        img, txt = jnp.swapaxes(img, 0, 1), jnp.swapaxes(txt, 0, 1)
        if peer is not None:
            p_img, p_txt, p_temp, alpha = peer
            kw.update(peer_img=jnp.swapaxes(p_img, 0, 1), peer_txt=jnp.swapaxes(p_txt, 0, 1), peer_temperature=p_temp,
                      coteach_alpha=alpha)
        if loss_cfg.impl == "shard_map" and mesh is not None:
            return losses.sharded_anatomy_contrastive_loss(img, txt, mesh=mesh, **kw)
        return losses.anatomy_contrastive_loss(img, txt, **kw)


def training_model(graphdef, params, dropout_key=None) -> FVLM:
    """The model of `params` for a training pass: with its dropout layers on, keyed from `dropout_key`, when given
    (None: model.dropout is 0, and the model is exactly the evaluation one)."""
    model = nnx.merge(graphdef, params)
    if dropout_key is not None:
        train_dropout(model, dropout_key)
    return model


def batch_loss(model: FVLM, batch: dict, method: str, loss_cfg: ml_collections.ConfigDict, mesh=None,
               lengths=None):
    """Loss of one global batch. Returns (loss, aux) with per-anatomy losses for fVLM."""
    img, txt, intact = embed(model, batch, method, lengths)
    loss, per_anatomy = loss_from_embeddings(img, txt, intact, model.temp(), batch, method, loss_cfg, mesh)
    return loss, {"per_anatomy": per_anatomy}


def accumulated_value_and_grad(graphdef, params, batch: dict, method: str, loss_cfg, mesh, num_micro: int,
                               batch_spec=None, lengths=None, dropout_key=None):
    """(loss, aux), grads of the *global-batch* loss, computing encoder activations one micro-batch at a time.

    Exact, not an approximation (the GradCache scheme): 1) embed every micro-batch without keeping activations;
    2) the contrastive loss of the whole batch and its gradient with respect to the embeddings (and temperature);
    3) per micro-batch, re-run the encoders under `jax.vjp` and pull the embedding gradient back to the
    parameters, summing. Costs one extra forward pass; activation memory is that of one micro-batch. With dropout,
    micro-batch m's two passes use the same key (folded from `dropout_key` and m), so the same masks.
    """
    b = batch["image"].shape[0]
    if b % num_micro:
        raise ValueError(f"batch {b} is not divisible into {num_micro} micro-batches")

    def split(x):  # [B, ...] -> [M, B/M, ...]; micro-batch m takes rows m, M+m, ... so it spans every device
        x = jnp.swapaxes(x.reshape(b // num_micro, num_micro, *x.shape[1:]), 0, 1)
        if batch_spec is not None:
            x = jax.lax.with_sharding_constraint(x, P(None, *batch_spec))
        return x

    micro = jax.tree.map(split, batch)
    keys = None if dropout_key is None else jax.vmap(lambda m: jax.random.fold_in(dropout_key, m))(
        jnp.arange(num_micro))

    def embed_micro(p, mb, key):
        return embed(training_model(graphdef, p, key), mb, method, lengths)

    img, txt, intact = jax.lax.map(lambda xs: embed_micro(params, *xs), (micro, keys))
    flat = jax.tree.map(lambda x: x.reshape(b, *x.shape[2:]), dict(micro=micro, img=img, txt=txt, intact=intact))

    def head_loss(img, txt, p):
        temp = nnx.merge(graphdef, p).temp()
        return loss_from_embeddings(img, txt, flat["intact"], temp, flat["micro"], method, loss_cfg, mesh)

    (loss, per_anatomy), (g_img, g_txt, grads) = jax.value_and_grad(head_loss, argnums=(0, 1, 2), has_aux=True)(
        flat["img"], flat["txt"], params)
    g_img, g_txt = (g.reshape(num_micro, b // num_micro, *g.shape[1:]) for g in (g_img, g_txt))

    def backward(acc, xs):
        mb, key, gi, gt = xs
        _, vjp = jax.vjp(lambda p: embed_micro(p, mb, key)[:2], params)
        return jax.tree.map(jnp.add, acc, vjp((gi, gt))[0]), None

    grads, _ = jax.lax.scan(backward, grads, (micro, keys, g_img, g_txt))
    return (loss, {"per_anatomy": per_anatomy}), grads


def apply_update(tx: optax.GradientTransformation, grads, opt_state, params: dict, clamp=None) -> tuple[dict, object]:
    """(new parameters, new optimizer state) after one update; with `clamp` (cfg.model.temperature, mode "clamp") the
    temperature is then put back into [min, max]."""
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if clamp is not None:
        params = clamp_temperature(params, clamp)
    return params, opt_state


def train_step(state: dict, batch: dict, *, graphdef, tx: optax.GradientTransformation, method: str,
               loss_cfg: ml_collections.ConfigDict, rules, width: int, num_micro: int = 1, mesh=None,
               batch_spec=None, lengths=None, dropout_seed: int | None = None,
               clamp=None) -> tuple[dict, dict]:
    """One optimizer step. state: {"params", "opt_state", "step"} (fvlm_jax.train_state); batch: global arrays, with
    `labels_packed`, `label_shift` and `flip` from tf.data (finished here, on the device: fvlm_jax.augment) or plain
    `labels`. width: the model's input x size. dropout_seed: None (model.dropout 0), else the seed of the dropout
    keys, one per step (folded with the step, so a resumed run draws the same masks). clamp: None, or
    cfg.model.temperature when its mode is "clamp" (the temperature is put back into range after the update).
    Returns (new state, metrics: loss, per_anatomy [A], grad_norm, param_norm, temperature)."""
    dropout_key = step_key(dropout_seed, state["step"])
    with sharding.axis_rules(rules):
        if "labels_packed" in batch:
            with jax.named_scope("augment"):
                batch = augment.finish_on_device(batch, width)
        if num_micro > 1:
            (loss, aux), grads = accumulated_value_and_grad(
                graphdef, state["params"], batch, method, loss_cfg, mesh, num_micro, batch_spec, lengths, dropout_key)
        else:
            def loss_fn(params):
                return batch_loss(training_model(graphdef, params, dropout_key), batch, method, loss_cfg, mesh,
                                  lengths)

            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    # One scope for the update and the norms logged with it: XLA fuses them into the same kernels.
    with jax.named_scope("optimizer"):
        params, opt_state, norms = update(state["params"], state["opt_state"], grads, graphdef, tx, clamp)
        metrics = {"loss": loss, "grad_norm": norms["grad_norm"], "param_norm": norms["param_norm"], **aux,
                   "temperature": norms["temperature"]}
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics


def step_key(seed: int | None, step):
    """The random key of `step` drawn from `seed` (None when seed is None)."""
    return None if seed is None else jax.random.fold_in(jax.random.key(seed), step)


def update(params, opt_state, grads, graphdef, tx: optax.GradientTransformation, clamp):
    """One optimizer update of one model. Returns (params, opt_state, {grad_norm, param_norm, temperature})."""
    params, opt_state = apply_update(tx, grads, opt_state, params, clamp)
    return params, opt_state, {"grad_norm": optax.global_norm(grads), "param_norm": optax.global_norm(params),
                               "temperature": nnx.merge(graphdef, params).temp()}


def coteach_alpha(loss_cfg: ml_collections.ConfigDict, step):
    """The co-teaching weight of the step that starts at `step` completed steps: 0 before
    loss.coteach_start_step, then a linear ramp reaching loss.coteach_alpha after loss.coteach_ramp_steps steps
    (0 or 1: at once)."""
    ramp = max(int(loss_cfg.coteach_ramp_steps), 1)
    frac = jnp.clip((step - int(loss_cfg.coteach_start_step) + 1) / ramp, 0.0, 1.0)
    return float(loss_cfg.coteach_alpha) * frac.astype(jnp.float32)




def coteach_train_step(state: dict, batch: dict, *, graphdef, tx: optax.GradientTransformation,
                       loss_cfg: ml_collections.ConfigDict, rules, width: int, peer_seed: int, flip_prob: float,
                       mesh=None, lengths=None, dropout_seed: int | None = None, clamp=None) -> tuple[dict, dict]:
    """One co-teaching step of fVLM (loss.coteach): both models of `state` (model A in "params"/"opt_state", its
    peer B in state["peer"]) see the same samples of `batch`; B sees them with its own flips (drawn from
    `peer_seed`, packed training batches only) and dropout masks. Each model's loss mixes the abnormal samples'
    targets with the other's similarities (no gradient through them, weight `coteach_alpha(loss_cfg, step)`), and
    each model takes its own optimizer update. Arguments as `train_step`. Returns (new state, metrics): model A's
    metrics under `train_step`'s names, and peer_loss, peer_grad_norm, peer_param_norm, peer_temperature and
    coteach_alpha (the mixing weight of this step)."""
    step = state["step"]
    alpha = coteach_alpha(loss_cfg, step)
    # The peer's randomness of this step (the same draws on any mesh, and again after a resume): its flips, and its
    # dropout masks when the model has dropout.
    peer_key = step_key(peer_seed, step)
    keys = {"a": step_key(dropout_seed, step), "b": None if dropout_seed is None else jax.random.fold_in(peer_key, 1)}
    with sharding.axis_rules(rules):
        batches = {"a": batch, "b": batch}
        if "labels_packed" in batch:
            flips = jax.random.bernoulli(jax.random.fold_in(peer_key, 0), flip_prob, batch["flip"].shape)
            with jax.named_scope("augment"):
                batches = {"a": augment.finish_on_device(batch, width),
                           "b": augment.finish_on_device({**batch, "flip": flips}, width)}

        def loss_fn(params):
            emb = {}
            for m in ("a", "b"):
                model = training_model(graphdef, params[m], keys[m])
                emb[m] = (*embed(model, batches[m], "fvlm", lengths), model.temp())
            out = {}
            for m, peer in (("a", "b"), ("b", "a")):  # the peer's part is under stop_gradient in the loss
                img, txt, intact, temp = emb[m]
                out[m] = loss_from_embeddings(img, txt, intact, temp, batches[m], "fvlm", loss_cfg, mesh,
                                              peer=(emb[peer][0], emb[peer][1], emb[peer][3], alpha))
            return out["a"][0] + out["b"][0], out

        both = {"a": state["params"], "b": state["peer"]["params"]}
        (_, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(both)
    with jax.named_scope("optimizer"):
        params, opt_state, norms = update(state["params"], state["opt_state"], grads["a"], graphdef, tx, clamp)
        peer_params, peer_opt, peer_norms = update(state["peer"]["params"], state["peer"]["opt_state"], grads["b"],
                                                   graphdef, tx, clamp)
    metrics = {"loss": out["a"][0], "grad_norm": norms["grad_norm"], "param_norm": norms["param_norm"],
               "per_anatomy": out["a"][1], "temperature": norms["temperature"], "peer_loss": out["b"][0],
               "peer_grad_norm": peer_norms["grad_norm"], "peer_param_norm": peer_norms["param_norm"],
               "peer_temperature": peer_norms["temperature"], "coteach_alpha": alpha}
    return {"params": params, "opt_state": opt_state, "step": step + 1,
            "peer": {"params": peer_params, "opt_state": peer_opt}}, metrics
