"""fvlm-jax command line.

  python run.py --config=configs/demo.py --workdir=/tmp/fvlm [--mode=all]
  python run.py --mode=predict --export=/tmp/fvlm/export/fvlm --input=ct.nii.gz --segmentation=seg/ --output=out/

An error of the input or config (a ValueError, OSError or RuntimeError raised by this project's code) ends the run
with one line on stderr and exit status 1; --verbose shows its traceback. Other exceptions keep theirs.
"""

from __future__ import annotations

import logging
import sys
import time

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from configs import recipes
from fvlm_jax import config_checks, layout, stages, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where records, checkpoints, results and exports go.")
_MODE = flags.DEFINE_enum("mode", "all", config_checks.MODES, "Stage to run; 'all' runs prepare, train, eval and "
                          "export in order; 'predict' scores new scans with an export (no --config/--workdir).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first: one process per host on a TPU pod slice or a "
    "multi-node GPU job. TPU, SLURM and Open MPI are detected; otherwise give the three flags below.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (else JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts) in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
_EXPORT = flags.DEFINE_string("export", None, "predict: an export folder (<workdir>/export/<method>).")
_INPUT = flags.DEFINE_string("input", None, "predict: a NIfTI file, a DICOM series folder, a folder of NIfTI files "
                             "or a .jsonl manifest (rows {id, image, segmentation}).")
_SEGMENTATION = flags.DEFINE_string("segmentation", None, "predict: TotalSegmentator's output for --input (its "
                                    "multi-label file or folder of parts; for a folder of scans, a folder with "
                                    "<id>.nii.gz or <id>/ per scan). Not with a manifest.")
_OUTPUT = flags.DEFINE_string("output", None, "predict: folder for <id>.json, <id>.npz, <id>.png and errors.json.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 4, "predict: scans per encoder call (split over the devices).")
_WORKERS = flags.DEFINE_integer("workers", 2, "predict: threads preprocessing scans ahead of the encoder.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of input and config errors too.")
log = logging.getLogger(__name__)


def main(argv):
    del argv
    # Libraries (Orbax, tfds) log every file they touch at INFO through absl; keep the console for our progress.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("absl").addFilter(lambda r: "FeatureConnector.dtype" not in r.getMessage())  # tfds-internal
    for name in ("fvlm_jax", "input_pipeline", "configs", "__main__"):
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        run(_MODE.value)
    except Exception as e:
        message = None if _VERBOSE.value else config_checks.user_error(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1) from None


def run(mode: str) -> None:
    if mode == "predict":
        return predict()
    missing = [f"--{f.name}" for f in (_CONFIG, _WORKDIR) if f.value is None]
    if missing:
        raise ValueError(f"--mode={mode} needs {' and '.join(missing)}")
    if _DISTRIBUTED.value:
        import jax

        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    cfg, workdir = _CONFIG.value, _WORKDIR.value
    # The recipe's switches, after the flags: a key given on the command line keeps its value.
    explicit = config_flags.get_override_values(flags.FLAGS["config"])
    resolved = recipes.resolve(cfg, explicit)
    config_checks.validate(cfg)
    log.info(recipes.describe(cfg.recipe, resolved, explicit))
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


def predict() -> None:
    """--mode=predict: the export carries its config; exit status 1 when any scan failed (errors.json)."""
    from fvlm_jax import predict as predict_lib

    missing = [f"--{f.name}" for f in (_EXPORT, _INPUT, _OUTPUT) if not f.value]
    if missing:
        raise ValueError(f"--mode=predict needs {', '.join(missing)}")
    if _CONFIG.value is not None or _WORKDIR.value:
        log.warning("--mode=predict ignores --config and --workdir: the export folder carries its config")
    res = predict_lib.predict(_EXPORT.value, _INPUT.value, _SEGMENTATION.value, _OUTPUT.value,
                              batch_size=_BATCH_SIZE.value, workers=_WORKERS.value)
    errors = res["errors"]
    for err in errors[:20]:
        print(f"error: {err['id']}: {err['error']}", file=sys.stderr)
    if len(errors) > 20:
        print(f"error: ... and {len(errors) - 20} more", file=sys.stderr)
    if len(res["written"]) + len(errors) > 1:  # a single scan's error is its one line
        print(f"predict: {len(res['written'])} scan(s) written to {_OUTPUT.value}, {len(errors)} failed"
              + (" (errors.json)" if errors else ""), file=sys.stderr)
    if errors:
        raise SystemExit(1)


if __name__ == "__main__":
    app.run(main)
