"""Export a trained model as a self-contained folder, and load it to embed and score new scans.

Folder layout:
  params/            Orbax checkpoint of the model parameters only (no optimizer state)
  model.json         method ("fvlm" or "clip") and the model config
  tokenizer.model    sentencepiece model
  anatomies.json     anatomy names in model order and their TotalSegmentator classes (name -> id table included)
  preprocessing.json spacing, HU window, crop margin, minimum and model input sizes
  tasks.json         zero-shot tasks: anatomy, label, negative and positive prompt

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

from fvlm_jax.evaluate import image_encoder, task_scores
from fvlm_jax.models.fvlm import FVLM
from input_pipeline import preprocess
from input_pipeline.tokenizer import Tokenizer


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
    if not writer:
        return out_dir
    p = cfg.prep
    anatomies = {a: list(classes) for a, classes in p.anatomies.items()}
    needed = {c for classes in anatomies.values() for c in classes}
    _write_json(os.path.join(out_dir, "model.json"), {"method": method, "model": cfg.model.to_dict()})
    shutil.copy(tokenizer_path, os.path.join(out_dir, "tokenizer.model"))
    _write_json(os.path.join(out_dir, "anatomies.json"), {
        "anatomies": anatomies, "class_table_version": p.class_table,
        "class_ids": {str(i): n for i, n in class_table.items() if n in needed}})
    _write_json(os.path.join(out_dir, "preprocessing.json"), {
        "spacing_xyz": list(p.spacing_xyz), "hu_window": list(p.hu_window), "margin_zyx": list(p.margin_zyx),
        "min_size_zyx": list(p.min_size_zyx), "input_zyx": list(cfg.model.input_zyx), "text_len": p.text_len})
    _write_json(os.path.join(out_dir, "tasks.json"),
                [{"anatomy": a, "label": lbl, "negative": n, "positive": pos} for a, lbl, n, pos in cfg.eval.tasks])
    return out_dir


class Predictor:
    """An exported model: `encode` a CT + TotalSegmentator output into anatomy embeddings, `score` the tasks."""

    def __init__(self, folder: str):
        folder = os.path.abspath(folder)

        def read(name):
            with open(os.path.join(folder, name)) as f:
                return json.load(f)

        meta = read("model.json")
        self.method = meta["method"]
        self.model_cfg = ml_collections.ConfigDict(meta["model"])
        # The attention kernel is a property of the host, not of the weights: the exporting run's choice ("cudnn"
        # on a GPU, say) may not exist where the model is used.
        self.model_cfg.attention = "auto"
        anat = read("anatomies.json")
        self.anatomies = dict(anat["anatomies"])
        self.class_table = {int(i): n for i, n in anat["class_ids"].items()}
        self.prep = read("preprocessing.json")
        self.tasks = read("tasks.json")
        self.tokenizer = Tokenizer(os.path.join(folder, "tokenizer.model"))
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

    def preprocess(self, image: str, segmentation: str) -> dict:
        """The training preprocessing, then the model's fixed input size (centre crop / pad)."""
        out = preprocess.preprocess_scan(
            image, segmentation, class_table=self.class_table, anatomies=self.anatomies,
            spacing_xyz=self.prep["spacing_xyz"], hu_window=self.prep["hu_window"],
            margin_zyx=self.prep["margin_zyx"], min_size_zyx=self.prep["min_size_zyx"])
        size = self.prep["input_zyx"]
        return {"image": preprocess.fit_to_size(out["image"], size), "labels": preprocess.fit_to_size(out["labels"],
                                                                                                       size)}

    def encode(self, image: str, segmentation: str) -> dict:
        """Returns {"embeddings": {anatomy: [E]} (or {"global": [E]} for CLIP), "present": {anatomy: bool}}."""
        x = self.preprocess(image, segmentation)
        emb, present, _ = self._encode(x["image"][None], x["labels"][None])
        emb, present = np.asarray(emb[0]), np.asarray(present[0])
        names = ["global"] if self.method == "clip" else list(self.anatomies)
        return {"embeddings": dict(zip(names, emb)), "present": dict(zip(self.anatomies, present.tolist()))}

    def score(self, image: str, segmentation: str, tasks: Sequence[Mapping] | None = None) -> dict[str, float]:
        """P(positive) for each task ({"anatomy", "label", "negative", "positive"}; default: the exported ones)."""
        tasks = list(tasks or self.tasks)
        enc = self.encode(image, segmentation)
        names = list(enc["embeddings"])
        img = np.stack([enc["embeddings"][n] for n in names])[None]
        prompts = self.tokenizer.encode([p for t in tasks for p in (t["negative"], t["positive"])],
                                        self.prep["text_len"]).reshape(len(tasks), 2, -1)
        prompt_emb = np.asarray(self.model.encode_text(prompts))
        index = [0 if self.method == "clip" else names.index(t["anatomy"]) for t in tasks]
        scores = task_scores(img, prompt_emb, index, float(self.model.temp()))[0]
        return {f"{t['anatomy']}/{t['label']}": float(s) for t, s in zip(tasks, scores)}
