"""The image and text encoders as `jax.export` StableHLO modules with their weights beside them: a serving stack
runs them with jax and numpy only, without this project's model code (docs/prediction.md, "Portable encoders").

Folder (export/<method>/portable/):
  image_encoder.jax   serialised jax.export.Exported: (weights, image uint8 [b, Z, Y, X], labels uint8 [b, Z, Y, X])
                      -> (emb float32 [b, A, E] L2-normalised, present bool [b, A], intact bool [b, A])
  text_encoder.jax    (weights, tokens int32 [b, L]) -> emb float32 [b, E] L2-normalised
  image_weights.npz   the weights argument of each: {dotted parameter path: array}
  text_weights.npz
  portable.json       what the inputs are, the embedding names, temperature, platforms

The batch dimension b is symbolic: one module serves any batch size. Both are lowered for CPU, CUDA and TPU
(`jax.export` picks the platform of the caller). Attention is the written-out product (model.attention="cpu": plain
matmuls and a softmax), so no platform-specific kernel is baked in; the weights travel as arguments rather than as
constants, so a large model's module stays small.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from fvlm_jax.models.fvlm import FVLM

PLATFORMS = ("cpu", "cuda", "tpu")
TEXT_PARAMS = ("text", "txt_proj")  # top-level parameter groups of the text tower; the rest is the image tower
FILES = ("image_encoder.jax", "image_weights.npz", "text_encoder.jax", "text_weights.npz", "portable.json")


def host_params(model: FVLM) -> dict:
    """The model's parameters as a nested dict of host numpy arrays (gathered when split across processes; every
    process must call it then)."""
    def whole(x):
        return np.asarray(x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(whole, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def flat_key(path) -> str:
    return ".".join(str(getattr(k, "key", k)) for k in path)


def export_encoders(model_cfg: ml_collections.ConfigDict, method: str, num_anatomies: int, params: dict,
                    out_dir: str, *, anatomies: list[str], text_len: int) -> str:
    """Writes the portable folder for the parameters `params` (`host_params`) of a model of `model_cfg`."""
    cfg = ml_collections.ConfigDict(model_cfg.to_dict())
    cfg.attention = "cpu"  # the written-out attention: lowers for every platform
    abstract = nnx.eval_shape(lambda: FVLM(cfg, num_anatomies, global_pool=method == "clip", rngs=nnx.Rngs(0)))
    graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    flat = {flat_key(path): np.asarray(v) for path, v in leaves}
    groups = {"image": {k: v for k, v in flat.items() if k.split(".")[0] not in TEXT_PARAMS + ("temperature",)},
              "text": {k: v for k, v in flat.items() if k.split(".")[0] in TEXT_PARAMS}}

    def model_from(weights):
        # The other tower's weights are zeros made inside the trace: unused, so XLA drops them.
        full = [weights[k] if k in weights else jnp.zeros(v.shape, v.dtype) for k, v in flat.items()]
        return nnx.merge(graphdef, jax.tree.unflatten(treedef, full), rest)

    def image_fn(weights, image, labels):
        return model_from(weights).encode_image(image.astype(jnp.float32) / 255.0, labels)

    def text_fn(weights, tokens):
        return model_from(weights).encode_text(tokens)

    (b,) = jax.export.symbolic_shape("b")
    spec = lambda tree: jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), tree)  # noqa: E731
    zyx = tuple(cfg.input_zyx)
    volume = jax.ShapeDtypeStruct((b, *zyx), jnp.uint8)
    image = jax.export.export(jax.jit(image_fn), platforms=PLATFORMS)(spec(groups["image"]), volume, volume)
    text = jax.export.export(jax.jit(text_fn), platforms=PLATFORMS)(
        spec(groups["text"]), jax.ShapeDtypeStruct((b, text_len), jnp.int32))
    os.makedirs(out_dir, exist_ok=True)
    for name, exported in (("image", image), ("text", text)):
        with open(os.path.join(out_dir, f"{name}_encoder.jax"), "wb") as f:
            f.write(exported.serialize())
        np.savez(os.path.join(out_dir, f"{name}_weights.npz"), **groups[name])
    temperature = float(np.clip(flat["temperature"], cfg.temperature.min, cfg.temperature.max))
    with open(os.path.join(out_dir, "portable.json"), "w") as f:
        json.dump({
            "method": method, "platforms": list(PLATFORMS), "input_zyx": list(zyx), "text_len": text_len,
            "embedding_names": ["global"] if method == "clip" else anatomies, "anatomies": anatomies,
            "temperature": temperature,
            "image_encoder": "image_encoder.jax: call(weights, image, labels) with weights = dict(np.load("
                             "'image_weights.npz')), image uint8 [b, Z, Y, X] (the preprocessed scan: HU window "
                             "mapped to 0..255, the model input size), labels uint8 [b, Z, Y, X] (0 background, "
                             "a + 1 = anatomy a) -> (embeddings float32 [b, A, E], present bool [b, A], intact bool "
                             "[b, A])",
            "text_encoder": "text_encoder.jax: call(weights, tokens) with weights = dict(np.load("
                            "'text_weights.npz')), tokens int32 [b, text_len] (tokenizer.model: [CLS] pieces [EOS], "
                            "zero-padded) -> embeddings float32 [b, E]",
            "score": "P(positive) = softmax([e.t_neg, e.t_pos] / temperature)[1]",
        }, f, indent=1)
    return out_dir
