"""Pretrained encoders from local files: a Hugging Face BERT folder for the text encoder (model.text.init) and a 2D
ViT checkpoint (MAE's PyTorch state dict or a timm .safetensors file) for the 3D image encoder (model.vision.init).

No network and no PyTorch at training time: safetensors files are read with `safetensors.numpy`; PyTorch is needed
only to read a pickled state dict (pytorch_model.bin, MAE's .pth). The weights become a tree shaped like the
model's parameters (`nnx.to_pure_dict`), which `train_state.init_state` merges over the fresh initialisation.

- BERT: every weight maps one to one (query, key and value are rearranged into the blocks' head-major qkv matmul);
  `resolve` takes the encoder's sizes from config.json, and the records are tokenised with the folder's WordPiece
  (`input_pipeline.tokenizer`; the manifest records which tokenizer made them, `check_records_tokenizer`).
- ViT: blocks map one to one (timm's fused qkv rows [q|k|v][head][channel] rearranged head-major); the final norm
  is the final LayerNorm; the 2D position grid (without the class token's entry) is resized bilinearly to the 3D
  grid's (y, x) and repeated along z, as fVLM's code does (F.interpolate(mode="bilinear", align_corners=False) to
  16 x 11, then repeated 7 times); the 3D patch embedding is new ("fresh") or inflated from the 2D one: the RGB
  kernels summed (a grey slice copied to three channels) and divided by the patch depth along z, so a volume of
  identical slices one patch deep gives the 2D embedding of a slice.

Every loader returns a report, a list of (name, status): "loaded", "resized", "inflated" or "new" for each
parameter of the encoder, "unused" for each checkpoint entry left out (class token, classifier, MAE decoder, BERT's
pooler and heads). An unknown key layout or a shape that does not fit fails with one line (a ValueError).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from fvlm_jax.models.bert import ACTIVATIONS
from fvlm_jax.models.text import ARCHS, text_encoder
from fvlm_jax.models.vit3d import linear_resize_matrix
from input_pipeline.tokenizer import WordPieceTokenizer

log = logging.getLogger(__name__)

PATCH_INIT = ("fresh", "inflate")


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------
def read_state_dict(path: str, what: str) -> dict[str, np.ndarray]:
    """The arrays of a .safetensors file (numpy, no PyTorch) or of a PyTorch state dict (.bin, .pth, .pt; a dict
    under "model" or "state_dict" is taken, as MAE saves it), as float32 numpy arrays. `what` names the config key
    in errors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}={path}: no such file")
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise ImportError(f"{what}: reading .safetensors needs the safetensors library: "
                              "pip install 'fvlm-jax[pretrained]'") from None
        return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}
    try:
        import torch
    except ImportError:
        raise ImportError(f"{what}={path} is a PyTorch file, which needs PyTorch to read: pip install torch (the CPU "
                          "build is enough), or convert it to .safetensors") from None
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    return {k: v.detach().float().numpy() for k, v in sd.items() if isinstance(v, torch.Tensor)}


def bert_weights_file(folder: str) -> str:
    """model.safetensors, else pytorch_model.bin, of a BERT folder."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise FileNotFoundError(f"model.text.init={folder}: no model.safetensors or pytorch_model.bin there")


def text_config(folder: str) -> dict:
    """model.text values of the BERT in `folder`, from its config.json: arch "bert", vocab_size, max_len, width,
    depth, heads, mlp_dim and bert (type_vocab_size, layer_norm_eps, hidden_act)."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.text.init={folder}: no config.json there (a Hugging Face BERT folder holds "
                                "config.json, model.safetensors or pytorch_model.bin, and vocab.txt)")
    with open(path) as f:
        bc = json.load(f)
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size", "max_position_embeddings") if k not in bc]
    if missing:
        raise ValueError(f"model.text.init={folder}: config.json lacks {missing}: not a BERT config")
    if bc.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"model.text.init={folder}: position_embedding_type={bc['position_embedding_type']!r}; "
                         "only BERT's absolute position embeddings are supported")
    act = bc.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise ValueError(f"model.text.init={folder}: hidden_act={act!r} is not one of {sorted(ACTIVATIONS)}")
    return {"arch": "bert", "vocab_size": bc["vocab_size"], "max_len": bc["max_position_embeddings"],
            "width": bc["hidden_size"], "depth": bc["num_hidden_layers"], "heads": bc["num_attention_heads"],
            "mlp_dim": bc["intermediate_size"],
            "bert": {"type_vocab_size": bc.get("type_vocab_size", 2),
                     "layer_norm_eps": float(bc.get("layer_norm_eps", 1e-12)), "hidden_act": act}}


def config_errors(cfg: ml_collections.ConfigDict) -> list[str]:
    """Readable errors in the pretrained-encoder keys, before any work (config_checks.validate)."""
    m, errors = cfg.model, []
    if m.text.arch not in ARCHS:
        errors.append(f"model.text.arch={m.text.arch!r}: choose one of {ARCHS}")
    if m.text.init and not os.path.isdir(m.text.init):
        errors.append(f"model.text.init={m.text.init}: no such folder (a Hugging Face BERT folder)")
    if m.vision.init and not os.path.isfile(m.vision.init):
        errors.append(f"model.vision.init={m.vision.init}: no such file (a 2D ViT .pth or .safetensors)")
    if m.vision.init_patch not in PATCH_INIT:
        errors.append(f"model.vision.init_patch={m.vision.init_patch!r}: choose one of {PATCH_INIT}")
    return errors


def resolve(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """cfg with model.text's architecture and sizes taken from model.text.init's config.json (a copy; cfg itself
    when no BERT is given). Values the config set otherwise are overridden, each change logged."""
    folder = cfg.model.text.init
    if not folder:
        return cfg
    cfg = copy.deepcopy(cfg)
    t = cfg.model.text
    changes = []
    for key, value in text_config(folder).items():
        old = t[key].to_dict() if isinstance(t[key], ml_collections.ConfigDict) else t[key]
        if old != value:
            changes.append(f"{key} {old} -> {value}")
            t[key] = value
    if changes:
        log.info("model.text from %s/config.json: %s", folder, "; ".join(changes))
    if max(cfg.prep.text_len, cfg.prep.report_len) > t.max_len:
        raise ValueError(f"prep.text_len={cfg.prep.text_len} / prep.report_len={cfg.prep.report_len} exceed the "
                         f"{t.max_len} positions of the BERT in model.text.init={folder}")
    return cfg


def check_records_tokenizer(cfg: ml_collections.ConfigDict, manifest: dict) -> None:
    """Raises ValueError unless the records' tokenizer (manifest["tokenizer_identity"]; sentencepiece in manifests
    written before it was recorded) is the one the text encoder needs: model.text.init's WordPiece, or sentencepiece
    without it."""
    folder = cfg.model.text.init
    want = WordPieceTokenizer.from_folder(folder).identity() if folder else {"kind": "sentencepiece"}
    have = manifest.get("tokenizer_identity", {"kind": "sentencepiece"})
    if want != have:
        made = "sentencepiece" if have["kind"] == "sentencepiece" else f"a WordPiece vocabulary ({have['sha256'][:12]})"
        needs = f"the WordPiece of model.text.init={folder} ({want['sha256'][:12]})" if folder else (
            "sentencepiece (no model.text.init)")
        raise ValueError(f"the records were tokenised with {made}, but the text encoder needs {needs}: run "
                         "--mode=prepare again with this config, or set model.text.init as the records were made")


# ---------------------------------------------------------------------------------------------------------------
# Weight layouts
# ---------------------------------------------------------------------------------------------------------------
def linear(w, b):
    """PyTorch Linear weight [out, in] and bias -> nnx.Linear {"kernel" [in, out], "bias"}."""
    return {"kernel": np.ascontiguousarray(w.T), "bias": b}


def head_major_qkv(wq, wk, wv, bq, bk, bv, heads: int) -> dict:
    """Separate PyTorch q, k, v Linear weights [D, D] and biases [D] -> the blocks' fused qkv {"kernel" [D, 3D],
    "bias" [3D]} with columns ordered [head][q|k|v][channel] (`transformer.Block`)."""
    d = wq.shape[1]
    kernel = np.stack([w.T.reshape(d, heads, -1) for w in (wq, wk, wv)], axis=2).reshape(d, -1)
    bias = np.stack([b.reshape(heads, -1) for b in (bq, bk, bv)], axis=1).reshape(-1)
    return {"kernel": kernel, "bias": bias}


def layer_norm(w, b):
    return {"scale": w, "bias": b}


class _Keys:
    """A state dict whose entries are taken one by one; what is left at the end is reported unused."""

    def __init__(self, sd: dict, what: str):
        self.sd, self.what, self.taken = sd, what, set()

    def __call__(self, *names):
        for name in names:
            if name in self.sd:
                self.taken.add(name)
                return self.sd[name]
        raise ValueError(f"{self.what}: the checkpoint has no {names[0]!r}")

    def unused(self) -> list[tuple[str, str]]:
        return [(k, "unused") for k in self.sd if k not in self.taken]


def flatten(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        out += flatten(v, name) if isinstance(v, dict) else [name]
    return out


# BERT keys this loader knows (after a leading "bert." is dropped); the rest is an unknown layout.
_BERT_KEY = re.compile(
    r"embeddings\.(word_embeddings|position_embeddings|token_type_embeddings)\.weight"
    r"|embeddings\.LayerNorm\.(weight|bias|gamma|beta)|embeddings\.position_ids"
    r"|encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense"
    r"|output\.dense)\.(weight|bias)"
    r"|encoder\.layer\.\d+\.(attention\.output|output)\.LayerNorm\.(weight|bias|gamma|beta)")
_BERT_UNUSED = ("pooler.", "cls.", "cls_projection_head.")


def bert_params(folder: str, heads: int, depth: int) -> tuple[dict, list[tuple[str, str]]]:
    """(the `bert.BertEncoder` parameters as a pure dict, report) from the BERT folder's weights."""
    what = f"model.text.init={folder}"
    sd = read_state_dict(bert_weights_file(folder), what)
    sd = {k.removeprefix("bert."): v for k, v in sd.items()}
    unknown = [k for k in sd if not _BERT_KEY.fullmatch(k) and not k.startswith(_BERT_UNUSED)]
    if unknown:
        raise ValueError(f"{what}: unknown key layout ({len(unknown)} keys such as {unknown[0]!r}); expected "
                         "Hugging Face BERT keys (embeddings.word_embeddings.weight, encoder.layer.N...)")
    n = len({k.split(".")[2] for k in sd if k.startswith("encoder.layer.")})
    if n != depth:
        raise ValueError(f"{what}: the checkpoint has {n} layers, config.json num_hidden_layers={depth}")
    take = _Keys(sd, what)

    def ln(p):
        return layer_norm(take(f"{p}.weight", f"{p}.gamma"), take(f"{p}.bias", f"{p}.beta"))

    def lin(p):
        return linear(take(f"{p}.weight"), take(f"{p}.bias"))

    e = "embeddings"
    tree = {"tok": {"embedding": take(f"{e}.word_embeddings.weight")}, "pos": take(f"{e}.position_embeddings.weight"),
            "token_type": take(f"{e}.token_type_embeddings.weight"), "emb_ln": ln(f"{e}.LayerNorm"), "layers": {}}
    for i in range(depth):
        p = f"encoder.layer.{i}"
        a = f"{p}.attention.self"
        qkv = head_major_qkv(*(take(f"{a}.{n}.weight") for n in ("query", "key", "value")),
                             *(take(f"{a}.{n}.bias") for n in ("query", "key", "value")), heads)
        tree["layers"][i] = {"qkv": qkv, "out": lin(f"{p}.attention.output.dense"),
                             "ln1": ln(f"{p}.attention.output.LayerNorm"), "fc1": lin(f"{p}.intermediate.dense"),
                             "fc2": lin(f"{p}.output.dense"), "ln2": ln(f"{p}.output.LayerNorm")}
    take.taken.add(f"{e}.position_ids")  # a buffer (0 .. max_len - 1), not a weight
    return tree, [(f"text/{name}", "loaded") for name in flatten(tree)] + take.unused()


# timm / MAE ViT keys this loader knows; the rest is an unknown layout.
_VIT_KEY = re.compile(r"cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)"
                      r"|blocks\.\d+\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)")
_VIT_UNUSED = ("head.", "fc_norm.", "decoder", "mask_token")


def resize_bilinear(grid: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """grid [H, W, D] -> [h, w, D], bilinear as torch.nn.functional.interpolate(mode="bilinear",
    align_corners=False, antialias=False): source coordinate (i + 0.5) * H / h - 0.5, clamped at 0."""

    weights = linear_resize_matrix  # the same per-axis weights as the 3D position-embedding resize
    return np.einsum("yh,xw,hwd->yxd", weights(grid.shape[0], out_hw[0]), weights(grid.shape[1], out_hw[1]),
                     grid.astype(np.float64)).astype(grid.dtype)


def vit_params(path: str, v: ml_collections.ConfigDict, input_zyx) -> tuple[dict, list[tuple[str, str]]]:
    """(the `vit3d.ViT3D` parameters as a pure dict, report) from the 2D ViT checkpoint at `path`, for the config
    model.vision `v` on inputs of `input_zyx`. The stem is left out of the tree when it is "fresh"."""
    what = f"model.vision.init={path}"
    sd = read_state_dict(path, "model.vision.init")
    unknown = [k for k in sd if not _VIT_KEY.fullmatch(k) and not k.startswith(_VIT_UNUSED)]
    if unknown:
        raise ValueError(f"{what}: unknown key layout ({len(unknown)} keys such as {unknown[0]!r}); expected a timm "
                         "or MAE ViT state dict (pos_embed, patch_embed.proj.weight, blocks.N.attn.qkv.weight, ...)")
    take = _Keys(sd, what)
    pos2d = take("pos_embed")[0]  # [(1 +) gh * gw, D]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    width, mlp = pos2d.shape[-1], take("blocks.0.mlp.fc1.weight").shape[0] if depth else None
    if (width, depth, mlp) != (v.width, v.depth, v.mlp_dim):
        raise ValueError(f"{what}: the checkpoint's ViT has width {width}, depth {depth}, mlp_dim {mlp}; "
                         f"model.vision has width {v.width}, depth {v.depth}, mlp_dim {v.mlp_dim}: set them to the "
                         "checkpoint's")
    if "cls_token" in sd:
        take("cls_token")
        pos2d = pos2d[1:]
    side = int(round(np.sqrt(pos2d.shape[0])))
    if side * side != pos2d.shape[0]:
        raise ValueError(f"{what}: pos_embed holds {pos2d.shape[0]} patch positions, not a square grid")
    grid = tuple(i // p for i, p in zip(input_zyx, v.patch_zyx))
    pos = resize_bilinear(pos2d.reshape(side, side, width), grid[1:])
    pos = np.broadcast_to(pos[None], (grid[0], *pos.shape)).reshape(-1, width)
    tree = {"pos": pos, "final_ln": layer_norm(take("norm.weight"), take("norm.bias")), "blocks": {}}
    for i in range(depth):
        b = f"blocks.{i}"
        wq, wk, wv = np.split(take(f"{b}.attn.qkv.weight"), 3)
        bq, bk, bv = np.split(take(f"{b}.attn.qkv.bias"), 3)
        tree["blocks"][i] = {
            "ln1": layer_norm(take(f"{b}.norm1.weight"), take(f"{b}.norm1.bias")),
            "qkv": head_major_qkv(wq, wk, wv, bq, bk, bv, v.heads),
            "out": linear(take(f"{b}.attn.proj.weight"), take(f"{b}.attn.proj.bias")),
            "ln2": layer_norm(take(f"{b}.norm2.weight"), take(f"{b}.norm2.bias")),
            "fc1": linear(take(f"{b}.mlp.fc1.weight"), take(f"{b}.mlp.fc1.bias")),
            "fc2": linear(take(f"{b}.mlp.fc2.weight"), take(f"{b}.mlp.fc2.bias"))}
    report = [(f"vision/{n}", "resized" if n == "pos" else "loaded") for n in flatten(tree)]
    stem = ["vision/stem/layers/0/kernel", "vision/stem/layers/0/bias"]
    if v.init_patch == "inflate":
        w2d, b2d = take("patch_embed.proj.weight"), take("patch_embed.proj.bias")  # [D, C, py, px]
        pz, py, px = v.patch_zyx
        if tuple(v.stem_channels) or w2d.shape[2:] != (py, px):
            raise ValueError(f"{what}: model.vision.init_patch='inflate' needs the linear patch embedding "
                             f"(model.vision.stem_channels=()) and patch (y, x) = the 2D patch {w2d.shape[2:]}; "
                             f"the config has stem_channels={tuple(v.stem_channels)}, patch_zyx={tuple(v.patch_zyx)}")
        grey = w2d.sum(axis=1).transpose(1, 2, 0)  # [py, px, D]: a grey slice copied to the RGB channels
        kernel = np.broadcast_to(grey[None] / pz, (pz, py, px, width)).reshape(pz * py * px, width)
        tree["stem"] = {"layers": {0: {"kernel": kernel, "bias": b2d}}}  # rows ordered (z, y, x, channel)
        report += [(n, "inflated") for n in stem]
    elif v.init_patch == "fresh":
        report += [(n, "new") for n in stem] if not tuple(v.stem_channels) else [("vision/stem", "new")]
    else:
        raise ValueError(f"model.vision.init_patch={v.init_patch!r}: choose one of {PATCH_INIT}")
    return tree, report + take.unused()


# ---------------------------------------------------------------------------------------------------------------
# Into the model
# ---------------------------------------------------------------------------------------------------------------
def load_encoders(cfg: ml_collections.ConfigDict) -> tuple[dict, list[tuple[str, str]]]:
    """({"vision": ..., "text": ...} parameter trees of the configured checkpoints (either may be absent), report).
    cfg must have gone through `resolve`. The report is logged (one line per status, names at debug level)."""
    m = cfg.model
    tree, report = {}, []
    if m.vision.init:
        tree["vision"], part = vit_params(m.vision.init, m.vision, m.input_zyx)
        report += part
    if m.text.init:
        if m.text.arch != "bert":
            raise ValueError("model.text.init is set but model.text.arch is not 'bert': call pretrained.resolve(cfg)")
        tree["text"], part = bert_params(m.text.init, m.text.heads, m.text.depth)
        report += part
    for status in ("loaded", "resized", "inflated", "new", "unused"):
        names = [n for n, s in report if s == status]
        if names:
            log.info("pretrained encoders: %d %s%s", len(names), status,
                     f" ({', '.join(names)})" if status != "loaded" else "")
    return tree, report


def merge(params: dict, loaded: dict, prefix: str = "") -> dict:
    """`params` (a pure dict of the model's parameters) with the leaves of `loaded` put in, each cast to the
    parameter's dtype; a missing name or a shape that differs is a ValueError. Works on traced arrays (jit)."""
    out = dict(params)
    for key, value in loaded.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if key not in params:
            raise ValueError(f"pretrained weight {name} has no parameter of that name in the model")
        if isinstance(value, dict):
            out[key] = merge(params[key], value, name)
        elif tuple(value.shape) != tuple(params[key].shape):
            raise ValueError(f"pretrained weight {name} has shape {tuple(value.shape)}, the model's parameter "
                             f"{tuple(params[key].shape)}")
        else:
            out[key] = jnp.asarray(value, params[key].dtype)
    return out


def bert_hidden_states(folder: str, sentences: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The check a user runs after an import: the BERT in `folder` (config.json, weights, vocab.txt), built by this
    project's code (`bert.BertEncoder`) from the imported weights, on `sentences` tokenised with the folder's
    WordPiece ([CLS] ... [SEP], padded with 0 to the longest). Returns (last hidden states [N, L, H] float32,
    token ids [N, L] int32), to compare with transformers' BertModel(...).last_hidden_state."""
    t = ml_collections.ConfigDict(text_config(folder))
    tok = WordPieceTokenizer.from_folder(folder)
    ids = tok.encode(sentences, min(int(max(tok.lengths(sentences))), t.max_len))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: text_encoder(t, rngs=nnx.Rngs(0))))
    weights, _ = bert_params(folder, t.heads, t.depth)
    nnx.replace_by_pure_dict(state, merge(nnx.to_pure_dict(state), weights))
    hidden = jax.jit(lambda state, ids: nnx.merge(graphdef, state).hidden_states(ids))(state, jnp.asarray(ids))
    return np.asarray(hidden, np.float32), ids
