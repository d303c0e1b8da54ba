"""Export a trained model as a self-contained folder, and load it to embed and score new scans.

Folder layout:
  params/            Orbax checkpoint of the model parameters only (no optimizer state)
  model.json         format_version, method ("fvlm" or "clip") and the model config
  tokenizer.model    sentencepiece model (tokenizer.json instead: a pretrained BERT's WordPiece)
  anatomies.json     anatomy names in model order and their TotalSegmentator classes (name -> id table included)
  preprocessing.json spacing, HU window, crop margin, minimum and model input sizes
  tasks.json         zero-shot tasks: anatomy, label, negative and positive prompt, and the task's further prompt
                     pairs (eval.prompt_variants) under "variants"; a task scores with the mean of its pairs
  portable/          the image and text encoders as jax.export StableHLO with their weights (fvlm_jax.portable):
                     runnable with jax and numpy only, without this project's code

No TensorFlow is needed to load or use it: preprocessing is numpy/nibabel/scipy, tokenisation is sentencepiece.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from fvlm_jax import portable
from fvlm_jax.evaluate import image_encoder, mean_prompts, prompt_embeddings, task_scores
from fvlm_jax.models.fvlm import FVLM
from input_pipeline import preprocess
from input_pipeline.tokenizer import SENTENCEPIECE_FILE, TOKENIZER_FILES, WORDPIECE_FILE, load_tokenizer

# Bumped whenever a reader of an older folder would misread it. 2: format_version recorded, portable/ added.
# 3: the model config has the text encoder's architecture (model.text.arch: a pretrained BERT's, with its
# tokenizer.json) and the recipe's switches model.gelu, model.dropout and model.temperature.mode.
FORMAT_VERSION = 3


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def export(model: FVLM, method: str, cfg: ml_collections.ConfigDict, tokenizer_path: str, class_table: Mapping,
           out_dir: str) -> str:
    """Writes the export folder for `model` (trained with `method`) and returns its path."""
    out_dir = os.path.abspath(out_dir)
    writer = jax.process_index() == 0  # the small files come from one process; Orbax saves from all
    if writer:
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.makedirs(out_dir)
    multihost_utils.sync_global_devices("export: folder ready")
    params = nnx.state(model, nnx.Param)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(out_dir, "params"), params)
    whole = portable.host_params(model)  # every process takes part in gathering weights split across hosts
    if not writer:
        return out_dir
    p = cfg.prep
    anatomies = {a: list(classes) for a, classes in p.anatomies.items()}
    needed = {c for classes in anatomies.values() for c in classes}
    _write_json(os.path.join(out_dir, "model.json"),
                {"format_version": FORMAT_VERSION, "method": method, "model": cfg.model.to_dict()})
    shutil.copy(tokenizer_path, os.path.join(out_dir, WORDPIECE_FILE if tokenizer_path.endswith(".json")
                                             else SENTENCEPIECE_FILE))
    _write_json(os.path.join(out_dir, "anatomies.json"), {
        "anatomies": anatomies, "class_table_version": p.class_table,
        "class_ids": {str(i): n for i, n in class_table.items() if n in needed}})
    _write_json(os.path.join(out_dir, "preprocessing.json"), {
        "spacing_xyz": list(p.spacing_xyz), "hu_window": list(p.hu_window), "margin_zyx": list(p.margin_zyx),
        "min_size_zyx": list(p.min_size_zyx), "input_zyx": list(cfg.model.input_zyx), "text_len": p.text_len})
    variants = {}
    for a, lbl, n, pos in cfg.eval.prompt_variants:
        variants.setdefault((a, lbl), []).append([n, pos])
    _write_json(os.path.join(out_dir, "tasks.json"),
                [{"anatomy": a, "label": lbl, "negative": n, "positive": pos, "variants": variants.get((a, lbl), [])}
                 for a, lbl, n, pos in cfg.eval.tasks])
    portable.export_encoders(cfg.model, method, len(anatomies), whole, os.path.join(out_dir, "portable"),
                             anatomies=list(anatomies), text_len=p.text_len)
    return out_dir


def read_export_json(folder: str, name: str):
    """A JSON file of an export folder; a missing folder or file is a FileNotFoundError with a readable message."""
    path = os.path.join(folder, name)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"export folder not found: {folder}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} is not a complete export folder: {name} is missing (run --mode=export)")
    with open(path) as f:
        return json.load(f)


def check_format(meta: Mapping, folder: str) -> None:
    """Raises ValueError unless the export's model.json carries this code's FORMAT_VERSION."""
    version = meta.get("format_version")  # absent in folders written before versions were recorded
    if version != FORMAT_VERSION:
        found = "no format_version (written before versions were recorded)" if version is None else (
            f"format version {version}")
        raise ValueError(f"export folder {folder} has {found}; this fvlm-jax reads format version {FORMAT_VERSION}: "
                         "export the model again with this version (--mode=export)")


class Predictor:
    """An exported model: `encode` a CT + TotalSegmentator output into anatomy embeddings, `score` the tasks."""

    def __init__(self, folder: str):
        folder = os.path.abspath(folder)
        meta = read_export_json(folder, "model.json")
        check_format(meta, folder)
        self.folder = folder
        self.method = meta["method"]
        self.model_cfg = ml_collections.ConfigDict(meta["model"])
        # The attention kernel is a property of the host, not of the weights: the exporting run's choice ("cudnn"
        # on a GPU, say) may not exist where the model is used.
        self.model_cfg.attention = "auto"
        anat = read_export_json(folder, "anatomies.json")
        self.anatomies = dict(anat["anatomies"])
        self.class_table = {int(i): n for i, n in anat["class_ids"].items()}
        self.prep = read_export_json(folder, "preprocessing.json")
        self.tasks = read_export_json(folder, "tasks.json")
        if not os.path.exists(os.path.join(folder, "params")):
            raise FileNotFoundError(f"{folder} is not a complete export folder: params is missing")
        tok = [n for n in TOKENIZER_FILES if os.path.exists(os.path.join(folder, n))]
        if not tok:
            raise FileNotFoundError(f"{folder} is not a complete export folder: tokenizer.model is missing")
        self.tokenizer = load_tokenizer(os.path.join(folder, tok[0]))
        abstract = nnx.eval_shape(lambda: FVLM(self.model_cfg, len(self.anatomies),
                                               global_pool=self.method == "clip", rngs=nnx.Rngs(0)))
        graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
        # Placed on this host's first device: without a target sharding Orbax would restore the saved one, the
        # exporting run's mesh, which does not exist on another host (a model trained on 8 GPUs, used on a laptop).
        here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=here),
                                       abstract_params)
        with ocp.StandardCheckpointer() as ckpt:
            params = ckpt.restore(os.path.join(folder, "params"), abstract_params)
        self.model = nnx.merge(graphdef, params, rest)
        self._encode = image_encoder(self.model)
        self._task_prompts = None

    @property
    def embedding_names(self) -> list[str]:
        """Names of the embeddings `encode` returns: the anatomies, or ["global"] for a CLIP export."""
        return ["global"] if self.method == "clip" else list(self.anatomies)

    def preprocess_sample(self, image: str, segmentation: str, *, empty_ok: bool = False) -> dict:
        """`preprocess.preprocess_scan` with the export's settings (the training preprocessing, HU plausibility
        check included), plus "input_image" and "input_labels": the model's fixed input size (centre crop / pad).
        `empty_ok`: a segmentation without any of the anatomies gives the whole volume instead of a rejection."""
        out = preprocess.preprocess_scan(
            image, segmentation, class_table=self.class_table, anatomies=self.anatomies,
            spacing_xyz=self.prep["spacing_xyz"], hu_window=self.prep["hu_window"],
            margin_zyx=self.prep["margin_zyx"], min_size_zyx=self.prep["min_size_zyx"], check_ct=True,
            empty_ok=empty_ok)
        size = self.prep["input_zyx"]
        out["input_image"] = preprocess.fit_to_size(out["image"], size)
        out["input_labels"] = preprocess.fit_to_size(out["labels"], size)
        return out

    def preprocess(self, image: str, segmentation: str) -> dict:
        """The training preprocessing, then the model's fixed input size (centre crop / pad)."""
        out = self.preprocess_sample(image, segmentation)
        return {"image": out["input_image"], "labels": out["input_labels"]}

    def use_encoder(self, encoder) -> None:
        """Encode with `encoder` (an `evaluate.ImageEncoder` of this model, e.g. split over several devices)."""
        self._encode = encoder

    def encode_batch(self, image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """image uint8 [B, Z, Y, X], labels [B, Z, Y, X] at the model input size -> (emb [B, A, E] (A = 1 for CLIP),
        present [B, A], intact [B, A]: the anatomy has voxels in the input, and touches none of its faces)."""
        emb, present, intact = self._encode(image, labels)
        return np.asarray(emb), np.asarray(present), np.asarray(intact)

    def encode(self, image: str, segmentation: str) -> dict:
        """Returns {"embeddings": {anatomy: [E]} (or {"global": [E]} for CLIP), "present": {anatomy: bool},
        "intact": {anatomy: bool}} ("present"/"intact" within the model's input crop, as in training)."""
        x = self.preprocess(image, segmentation)
        emb, present, intact = self.encode_batch(x["image"][None], x["labels"][None])
        return {"embeddings": dict(zip(self.embedding_names, emb[0])),
                "present": dict(zip(self.anatomies, present[0].tolist())),
                "intact": dict(zip(self.anatomies, intact[0].tolist()))}

    def prompt_embeddings(self, tasks: Sequence[Mapping]) -> np.ndarray:
        """[T, 2, E]: each task's negative and positive prompt embedded by the text encoder, averaged over the task's
        pairs (its own and its "variants"), as --mode=eval scores it (evaluate.mean_prompts)."""
        pairs = [(t["negative"], t["positive"]) for t in tasks]
        task_of_pair = list(range(len(tasks)))
        for i, t in enumerate(tasks):
            pairs += [tuple(v) for v in t.get("variants", ())]
            task_of_pair += [i] * len(t.get("variants", ()))
        tokens = self.tokenizer.encode([p for pair in pairs for p in pair], self.prep["text_len"])
        return mean_prompts(prompt_embeddings(self.model, tokens.reshape(len(pairs), 2, -1)), task_of_pair,
                            len(tasks))

    def task_probabilities(self, emb: np.ndarray, tasks: Sequence[Mapping] | None = None) -> np.ndarray:
        """emb [B, A, E] from `encode_batch` -> P(positive) [B, T] for `tasks` (default: the exported ones, whose
        prompt embeddings are computed once)."""
        if tasks is None:
            if self._task_prompts is None:
                self._task_prompts = self.prompt_embeddings(self.tasks)
            tasks, prompt_emb = self.tasks, self._task_prompts
        else:
            prompt_emb = self.prompt_embeddings(tasks)
        names = self.embedding_names
        index = [0 if self.method == "clip" else names.index(t["anatomy"]) for t in tasks]
        return task_scores(emb, prompt_emb, index, float(self.model.temp()))

    def score(self, image: str, segmentation: str, tasks: Sequence[Mapping] | None = None) -> dict[str, float]:
        """P(positive) for each task ({"anatomy", "label", "negative", "positive"}; default: the exported ones)."""
        enc = self.encode(image, segmentation)
        emb = np.stack([enc["embeddings"][n] for n in self.embedding_names])[None]
        tasks = list(tasks or self.tasks)
        scores = self.task_probabilities(emb, tasks)[0]
        return {f"{t['anatomy']}/{t['label']}": float(s) for t, s in zip(tasks, scores)}
