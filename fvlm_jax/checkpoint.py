"""Orbax checkpoints of the training state, and the params-only restore that evaluation and export use.

A checkpoint is the plain state dict {"params", "opt_state", "step"} (fvlm_jax.train_state), saved asynchronously
and atomically by an Orbax CheckpointManager that keeps the last train.keep_checkpoints. `restore_model` reads only
the "params" subtree, onto the shardings of the current mesh: no optimizer state is built or read.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from fvlm_jax import sharding, train_state
from fvlm_jax.models.fvlm import FVLM


def manager(directory: str, keep: int) -> ocp.CheckpointManager:
    """The checkpoint manager of a run's checkpoints/ folder, keeping the last `keep` steps."""
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=opts)


def save(mngr: ocp.CheckpointManager, step: int, state: dict) -> None:
    mngr.save(step, args=ocp.args.StandardSave(state))


def restore(mngr: ocp.CheckpointManager, like: dict, step: int | None = None) -> dict | None:
    """The state saved at `step` (default: the latest), laid out like `like` (its shapes, dtypes and shardings);
    None when there is no checkpoint."""
    step = mngr.latest_step() if step is None else step
    if step is None:
        return None
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def restore_model(cfg: ml_collections.ConfigDict, method: str, directory: str, mesh: jax.sharding.Mesh,
                  step: int | None = None) -> FVLM:
    """The model saved in the checkpoints folder `directory` at `step` (default: the latest), its parameters
    sharded on `mesh` by cfg.sharding.rules. Reads the parameters only."""
    directory = os.path.abspath(directory)
    with ocp.CheckpointManager(directory, item_handlers=ocp.PyTreeCheckpointHandler()) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}: run --mode=train first")
        graphdef, abstract = train_state.abstract_model(cfg, method)
        shardings = train_state.plain(sharding.state_shardings(abstract, mesh, cfg.sharding.rules))
        like = {"params": jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                       nnx.to_pure_dict(abstract), shardings)}
        restored = mngr.restore(step, args=ocp.args.PyTreeRestore(
            item=like, restore_args=ocp.checkpoint_utils.construct_restore_args(like), partial_restore=True))
    return nnx.merge(graphdef, restored["params"])
