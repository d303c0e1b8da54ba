"""fvlm-jax command line: python run.py --config=configs/demo.py --workdir=/tmp/fvlm [--mode=all]."""

from __future__ import annotations

import logging
import time

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from fvlm_jax import config_checks, layout, stages, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where records, checkpoints, results and exports go.")
_MODE = flags.DEFINE_enum("mode", "all", config_checks.MODES, "Stage to run; 'all' runs them in order.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first: one process per host on a TPU pod slice or a "
    "multi-node GPU job. TPU, SLURM and Open MPI are detected; otherwise give the three flags below.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (else JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts) in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.mark_flags_as_required(["config", "workdir"])
log = logging.getLogger(__name__)


def main(argv):
    del argv
    # Libraries (Orbax, tfds) log every file they touch at INFO through absl; keep the console for our progress.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("absl").addFilter(lambda r: "FeatureConnector.dtype" not in r.getMessage())  # tfds-internal
    for name in ("fvlm_jax", "input_pipeline", "__main__"):
        logging.getLogger(name).setLevel(logging.INFO)
    if _DISTRIBUTED.value:
        import jax

        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    cfg, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
    config_checks.validate(cfg)
    steps = {"prepare": stages.run_prepare, "train": stages.run_train, "eval": stages.run_eval,
             "export": stages.run_export}
    for name, fn in steps.items():
        if mode == "all" and name == "prepare" and _DISTRIBUTED.value and layout.is_prepared(workdir):
            # Prepare runs on one machine; a multi-host "all" trains, evaluates and exports the records it made.
            log.info("prepare skipped: %s holds prepared records (run --mode=prepare without --distributed to "
                     "prepare again)", layout.records_dir(workdir))
            continue
        if mode in (name, "all"):
            t0 = time.perf_counter()
            try:
                fn(cfg, workdir)
            except train.Preempted:  # checkpoint saved; 128 + SIGTERM, as if the signal had ended the process
                raise SystemExit(143) from None
            log.info("%s done in %.0f s", name, time.perf_counter() - t0)


if __name__ == "__main__":
    app.run(main)
