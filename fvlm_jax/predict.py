"""Prediction on new scans (`run.py --mode=predict`): an export folder, one scan or many, one result per scan.

Per scan `<output>/<id>.json` (each anatomy present / intact / status, the tasks of the scored anatomies),
`<id>.npz` (the embedding of each anatomy in the model input) and `<id>.png` (`scan_figure`); `errors.json` lists the
scans that failed and why. Preprocessing is the training one (`Predictor.preprocess_sample`, i.e.
`input_pipeline.preprocess.preprocess_scan`). A scan's three files appear together or not at all. See
docs/prediction.md.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from fvlm_jax import scan_figure, sharding
from fvlm_jax.evaluate import image_encoder
from fvlm_jax.export import Predictor
from input_pipeline import sources
from input_pipeline.preprocess import ScanRejected

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SCORED = "scored"
# Why an anatomy is not scored, in the order the checks apply.
ABSENT = "absent"
CUT_BY_SCAN = "cut by the scan's field of view"
OUTSIDE_INPUT = "outside the model's input crop"
CUT_BY_INPUT = "cut by the model's input crop"
NOTE = ("Zero-shot probabilities of the exported model (softmax over each task's negative and positive prompt); "
        "uncalibrated research output, not a diagnosis. Only anatomies wholly inside both the scan and the model "
        "input are scored.")


@dataclasses.dataclass(frozen=True)
class Job:
    id: str
    image: str
    segmentation: str


def _nifti_id(name: str) -> str | None:
    return next((name[: -len(s)] for s in NIFTI_SUFFIXES if name.endswith(s)), None)


def segmentation_for(folder: str, scan_id: str) -> str:
    """The segmentation of scan `scan_id` in a folder of segmentations: <id>.nii.gz, <id>.nii or the parts folder
    <id>/ (the first that exists; else the .nii.gz path, which preprocessing reports missing)."""
    for cand in (f"{scan_id}.nii.gz", f"{scan_id}.nii", scan_id):
        if os.path.exists(os.path.join(folder, cand)):
            return os.path.join(folder, cand)
    return os.path.join(folder, f"{scan_id}.nii.gz")


def list_scans(input_path: str, segmentation: str | None) -> tuple[list[Job], list[dict]]:
    """The scans to predict and the inputs rejected while listing them ({"id", "image", "segmentation", "error"}).

    input_path: a NIfTI file, a DICOM series folder (one scan each; `segmentation` = TotalSegmentator's multi-label
    file or folder of parts), a folder of NIfTI files (`segmentation` = a folder holding <id>.nii.gz, <id>.nii or
    <id>/ per scan), or a JSONL manifest (rows {"id", "image", "segmentation"}, paths relative to the manifest; no
    `segmentation`). Raises FileNotFoundError / ValueError (one-line messages) for unusable arguments.
    """
    if not os.path.exists(input_path):
        raise FileNotFoundError(f"input not found: {input_path}")
    if segmentation and not os.path.exists(segmentation):
        raise FileNotFoundError(f"segmentation not found: {segmentation}")
    if input_path.endswith(".jsonl"):
        if segmentation:
            raise ValueError("--segmentation is not used with a manifest: each row names its own segmentation")
        scans, _, rejects = sources.read_manifest(input_path)
        errors = [{"id": r["id"], "image": "", "segmentation": "", "error": r["reason"]} for r in rejects]
        return [Job(s.id, s.image, s.segmentation) for s in scans], errors
    nifti = sorted(n for n in os.listdir(input_path) if _nifti_id(n)) if os.path.isdir(input_path) else []
    if not segmentation:
        raise ValueError("--segmentation is needed with a NIfTI file, a DICOM folder or a folder of NIfTI files "
                         "(TotalSegmentator's output: its multi-label file, or its folder of one file per class)")
    if nifti:  # a folder of scans
        if not os.path.isdir(segmentation):
            raise ValueError(f"--input {input_path} is a folder of NIfTI scans: --segmentation must be a folder with "
                             "<id>.nii.gz, <id>.nii or <id>/ per scan")
        ids = [_nifti_id(n) for n in nifti]
        return [Job(i, os.path.join(input_path, n), segmentation_for(segmentation, i)) for i, n in zip(ids, nifti)], []
    if os.path.isdir(input_path):  # one DICOM series
        return [Job(os.path.basename(os.path.normpath(input_path)), input_path, segmentation)], []
    scan_id = _nifti_id(os.path.basename(input_path))
    if scan_id is None:
        raise ValueError(f"--input {input_path}: give a NIfTI file (.nii, .nii.gz), a DICOM series folder, a folder "
                         "of NIfTI files or a .jsonl manifest")
    return [Job(scan_id, input_path, segmentation)], []


def anatomy_status(present_in_scan: bool, at_scan_edge: bool, in_input: bool, intact_in_input: bool) -> str:
    """Why an anatomy is (not) scored: "scored" only when the segmentation has it, none of it lies on a face of the
    scan, and the model input holds it whole (present there and touching none of its faces: training's intact)."""
    if not present_in_scan:
        return ABSENT
    if at_scan_edge:
        return CUT_BY_SCAN
    if not in_input:
        return OUTSIDE_INPUT
    return SCORED if intact_in_input else CUT_BY_INPUT


def scan_result(pred: Predictor, job: Job, sample: dict, emb: np.ndarray, in_input: np.ndarray,
                intact_in_input: np.ndarray, probs: np.ndarray) -> dict:
    """The JSON of one scan. emb [A, E] (A = 1 for CLIP), in_input / intact_in_input [A] from the encoder, probs [T]
    for the exported tasks."""
    anatomies = {}
    for a, name in enumerate(pred.anatomies):
        status = anatomy_status(bool(sample["present"][a]), bool(sample["at_scan_edge"][a]), bool(in_input[a]),
                                bool(intact_in_input[a]))
        anatomies[name] = {"present": bool(sample["present"][a]), "intact": status == SCORED, "status": status}
    scored = [n for n, v in anatomies.items() if v["intact"]]
    tasks = {f"{t['anatomy']}/{t['label']}": float(p) for t, p in zip(pred.tasks, probs)
             if anatomies[t["anatomy"]]["intact"]}
    return {"id": job.id, "image": os.path.abspath(job.image), "segmentation": os.path.abspath(job.segmentation),
            "export": pred.folder, "method": pred.method,
            "summary": f"{len(scored)} scored: {', '.join(scored)}" if scored else "no scored anatomy",
            "anatomies": anatomies, "tasks": tasks, "note": NOTE}


def _ahead(jobs: Iterable[Job], fn: Callable[[Job], dict], workers: int, ahead: int) -> Iterator[tuple[Job, Future]]:
    """(job, future of fn(job)) in order, with at most `ahead` jobs in flight on `workers` threads."""
    with ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        for job in jobs:
            pending.append((job, pool.submit(fn, job)))
            if len(pending) > ahead:
                yield pending.popleft()
        while pending:
            yield pending.popleft()


def _batches(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def spread_over_devices(pred: Predictor) -> int:
    """Splits the Predictor's image batches over all local devices (weights replicated); returns their number."""
    devices = jax.local_devices()
    if len(devices) > 1:
        mesh = jax.make_mesh((len(devices), 1, 1), sharding.MESH_AXES, devices=devices,
                             axis_types=(jax.sharding.AxisType.Auto,) * 3)
        graphdef, state = nnx.split(pred.model)
        replicated = nnx.merge(graphdef, jax.device_put(state, NamedSharding(mesh, P())))
        pred.use_encoder(image_encoder(replicated, mesh))
    return len(devices)


class Outputs:
    """Writes a scan's files under temporary names and renames them once all three exist (nothing partial)."""

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)

    def paths(self, scan_id: str) -> dict[str, str]:
        return {ext: os.path.join(self.folder, f"{scan_id}.{ext}") for ext in ("json", "npz", "png")}

    def write(self, scan_id: str, result: dict, embeddings: dict[str, np.ndarray], draw: Callable[[str], None]):
        final = self.paths(scan_id)
        tmp = {ext: os.path.join(self.folder, f".{scan_id}.tmp.{ext}") for ext in final}
        try:
            with open(tmp["json"], "w") as f:
                json.dump(result, f, indent=1)
            np.savez(tmp["npz"], **embeddings)
            draw(tmp["png"])
            for ext in final:
                os.replace(tmp[ext], final[ext])
        except BaseException:
            self.remove(scan_id, tmp.values())
            raise

    def remove(self, scan_id: str, extra: Iterable[str] = ()) -> None:
        """Deletes a scan's outputs (from an earlier run too: the folder then shows this run's result)."""
        for p in [*self.paths(scan_id).values(), *extra]:
            if os.path.exists(p):
                os.remove(p)


def check_id(scan_id: str, seen: set[str]) -> str | None:
    """Why `scan_id` cannot name output files, or None."""
    if scan_id in seen:
        return f"duplicate scan id {scan_id!r}"
    if not scan_id or scan_id.startswith(".") or "/" in scan_id or os.sep in scan_id:
        return f"scan id {scan_id!r} cannot name an output file (empty, starts with '.', or holds a '/')"
    return None


def predict(export_dir: str, input_path: str, segmentation: str | None, output: str, *, batch_size: int = 4,
            workers: int = 2, progress: bool = True) -> dict:
    """Predicts every scan of `input_path` (see `list_scans`) with the export in `export_dir` into `output`.

    Returns {"written": [ids], "errors": [{"id", "image", "segmentation", "error"}]}; also writes
    <output>/errors.json. A scan that fails (unreadable, not CT, segmentation missing or off the image grid, ...)
    is listed there and the others go on. Raises FileNotFoundError / ValueError for unusable arguments or export.
    """
    if batch_size < 1 or workers < 1:
        raise ValueError(f"--batch_size ({batch_size}) and --workers ({workers}) must be >= 1")
    jobs, errors = list_scans(input_path, segmentation)
    pred = Predictor(export_dir)
    n_dev = spread_over_devices(pred)
    batch_size = -(-batch_size // n_dev) * n_dev  # a whole number of scans per device
    out = Outputs(output)
    seen: set[str] = set()
    usable = []
    for job in jobs:
        problem = check_id(job.id, seen)
        seen.add(job.id)
        if problem:
            errors.append({"id": job.id, "image": job.image, "segmentation": job.segmentation, "error": problem})
        else:
            usable.append(job)
    log.info("predicting %d scan(s) with %s (%s) on %d device(s)", len(usable), pred.folder, pred.method, n_dev)
    written = []

    def fail(job: Job, msg: str) -> None:
        out.remove(job.id)
        errors.append({"id": job.id, "image": job.image, "segmentation": job.segmentation, "error": msg})

    def prepare(job: Job) -> dict:
        return pred.preprocess_sample(job.image, job.segmentation, empty_ok=True)

    size = tuple(pred.prep["input_zyx"])
    bar = tqdm(total=len(usable), unit="scan", desc="predict", disable=not progress, file=sys.stderr)
    try:
        for batch in _batches(_ahead(usable, prepare, workers, 2 * batch_size), batch_size):
            ready = []
            for job, fut in batch:
                try:
                    ready.append((job, fut.result()))
                except ScanRejected as e:
                    fail(job, e.reason)
                except Exception as e:  # noqa: BLE001 (one bad scan never stops the rest)
                    log.debug("%s failed", job.id, exc_info=True)
                    fail(job, f"preprocessing failed ({type(e).__name__}: {e})")
            if ready:
                _encode_and_write(pred, ready, size, batch_size, out, written, fail)
            bar.update(len(batch))
    finally:
        bar.close()
    with open(os.path.join(output, "errors.json"), "w") as f:
        json.dump(errors, f, indent=1)
    return {"written": written, "errors": errors}


def _encode_and_write(pred, ready, size, batch_size, out, written, fail) -> None:
    n = len(ready)
    image = np.zeros((batch_size, *size), np.uint8)  # one batch shape: one compiled encoder
    labels = np.zeros((batch_size, *size), np.uint8)
    for i, (_, sample) in enumerate(ready):
        image[i], labels[i] = sample["input_image"], sample["input_labels"]
    try:
        emb, in_input, intact = pred.encode_batch(image, labels)
        probs = pred.task_probabilities(emb[:n])
    except Exception as e:  # noqa: BLE001 (a failed batch fails its scans, not the run)
        log.debug("batch failed", exc_info=True)
        for job, _ in ready:
            fail(job, f"encoding failed ({type(e).__name__}: {e})")
        return
    names = pred.embedding_names
    for i, (job, sample) in enumerate(ready):
        try:
            result = scan_result(pred, job, sample, emb[i], in_input[i], intact[i], probs[i])
            keep = [a for a, name in enumerate(names) if pred.method == "clip" or in_input[i][a]]
            embeddings = {names[a]: emb[i, a] for a in keep}
            status = {name: v["status"] for name, v in result["anatomies"].items()}
            findings = collections.defaultdict(list)
            for task, p in sorted(result["tasks"].items(), key=lambda kv: -kv[1]):
                anatomy, label = task.split("/", 1)
                findings[anatomy].append((label, p))
            title = f"{job.id}: {result['summary']}  ({pred.method}, {os.path.basename(pred.folder)})"
            out.write(job.id, result, embeddings, lambda path, s=sample, st=status, fd=findings, t=title:
                      scan_figure.render(path, s["input_image"], s["input_labels"], s["spacing_xyz"],
                                         list(pred.anatomies), st, fd, t))
            written.append(job.id)
        except Exception as e:  # noqa: BLE001
            log.debug("%s failed", job.id, exc_info=True)
            fail(job, f"writing the results failed ({type(e).__name__}: {e})")
