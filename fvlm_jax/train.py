"""Training: the Trainer (mesh, sharded state, the jitted step), and the loop (resume, preemption, non-finite stop,
metrics). The step itself is `train_step.train_step`, the state `train_state`, checkpoints `checkpoint`, logging
`train_log`.

TensorFlow-free: batches arrive as numpy dicts from any iterator (tf.data in `input_pipeline.tfdata`, or the
synthetic batches of the benchmarks).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from fvlm_jax import checkpoint, sharding, text_lengths, train_log, train_state
from fvlm_jax.models.fvlm import FVLM
from fvlm_jax.prefetch import prefetch
from fvlm_jax.train_step import coteach_train_step, train_step

log = logging.getLogger(__name__)


class Trainer:
    """Holds the graph definition, the sharded state and the compiled step for one method.

    With loss.coteach (fVLM only; the CLIP baseline trains alone) the state also holds the peer model and the step
    is `coteach_train_step`; `model()`, evaluation and export use model A (the state's "params")."""

    def __init__(self, cfg: ml_collections.ConfigDict, method: str, mesh: jax.sharding.Mesh, initialize: bool = True):
        self.cfg, self.method, self.mesh = cfg, method, mesh
        self.coteach = bool(cfg.loss.coteach) and method == "fvlm"
        if self.coteach and cfg.train.grad_accum_steps > 1:
            raise ValueError("loss.coteach=True does not support train.grad_accum_steps > 1 (the co-teaching step "
                             "embeds the whole batch with both models): set one of them off")
        self.rules = tuple(cfg.sharding.rules)
        self.tx = train_state.make_optimizer(cfg)
        self.schedule = train_state.learning_rate_schedule(cfg)
        self.graphdef, self.abstract_state = train_state.abstract_state(cfg, method, self.tx, mesh, self.coteach)
        self.state_sharding = jax.tree.map(lambda x: x.sharding, self.abstract_state)
        self.replicated = NamedSharding(mesh, P())
        self.batch_spec = sharding.logical_to_spec(("batch",), self.rules)
        self.batch_sharding = NamedSharding(mesh, self.batch_spec)
        self.state = None
        if initialize:
            self.initialize()
        # Tokens per anatomy text (model.text.anatomy_len; a percentile there is resolved by the stages).
        self.text_lengths = text_lengths.parse(cfg.model.text.anatomy_len, cfg.prep.anatomies, cfg.prep.text_len)
        common = dict(graphdef=self.graphdef, tx=self.tx, loss_cfg=cfg.loss, rules=self.rules,
                      width=int(cfg.model.input_zyx[2]), mesh=mesh, lengths=self.text_lengths,
                      dropout_seed=cfg.seed if cfg.model.dropout > 0 else None,
                      clamp=cfg.model.temperature if cfg.model.temperature.mode == "clamp" else None)
        if self.coteach:
            step = functools.partial(coteach_train_step, peer_seed=train_state.peer_seed(cfg),
                                     flip_prob=float(cfg.train.flip_prob), **common)
        else:
            step = functools.partial(train_step, method=method, num_micro=int(cfg.train.grad_accum_steps),
                                     batch_spec=self.batch_spec, **common)
        self.step_fn = jax.jit(step, in_shardings=(self.state_sharding, self.batch_sharding),
                               out_shardings=(self.state_sharding, self.replicated), donate_argnums=0)

    def initialize(self) -> None:
        """The initial state (`train_state.init_state`: random weights, or the pretrained encoders put in).
        Trainer(..., initialize=False) leaves it to this call, or to `restore`: a resumed run then never builds,
        compiles or fills a state it would throw away (nor reads pretrained weights the checkpoint holds)."""
        with jax.set_mesh(self.mesh):
            self.state = train_state.init_state(self.cfg, self.method, self.tx, self.state_sharding, self.coteach)

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

    def checkpoint_manager(self, directory: str) -> ocp.CheckpointManager:
        return checkpoint.manager(directory, self.cfg.train.keep_checkpoints)

    def restore(self, mngr: ocp.CheckpointManager, step: int | None = None) -> bool:
        """Restore the state of `step` (default: the latest) in place; False when there is no checkpoint. A
        checkpoint of the other kind (with or without the co-teaching peer) is refused with a clear error."""
        step = mngr.latest_step() if step is None else step
        if step is not None:
            with ocp.CheckpointManager(mngr.directory, item_handlers=ocp.StandardCheckpointHandler()) as reader:
                saved_peer = "peer" in reader.item_metadata(step).tree
            if saved_peer != self.coteach:
                def kind(peer):
                    return "a co-teaching run (two models)" if peer else "a run without co-teaching (one model)"
                raise ValueError(
                    f"{self.method}: the checkpoint of step {step} in {mngr.directory} is of {kind(saved_peer)}, "
                    f"but this run is {kind(self.coteach)} (loss.coteach={bool(self.cfg.loss.coteach)}): train in "
                    "a new workdir, or set loss.coteach as the checkpoint's run had it")
        state = checkpoint.restore(mngr, self.abstract_state, step)
        if state is None:
            return False
        self.state = state
        return True

    def save(self, mngr: ocp.CheckpointManager) -> None:
        checkpoint.save(mngr, self.step, self.state)


class Preempted(Exception):
    """Training stopped on a preemption notice (SIGTERM) after saving a checkpoint; rerun the same command."""


class PreemptionWatch:
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


def train(cfg: ml_collections.ConfigDict, method: str, train_dir: str,
          batches: Callable[[int], Iterator[dict]], *, progress: bool = True) -> Trainer:
    """Trains `method` for cfg.train.steps, resuming from the last checkpoint in `train_dir`.

    batches(start_step) yields process-local numpy batches from step `start_step` on (deterministic order, so
    a resumed run sees the data an uninterrupted run would). Metrics go to <train_dir>/metrics.jsonl.
    """
    os.makedirs(train_dir, exist_ok=True)
    mesh = sharding.make_mesh(cfg)
    trainer = Trainer(cfg, method, mesh, initialize=False)  # a resumed run restores without initialising
    mngr = trainer.checkpoint_manager(os.path.join(train_dir, "checkpoints"))
    metrics_path = os.path.join(train_dir, "metrics.jsonl")
    writer = jax.process_index() == 0  # host-side files are written by one process; Orbax saves from all
    if trainer.restore(mngr):
        log.info("%s: resumed from step %d", method, trainer.step)
        if writer:
            train_log.truncate_metrics(metrics_path, trainer.step)
    else:
        trainer.initialize()
        if writer and os.path.exists(metrics_path):
            os.remove(metrics_path)
    total, start = cfg.train.steps, trainer.step
    if start >= total:
        log.info("%s: already trained (%d steps)", method, start)
        return trainer
    anatomies = list(cfg.prep.anatomies)
    bar = tqdm(total=total, initial=start, desc=f"train {method}", disable=not progress or jax.process_index(),
               dynamic_ncols=True)
    tb = train_log.tensorboard_writer(train_dir, start) if writer and cfg.train.tensorboard else None
    preemption = PreemptionWatch()
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
    ahead = int(cfg.data.prefetch_to_device)
    # Line-buffered: a kill can never leave a row that is only partly written, and rows reach the disk before the
    # checkpoint of their step does.
    with open(metrics_path, "a", buffering=1) if writer else open(os.devnull, "w") as metrics_file:

        def record(step: int, metrics) -> None:
            """Fetch, check and log the metrics of `step` (1-based: the step just completed)."""
            metrics = jax.device_get(metrics)
            loss = float(metrics["loss"])
            # The updated parameters are checked too: a finite loss can still be followed by an overflowing update,
            # and that state must never become the "last good" checkpoint.
            checked = [loss, metrics["grad_norm"], metrics["param_norm"]]
            checked += [metrics[k] for k in ("peer_loss", "peer_grad_norm", "peer_param_norm") if k in metrics]
            if not np.isfinite(checked).all():
                mngr.wait_until_finished()
                last = mngr.latest_step()
                raise FloatingPointError(
                    f"{method}: non-finite loss, gradients or parameters at step {step}; "
                    + (f"last good checkpoint is step {last}" if last is not None else "no checkpoint was saved yet"))
            if step == start + 1:  # the first step includes compilation: the throughput window starts after it
                window["t"], window["n"] = time.perf_counter(), 0
            else:
                window["n"] += cfg.train.batch_size
            row = train_log.metrics_row(step, metrics, float(trainer.schedule(step - 1)), anatomies)
            metrics_file.write(json.dumps(row) + "\n")
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == total:
                if window["n"]:
                    window["rate"] = window["n"] / (time.perf_counter() - window["t"])
                    window["t"], window["n"] = time.perf_counter(), 0
                rate = window["rate"]
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{row['learning_rate']:.1e}", vol_s=f"{rate:.1f}")
                if writer:
                    bar.write(train_log.console_line(method, row, total, rate, cfg.train.batch_size, anatomies))
                    if tb is not None:
                        train_log.tensorboard_scalars(tb, row, rate)

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
