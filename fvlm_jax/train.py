"""Training: model and optimizer creation, the jitted sharded train step, checkpoints, metrics, the loop.

TensorFlow-free: batches arrive as numpy dicts from any iterator (tf.data in `input_pipeline.tfdata`, or the
synthetic batches of the benchmarks).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
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

from fvlm_jax import augment, losses, sharding, text_lengths
from fvlm_jax.models.fvlm import FVLM
from fvlm_jax.prefetch import prefetch
from fvlm_jax.sharding import make_mesh  # noqa: F401  (re-exported: train.make_mesh(cfg))

log = logging.getLogger(__name__)

METHODS = ("fvlm", "clip")


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


def _embed(model: FVLM, batch: dict, method: str, lengths=None):
    """Encoder pass of one (micro-)batch: image [B, A, E] and text [B, A, E] embeddings, and intact [B, A].
    lengths: tokens per anatomy text (fVLM; None = all stored tokens), see fvlm_jax.text_lengths."""
    image = batch["image"].astype(jnp.float32) / 255.0
    img, _, intact = model.encode_image(image, batch["labels"])
    if method == "clip":
        txt = model.encode_text(batch["report_tokens"])
    else:
        txt = model.encode_anatomy_texts(batch["text_tokens"], lengths)
    return img, txt, intact


def _loss_from_embeddings(img, txt, intact, temperature, batch, method, loss_cfg, mesh):
    """The contrastive loss of the global batch from its embeddings. Returns (loss, per-anatomy losses)."""
    with jax.named_scope("loss"):
        return _contrastive_loss(img, txt, intact, temperature, batch, method, loss_cfg, mesh)


def _contrastive_loss(img, txt, intact, temperature, batch, method, loss_cfg, mesh):
    if method == "clip":
        return losses.clip_loss(img[:, 0], txt, temperature=temperature), jnp.zeros((0,))
    kw = dict(valid=(intact & batch["has_text"]).T, normal=batch["normal"].T, text_id=batch["text_id"].T,
              disease=jnp.swapaxes(batch["disease"], 0, 1), temperature=temperature,
              normal_pairs=loss_cfg.normal_pairs, same_text_pairs=loss_cfg.same_text_pairs,
              disease_pairs=loss_cfg.disease_pairs, return_per_anatomy=True)
    img, txt = jnp.swapaxes(img, 0, 1), jnp.swapaxes(txt, 0, 1)
    if loss_cfg.get("impl", "gspmd") == "shard_map" and mesh is not None:
        return losses.sharded_anatomy_contrastive_loss(img, txt, mesh=mesh, **kw)
    return losses.anatomy_contrastive_loss(img, txt, **kw)


def batch_loss(model: FVLM, batch: dict, method: str, loss_cfg: ml_collections.ConfigDict, mesh=None,
               lengths=None):
    """Loss of one global batch. Returns (loss, aux) with per-anatomy losses for fVLM."""
    img, txt, intact = _embed(model, batch, method, lengths)
    loss, per_anatomy = _loss_from_embeddings(img, txt, intact, model.temp(), batch, method, loss_cfg, mesh)
    return loss, {"per_anatomy": per_anatomy}


def accumulated_value_and_grad(graphdef, params, batch: dict, method: str, loss_cfg, mesh, num_micro: int,
                               batch_spec=None, lengths=None):
    """(loss, aux), grads of the *global-batch* loss, computing encoder activations one micro-batch at a time.

    Exact, not an approximation (the GradCache scheme): 1) embed every micro-batch without keeping activations;
    2) the contrastive loss of the whole batch and its gradient with respect to the embeddings (and temperature);
    3) per micro-batch, re-run the encoders under `jax.vjp` and pull the embedding gradient back to the
    parameters, summing. Costs one extra forward pass; activation memory is that of one micro-batch.
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

    def embed(p, mb):
        return _embed(nnx.merge(graphdef, p), mb, method, lengths)

    img, txt, intact = jax.lax.map(lambda mb: embed(params, mb), micro)
    flat = jax.tree.map(lambda x: x.reshape(b, *x.shape[2:]), dict(micro=micro, img=img, txt=txt, intact=intact))

    def head_loss(img, txt, p):
        temp = nnx.merge(graphdef, p).temp()
        return _loss_from_embeddings(img, txt, flat["intact"], temp, flat["micro"], method, loss_cfg, mesh)

    (loss, per_anatomy), (g_img, g_txt, grads) = jax.value_and_grad(head_loss, argnums=(0, 1, 2), has_aux=True)(
        flat["img"], flat["txt"], params)
    g_img, g_txt = (g.reshape(num_micro, b // num_micro, *g.shape[1:]) for g in (g_img, g_txt))

    def backward(acc, xs):
        mb, gi, gt = xs
        _, vjp = jax.vjp(lambda p: embed(p, mb)[:2], params)
        return jax.tree.map(jnp.add, acc, vjp((gi, gt))[0]), None

    grads, _ = jax.lax.scan(backward, grads, (micro, g_img, g_txt))
    return (loss, {"per_anatomy": per_anatomy}), grads


def _plain(tree):
    """The tree with each nnx.State in it as the plain nested dict of its values (nnx.to_pure_dict)."""
    return jax.tree.map(lambda x: nnx.to_pure_dict(x) if isinstance(x, nnx.State) else x, tree,
                        is_leaf=lambda x: isinstance(x, nnx.State))


class Trainer:
    """Holds the graph definition, the sharded state and the compiled step for one method.

    The state (parameters, optimizer moments, step) is created inside `jax.jit` with the shardings that the
    parameters' logical axis names and cfg.sharding.rules give, so with fsdp > 1 it is never whole on one device.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, method: str, mesh: jax.sharding.Mesh):
        self.cfg, self.method, self.mesh = cfg, method, mesh
        self.rules = tuple(cfg.get("sharding", {}).get("rules", sharding.DEFAULT_RULES))
        self.tx = make_optimizer(cfg)
        self.schedule = learning_rate_schedule(cfg)
        tx = self.tx

        # The state holds plain arrays (`nnx.to_pure_dict` of the parameters, and the optimizer state over those),
        # not nnx.Variable objects: every step's call would otherwise rebuild one Python object per parameter and
        # Adam moment from the outputs (930 of them at the paper's size: 5.4 ms of host time per step in an H200
        # profile, where the step's call took 34-45 ms of a 45-48 ms step). nnx.merge takes the pure dict as it is.
        def init():
            params = nnx.to_pure_dict(nnx.state(create_model(cfg, method), nnx.Param))
            return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

        # One abstract model gives the graph definition and the parameters' shapes and logical axes. The shardings
        # come from the state in its nnx.Variable form (the optimizer moments carry their parameter's metadata) and
        # are then laid out like the plain state; that form is also the layout of earlier checkpoints.
        self.graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: create_model(cfg, method)), nnx.Param)
        variable_state = {"params": abstract_params, "opt_state": jax.eval_shape(tx.init, abstract_params),
                          "step": jax.ShapeDtypeStruct((), jnp.int32)}
        variable_sharding = sharding.state_shardings(variable_state, mesh, self.rules)
        self.state_sharding = _plain(variable_sharding)
        self._variable_layout = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                             variable_state, variable_sharding)
        self.replicated = NamedSharding(mesh, P())
        self.batch_spec = sharding.logical_to_spec(("batch",), self.rules)
        self.batch_sharding = NamedSharding(mesh, self.batch_spec)
        with jax.set_mesh(mesh):
            self.state = jax.jit(init, out_shardings=self.state_sharding)()

        graphdef, loss_cfg, rules = self.graphdef, cfg.loss, self.rules
        # Tokens per anatomy text (model.text.anatomy_len; a percentile there is resolved by stages.run_train).
        self.text_lengths = lengths = text_lengths.parse(cfg.model.text.get("anatomy_len", ""),
                                                         cfg.prep.anatomies, cfg.prep.text_len)
        num_micro = int(cfg.train.get("grad_accum_steps", 1))
        batch_spec = self.batch_spec

        width = int(cfg.model.input_zyx[2])

        def step_fn(state, batch):
            with sharding.axis_rules(rules):
                if "labels_packed" in batch:  # tf.data batches: unpack the labels and flip on the device
                    with jax.named_scope("augment"):
                        batch = augment.finish_on_device(batch, width)
                if num_micro > 1:
                    (loss, aux), grads = accumulated_value_and_grad(
                        graphdef, state["params"], batch, method, loss_cfg, mesh, num_micro, batch_spec, lengths)
                else:
                    def loss_fn(params):
                        return batch_loss(nnx.merge(graphdef, params), batch, method, loss_cfg, mesh, lengths)

                    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
            # One scope for the update and the norms logged with it: XLA fuses them into the same kernels.
            with jax.named_scope("optimizer"):
                updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
                params = optax.apply_updates(state["params"], updates)
                metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
                           "param_norm": optax.global_norm(params), **aux,
                           "temperature": nnx.merge(graphdef, params).temp()}
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
        """One step on a process-local numpy batch (copied to the devices here). Returns the metrics (on device)."""
        return self.step_on_device(self.global_batch(local_batch))

    def step_on_device(self, batch: dict) -> dict:
        """One step on a batch of global arrays (`global_batch`, or `device_batches`). Dispatches and returns at
        once; the metrics are device arrays until fetched."""
        with jax.set_mesh(self.mesh):
            self.state, metrics = self.step_fn(self.state, batch)
        return metrics

    def device_batches(self, local_batches: Iterator[dict], ahead: int = 2) -> Iterator[dict]:
        """The batches as global device arrays, copied ahead in a background thread (`ahead` queued, one more
        waiting for room).

        The host-to-device copy of a batch is host work of tens of milliseconds at the paper's size, and on a GPU the
        step's call itself took most of a step's time on the host (an H200 profile, when the state still held
        nnx.Variable objects), so a copy in the loop could not overlap the step; done ahead it does (on an H200
        with 14 volumes per step, bench/feed_check.py: 58.6 ms per step with the copy in the loop, 52.4 ms with
        ahead=2, 47.5 ms with the batches already on the device). ahead=0 copies in the loop.
        """
        if ahead <= 0:
            return (self.global_batch(b) for b in local_batches)
        return prefetch(local_batches, self.global_batch, ahead)

    # Checkpoints -------------------------------------------------------------------------------------------
    def checkpoint_manager(self, directory: str) -> ocp.CheckpointManager:
        opts = ocp.CheckpointManagerOptions(max_to_keep=self.cfg.train.keep_checkpoints, create=True)
        return ocp.CheckpointManager(os.path.abspath(directory), options=opts)

    def restore(self, mngr: ocp.CheckpointManager, step: int | None = None) -> bool:
        step = mngr.latest_step() if step is None else step
        if step is None:
            return False
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)
        try:
            self.state = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
        except ValueError:  # tree structures differ: maybe a checkpoint of the nnx.Variable layout
            legacy = self._restore_variable_layout(mngr, step)
            if legacy is None:
                raise
            log.info("restored a checkpoint of the earlier nnx.Variable layout (step %d)", step)
            self.state = legacy
        return True

    def _restore_variable_layout(self, mngr: ocp.CheckpointManager, step: int) -> dict | None:
        """A checkpoint written before the state held plain arrays (its parameters and Adam moments were nnx.State
        trees of nnx.Variable), restored and converted to the present layout; None if it is not one."""
        try:
            old = mngr.restore(step, args=ocp.args.StandardRestore(self._variable_layout))
        except ValueError:
            return None
        new = _plain(old)
        return new if jax.tree.structure(new) == jax.tree.structure(self.state) else None

    def save(self, mngr: ocp.CheckpointManager) -> None:
        mngr.save(self.step, args=ocp.args.StandardSave(self.state))


class Preempted(Exception):
    """Training stopped on a preemption notice (SIGTERM) after saving a checkpoint; rerun the same command."""


class _PreemptionWatch:
    """A SIGTERM, which schedulers (SLURM, Kubernetes, cloud spot/preemptible VMs) send before killing a job, asks
    training to save at the next step boundary and stop.

    One process: our own SIGTERM handler sets a flag (the previous handler is restored afterwards). Several
    processes: JAX's distributed runtime receives the notice, and Orbax's `reached_preemption` makes every process
    agree on the same step, so all of them save the same checkpoint.
    """

    def __init__(self):
        self.requested = False
        self._installed, self._previous = False, None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True

    def _on_sigterm(self, signum, frame):
        self.requested = True

    def reached(self, step: int, mngr: ocp.CheckpointManager) -> bool:
        if jax.process_count() > 1:
            return mngr.reached_preemption(step)
        return self.requested

    def close(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False


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
    with open(path + ".tmp", "w") as f:  # replaced in one step: a kill here leaves the old log whole
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def _tensorboard(cfg: ml_collections.ConfigDict, train_dir: str, start: int):
    """A TensorBoard event writer in <train_dir>/tensorboard (tensorboardX: no TensorFlow in training).

    It marks a restart at step start + 1, so TensorBoard drops the events of earlier runs from that step on (those
    logged after the checkpoint this run resumes from, or a whole earlier run): each step shows once, as in
    metrics.jsonl."""
    if not cfg.train.get("tensorboard", False):
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(os.path.join(train_dir, "tensorboard"), flush_secs=30, purge_step=start + 1)


def _console(bar, method: str, row: dict, total: int, rate: float, batch_size: int, anatomies: list) -> None:
    """One readable line per log interval: step, loss, per-anatomy losses, learning rate, volumes/s, ETA."""
    eta = (total - row["step"]) * batch_size / rate if rate > 0 else float("nan")
    eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if np.isfinite(eta) else "?"
    parts = " ".join(f"{a} {row[f'loss/{a}']:.3f}" for a in anatomies if f"loss/{a}" in row)
    bar.write(f"{method} step {row['step']}/{total}  loss {row['loss']:.4f}" + (f" ({parts})" if parts else "")
              + f"  lr {row['learning_rate']:.2e}  {rate:.1f} vol/s  ETA {eta_s}")


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
    tb = _tensorboard(cfg, train_dir, start) if writer else None
    preemption = _PreemptionWatch()
    # With several processes, JAX's preemption sync point counts from the last step it was asked about; ask about
    # the resumed step now, so a notice during the first (compiling) step still stops the run at a step it reaches.
    preemption.reached(start, mngr)
    try:
        _train_loop(cfg, method, trainer, mngr, batches, start, total, anatomies, bar, tb, writer, metrics_path,
                    preemption)
        mngr.wait_until_finished()  # still under the SIGTERM watch: the last checkpoint is complete before we return
    finally:
        preemption.close()
        if tb is not None:
            tb.close()
        bar.close()
    return trainer


def _train_loop(cfg, method, trainer, mngr, batches, start, total, anatomies, bar, tb, writer, metrics_path,
                preemption) -> None:
    """Runs steps start+1..total. Each step is dispatched before the metrics of the one before it are fetched, so
    the host's logging overlaps the device's work; a step that is saved (or stopped at) is fetched and checked
    before its state is saved, so a checkpoint never follows a non-finite step."""
    window = {"t": time.perf_counter(), "n": 0, "rate": float("nan")}
    ahead = int(cfg.data.get("prefetch_to_device", 2))
    # Line-buffered: a kill can never leave a row that is only partly written, and rows reach the disk before the
    # checkpoint of their step does.
    with open(metrics_path, "a", buffering=1) if writer else open(os.devnull, "w") as metrics_file:

        def record(step: int, metrics) -> None:
            """Fetch, check and log the metrics of `step` (1-based: the step just completed)."""
            metrics = jax.device_get(metrics)
            loss = float(metrics["loss"])
            # The updated parameters are checked too: a finite loss can still be followed by an overflowing update,
            # and that state must never become the "last good" checkpoint.
            if not np.isfinite([loss, metrics["grad_norm"], metrics["param_norm"]]).all():
                mngr.wait_until_finished()
                last = mngr.latest_step()
                raise FloatingPointError(
                    f"{method}: non-finite loss, gradients or parameters at step {step}; "
                    + (f"last good checkpoint is step {last}" if last is not None else "no checkpoint was saved yet"))
            if step == start + 1:  # the first step includes compilation: the throughput window starts after it
                window["t"], window["n"] = time.perf_counter(), 0
            else:
                window["n"] += cfg.train.batch_size
            row = {"step": step, "loss": loss, "learning_rate": float(trainer.schedule(step - 1)),
                   "grad_norm": float(metrics["grad_norm"]), "param_norm": float(metrics["param_norm"]),
                   "temperature": float(metrics["temperature"])}
            row.update({f"loss/{a}": float(v) for a, v in zip(anatomies, metrics["per_anatomy"])})
            metrics_file.write(json.dumps(row) + "\n")
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == total:
                if window["n"]:
                    window["rate"] = window["n"] / (time.perf_counter() - window["t"])
                    window["t"], window["n"] = time.perf_counter(), 0
                rate = window["rate"]
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{row['learning_rate']:.1e}", vol_s=f"{rate:.1f}")
                if writer:
                    _console(bar, method, row, total, rate, cfg.train.batch_size, anatomies)
                    if tb is not None:
                        for k, v in row.items():
                            if k != "step":
                                tb.add_scalar(k, v, step)
                        if np.isfinite(rate):
                            tb.add_scalar("volumes_per_s", rate, step)
                        tb.flush()

        pending = None  # (step, metrics) dispatched but not yet fetched

        def flush() -> None:
            """Record the pending step, if any (cleared first, so a failing check is not repeated)."""
            nonlocal pending
            if pending is not None:
                current, pending = pending, None
                record(*current)

        step = start
        device_batches = trainer.device_batches(batches(start), ahead)
        try:
            for batch in device_batches:
                metrics = trainer.step_on_device(batch)
                flush()  # the step before this one, while this one runs
                step += 1
                pending = (step, metrics)
                saved = step % cfg.train.checkpoint_every == 0 or step == total
                # Asked at every step (with several processes all of them must ask about the same steps), and at
                # the last step too: a notice there must stop what would run next (another method, eval).
                stop = preemption.reached(step, mngr)
                if saved or stop or step >= total:
                    flush()
                if saved:
                    trainer.save(mngr)
                if stop:
                    if not saved:
                        trainer.save(mngr)
                    mngr.wait_until_finished()
                    msg = (f"{method}: preemption notice (SIGTERM): saved the checkpoint of step {step} and "
                           "stopped; rerun the same command to continue")
                    log.warning(msg)
                    raise Preempted(msg)
                if step >= total:
                    break
            flush()
            if step < total:
                log.warning("%s: the batches ended at step %d, before train.steps=%d; the last checkpoint is step "
                            "%s", method, step, total, mngr.latest_step())
        except FloatingPointError:  # an earlier step was non-finite: the one dispatched after it is not news
            raise
        except BaseException:
            # A step dispatched but not yet checked (the data source failed, or an interrupt): check and log it
            # before the error propagates, so a non-finite step is not hidden behind it.
            flush()
            raise
        finally:
            device_batches.close()


def restore_params(cfg: ml_collections.ConfigDict, method: str, train_dir: str) -> FVLM:
    """The model of the last checkpoint in <train_dir>/checkpoints (for evaluation and export)."""
    trainer = Trainer(cfg, method, make_mesh(cfg))
    mngr = trainer.checkpoint_manager(os.path.join(train_dir, "checkpoints"))
    if not trainer.restore(mngr):
        raise FileNotFoundError(f"no checkpoint in {train_dir}/checkpoints: run --mode=train first")
    return trainer.model()
