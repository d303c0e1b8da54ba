"""Training: model and optimizer creation, the jitted sharded train step, checkpoints, metrics, the loop.

TensorFlow-free: batches arrive as numpy dicts from any iterator (tf.data in `input_pipeline.tfdata`, or the
synthetic batches of the benchmarks).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from fvlm_jax import losses
from fvlm_jax.models.fvlm import FVLM

log = logging.getLogger(__name__)

METHODS = ("fvlm", "clip")


def make_mesh(cfg: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """A 1-D data-parallel mesh over all devices (mesh.data = -1) or the given count."""
    n = jax.device_count() if cfg.mesh.data == -1 else cfg.mesh.data
    if n > jax.device_count():
        raise ValueError(f"mesh.data={n} but only {jax.device_count()} devices are visible")
    if cfg.train.batch_size % n:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is not divisible by the {n} devices of the mesh")
    return jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])


def create_model(cfg: ml_collections.ConfigDict, method: str, seed: int | None = None) -> FVLM:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    seed = cfg.seed if seed is None else seed
    return FVLM(cfg.model, len(cfg.prep.anatomies), global_pool=method == "clip", rngs=nnx.Rngs(seed))


def learning_rate_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
    t = cfg.train
    return optax.warmup_cosine_decay_schedule(t.init_learning_rate, t.learning_rate, t.warmup_steps,
                                              max(t.steps, t.warmup_steps + 1), t.end_learning_rate)


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    # Decay only on arrays of rank >= 2 (weight matrices, embeddings, queries); not on biases, norms, temperature.
    adamw = optax.adamw(learning_rate_schedule(cfg), b1=0.9, b2=0.999, weight_decay=cfg.train.weight_decay,
                        mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
    clip = cfg.train.get("grad_clip_norm", 0.0)
    # At temperature 0.07 the first gradients are ~100x later ones; unclipped they throw a small model into the
    # collapsed state (all embeddings equal, uniform logits) that the normal-pair targets make slow to leave.
    return optax.chain(optax.clip_by_global_norm(clip), adamw) if clip else adamw


def batch_loss(model: FVLM, batch: dict, method: str, loss_cfg: ml_collections.ConfigDict):
    """Loss of one global batch. Returns (loss, aux) with per-anatomy losses for fVLM."""
    image = batch["image"].astype(jnp.float32) / 255.0
    img, _, intact = model.encode_image(image, batch["labels"])
    if method == "clip":
        txt = model.encode_text(batch["report_tokens"])
        loss = losses.clip_loss(img[:, 0], txt, temperature=model.temp())
        return loss, {"per_anatomy": jnp.zeros((0,))}
    txt = model.encode_text(batch["text_tokens"])  # [B, A, E]
    valid = intact & batch["has_text"]
    loss, per_anatomy = losses.anatomy_contrastive_loss(
        jnp.swapaxes(img, 0, 1), jnp.swapaxes(txt, 0, 1), valid=valid.T, normal=batch["normal"].T,
        text_id=batch["text_id"].T, disease=jnp.swapaxes(batch["disease"], 0, 1), temperature=model.temp(),
        normal_pairs=loss_cfg.normal_pairs, same_text_pairs=loss_cfg.same_text_pairs,
        disease_pairs=loss_cfg.disease_pairs, return_per_anatomy=True)
    return loss, {"per_anatomy": per_anatomy}


class Trainer:
    """Holds the graph definition, the sharded state and the compiled step for one method."""

    def __init__(self, cfg: ml_collections.ConfigDict, method: str, mesh: jax.sharding.Mesh):
        self.cfg, self.method, self.mesh = cfg, method, mesh
        self.tx = make_optimizer(cfg)
        self.schedule = learning_rate_schedule(cfg)
        model = create_model(cfg, method)
        self.graphdef, params = nnx.split(model, nnx.Param)
        self.replicated = NamedSharding(mesh, P())
        self.batch_sharding = NamedSharding(mesh, P("data"))

        def init(params):
            return {"params": params, "opt_state": self.tx.init(params), "step": jnp.zeros((), jnp.int32)}

        with jax.set_mesh(mesh):
            self.state = jax.jit(init, out_shardings=self.replicated)(params)
        self.state_sharding = jax.tree.map(lambda x: x.sharding, self.state)

        graphdef, tx, loss_cfg = self.graphdef, self.tx, cfg.loss

        def step_fn(state, batch):
            def loss_fn(params):
                return batch_loss(nnx.merge(graphdef, params), batch, method, loss_cfg)

            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            params = optax.apply_updates(state["params"], updates)
            metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "param_norm": optax.global_norm(params),
                       **aux, "temperature": nnx.merge(graphdef, params).temp()}
            return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

        self.step_fn = jax.jit(step_fn, in_shardings=(self.state_sharding, self.batch_sharding),
                               out_shardings=(self.state_sharding, self.replicated), donate_argnums=0)

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def model(self) -> FVLM:
        return nnx.merge(self.graphdef, self.state["params"])

    def global_batch(self, local: dict) -> dict:
        """Process-local numpy batch -> global arrays sharded along the data axis."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
                for k, v in local.items()}

    def train_step(self, local_batch: dict) -> dict:
        with jax.set_mesh(self.mesh):
            self.state, metrics = self.step_fn(self.state, self.global_batch(local_batch))
        return metrics

    # Checkpoints -------------------------------------------------------------------------------------------
    def checkpoint_manager(self, directory: str) -> ocp.CheckpointManager:
        opts = ocp.CheckpointManagerOptions(max_to_keep=self.cfg.train.keep_checkpoints, create=True)
        return ocp.CheckpointManager(os.path.abspath(directory), options=opts)

    def restore(self, mngr: ocp.CheckpointManager, step: int | None = None) -> bool:
        step = mngr.latest_step() if step is None else step
        if step is None:
            return False
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)
        self.state = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
        return True

    def save(self, mngr: ocp.CheckpointManager) -> None:
        mngr.save(self.step, args=ocp.args.StandardSave(self.state))


def _truncate_metrics(path: str, last_step: int) -> None:
    """Drop lines logged after the checkpoint we resume from (and a line cut short by a kill), so a resumed log
    has each step exactly once."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= last_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (json.JSONDecodeError, KeyError):
                continue
    with open(path, "w") as f:
        f.writelines(kept)


def train(cfg: ml_collections.ConfigDict, method: str, train_dir: str,
          batches: Callable[[int], Iterator[dict]], *, progress: bool = True) -> Trainer:
    """Trains `method` for cfg.train.steps, resuming from the last checkpoint in `train_dir`.

    batches(start_step) yields process-local numpy batches from step `start_step` on (deterministic order, so
    a resumed run sees the data an uninterrupted run would). Metrics go to <train_dir>/metrics.jsonl.
    """
    os.makedirs(train_dir, exist_ok=True)
    mesh = make_mesh(cfg)
    trainer = Trainer(cfg, method, mesh)
    mngr = trainer.checkpoint_manager(os.path.join(train_dir, "checkpoints"))
    metrics_path = os.path.join(train_dir, "metrics.jsonl")
    writer = jax.process_index() == 0  # host-side files are written by one process; Orbax saves from all
    if trainer.restore(mngr):
        log.info("%s: resumed from step %d", method, trainer.step)
        if writer:
            _truncate_metrics(metrics_path, trainer.step)
    elif writer and os.path.exists(metrics_path):
        os.remove(metrics_path)
    total, start = cfg.train.steps, trainer.step
    if start >= total:
        log.info("%s: already trained (%d steps)", method, start)
        return trainer
    anatomies = list(cfg.prep.anatomies)
    bar = tqdm(total=total, initial=start, desc=f"train {method}", disable=not progress or jax.process_index(),
               dynamic_ncols=True)
    t0, seen = time.perf_counter(), 0
    # Line-buffered: a kill can never leave a row that is only partly written, and rows reach the disk before the
    # checkpoint of their step does.
    with open(metrics_path, "a", buffering=1) if writer else open(os.devnull, "w") as metrics_file:
        for batch in batches(start):
            step = trainer.step
            metrics = jax.device_get(trainer.train_step(batch))
            seen += cfg.train.batch_size
            loss = float(metrics["loss"])
            # The updated parameters are checked too: a finite loss can still be followed by an overflowing update,
            # and that state must never become the "last good" checkpoint.
            if not np.isfinite([loss, metrics["grad_norm"], metrics["param_norm"]]).all():
                mngr.wait_until_finished()
                last = mngr.latest_step()
                raise FloatingPointError(
                    f"{method}: non-finite loss, gradients or parameters at step {step + 1}; "
                    + (f"last good checkpoint is step {last}" if last is not None else "no checkpoint was saved yet"))
            row = {"step": step + 1, "loss": loss, "learning_rate": float(trainer.schedule(step)),
                   "grad_norm": float(metrics["grad_norm"]), "param_norm": float(metrics["param_norm"]),
                   "temperature": float(metrics["temperature"])}
            row.update({f"loss/{a}": float(v) for a, v in zip(anatomies, metrics["per_anatomy"])})
            metrics_file.write(json.dumps(row) + "\n")
            bar.update(1)
            if (step + 1) % cfg.train.log_every == 0 or step + 1 == total:
                rate = seen / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{row['learning_rate']:.1e}", vol_s=f"{rate:.1f}")
            if (step + 1) % cfg.train.checkpoint_every == 0 or step + 1 == total:
                trainer.save(mngr)
            if step + 1 >= total:
                break
    bar.close()
    mngr.wait_until_finished()
    return trainer


def restore_params(cfg: ml_collections.ConfigDict, method: str, train_dir: str) -> FVLM:
    """The model of the last checkpoint in <train_dir>/checkpoints (for evaluation and export)."""
    trainer = Trainer(cfg, method, make_mesh(cfg))
    mngr = trainer.checkpoint_manager(os.path.join(train_dir, "checkpoints"))
    if not trainer.restore(mngr):
        raise FileNotFoundError(f"no checkpoint in {train_dir}/checkpoints: run --mode=train first")
    return trainer.model()
