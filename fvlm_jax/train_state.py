"""The training state: model creation, optimizer and learning-rate schedule, and the sharded state layout.

The state is a plain dict {"params", "opt_state", "step"} of arrays (`nnx.to_pure_dict` of the parameters, the
optimizer state over those), not nnx.Variable objects: every step's call would otherwise rebuild one Python object
per parameter and Adam moment from the outputs (930 of them at the paper's size: 5.4 ms of host time per step in an
H200 profile, where the step's call took 34-45 ms of a 45-48 ms step). `nnx.merge` takes the pure dict as it is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from fvlm_jax import pretrained, sharding
from fvlm_jax.models.fvlm import FVLM, METHODS


def create_model(cfg: ml_collections.ConfigDict, method: str, seed: int | None = None) -> FVLM:
    """The model `method` ("fvlm" or "clip") of cfg.model, initialised from `seed` (default cfg.seed)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    seed = cfg.seed if seed is None else seed
    return FVLM(cfg.model, len(cfg.prep.anatomies), global_pool=method == "clip", rngs=nnx.Rngs(seed))


def learning_rate_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
    t = cfg.train
    return optax.warmup_cosine_decay_schedule(t.init_learning_rate, t.learning_rate, t.warmup_steps,
                                              max(t.steps, t.warmup_steps + 1), t.end_learning_rate)


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with the warmup-cosine schedule, after global-norm clipping at train.grad_clip_norm (0 = off)."""
    # Decay only on arrays of rank >= 2 (weight matrices, embeddings, queries); not on biases, norms, temperature.
    adamw = optax.adamw(learning_rate_schedule(cfg), b1=0.9, b2=0.999, weight_decay=cfg.train.weight_decay,
                        mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
    clip = cfg.train.grad_clip_norm
    # At temperature 0.07 the first gradients are ~100x later ones; unclipped they throw a small model into the
    # collapsed state (all embeddings equal, uniform logits) that the normal-pair targets make slow to leave.
    return optax.chain(optax.clip_by_global_norm(clip), adamw) if clip else adamw


def plain(tree):
    """The tree with each nnx.State in it as the plain nested dict of its values (nnx.to_pure_dict)."""
    return jax.tree.map(lambda x: nnx.to_pure_dict(x) if isinstance(x, nnx.State) else x, tree,
                        is_leaf=lambda x: isinstance(x, nnx.State))


def abstract_model(cfg: ml_collections.ConfigDict, method: str) -> tuple[nnx.GraphDef, nnx.State]:
    """(graph definition, abstract parameters as an nnx.State of Variables with their logical axes), without
    allocating any weight."""
    return nnx.split(nnx.eval_shape(lambda: create_model(cfg, method)), nnx.Param)


def peer_seed(cfg: ml_collections.ConfigDict) -> int:
    """The co-teaching peer's seed (its initialisation, flips and dropout masks): cfg.seed + 1."""
    return int(cfg.seed) + 1


def abstract_state(cfg: ml_collections.ConfigDict, method: str, tx: optax.GradientTransformation,
                   mesh: jax.sharding.Mesh, coteach: bool = False):
    """(graph definition, the plain training state as jax.ShapeDtypeStructs carrying their NamedShardings): what a
    checkpoint is restored into, with nothing initialised or allocated. The optimizer moments carry their
    parameter's logical axes in the Variable form, so they are split like their parameter. coteach: the state also
    holds the peer model, {"peer": {"params", "opt_state"}}, laid out as the first."""
    graphdef, params = abstract_model(cfg, method)
    variable_state = {"params": params, "opt_state": jax.eval_shape(tx.init, params),
                      "step": jax.ShapeDtypeStruct((), jnp.int32)}
    if coteach:
        variable_state["peer"] = {"params": params, "opt_state": variable_state["opt_state"]}
    shardings = plain(sharding.state_shardings(variable_state, mesh, cfg.sharding.rules))
    return graphdef, jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  plain(variable_state), shardings)


def state_shardings(cfg: ml_collections.ConfigDict, method: str, tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh, coteach: bool = False):
    """(graph definition, NamedShardings of the plain training state): `abstract_state`'s shardings."""
    graphdef, abstract = abstract_state(cfg, method, tx, mesh, coteach)
    return graphdef, jax.tree.map(lambda x: x.sharding, abstract)


def init_state(cfg: ml_collections.ConfigDict, method: str, tx: optax.GradientTransformation, shardings,
               coteach: bool = False) -> dict:
    """The initial training state, created inside `jax.jit` with `shardings` (so with fsdp > 1 it is never whole on
    one device), with the pretrained encoder weights of model.vision.init / model.text.init put in
    (`pretrained.load_encoders`; cfg resolved by `pretrained.resolve`). Call it under `jax.set_mesh`. coteach: also
    the peer model, initialised from `peer_seed(cfg)` (the same pretrained weights put in), and its optimizer
    state."""
    loaded, _ = pretrained.load_encoders(cfg)

    def init(loaded):
        def model_state(seed):
            params = nnx.to_pure_dict(nnx.state(create_model(cfg, method, seed), nnx.Param))
            params = pretrained.merge(params, loaded)
            return {"params": params, "opt_state": tx.init(params)}

        state = {**model_state(None), "step": jnp.zeros((), jnp.int32)}
        if coteach:
            state["peer"] = model_state(peer_seed(cfg))
        return state

    return jax.jit(init, out_shardings=shardings)(loaded)
