"""Pretrained encoders from local files (fvlm_jax.pretrained): tiny checkpoints in the real formats, built here with
PyTorch and transformers, must give this project's encoders the source models' outputs.

- BERT (Hugging Face folder; model.safetensors and pytorch_model.bin): WordPiece ids as transformers' BertTokenizer
  makes them, last hidden states as transformers' BertModel computes them (max abs difference <= 1e-4, float32).
- 2D ViT (timm / MAE key layout; .safetensors and MAE's {"model": state dict} .pth): on a volume one patch deep
  with identical slices and the inflated patch embedding, the 3D ViT's block outputs and final LayerNorm equal the
  2D model's (a plain PyTorch forward written below) on one slice.
"""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from fvlm_jax import pretrained, sharding, stages, train_state
from fvlm_jax.models import text as text_model
from fvlm_jax.models.transformer import configure_blocks
from fvlm_jax.models.vit3d import ViT3D
from input_pipeline import tokenizer as tk

LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORDS = ["the", "no", "is", "are", "there", "of", "in", "and", "with", "lung", "heart", "size", "normal", "pleural",
         "effusion", "nodule", "small", "left", "right", "upper", "lobe", "aorta", "calc", "##ific", "##ation", "##al",
         "##ed", "##ing"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *".,;:()-/", *LETTERS, *(f"##{c}" for c in LETTERS), *WORDS]
assert len(set(VOCAB)) == len(VOCAB) == 93
SENTENCES = ["No pleural effusion.", "The heart is normal in size; small calcification of the aorta.",
             "Nodules in the right upper lobe, left lung normal.", "Café €", ""]
# A tiny BERT: hidden 32, 2 layers, 4 heads; 512 positions so the demo's text lengths fit in the FVLM test.
BERT = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12)
VIT = dict(width=32, depth=2, heads=4, mlp=64, patch=8, side=4)  # a 2D ViT on 32 x 32 RGB images, 4 x 4 patches


@pytest.fixture(scope="module")
def torch():
    """PyTorch, imported by the tests that use it (not at collection: every pytest worker collects this file)."""
    return pytest.importorskip("torch", reason="the pretrained-checkpoint tests build checkpoints with PyTorch "
                                               "(pip install torch==2.13.0: the CPU build)")


def randomize(torch, module, seed):
    """Every weight random (LayerNorm scales around 1), so a weight mapped to the wrong place shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.1 if "LayerNorm" in name else 0.3
            p.copy_((1.0 if name.endswith("LayerNorm.weight") else 0.0) + scale * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def bert_folders(tmp_path_factory, torch):
    """{"safetensors": a BertModel folder saved by save_pretrained, "bin": a BertForMaskedLM state dict ("bert."
    keys and the MLM head) in pytorch_model.bin} -> (folder, the transformers BertModel)."""
    transformers = pytest.importorskip("transformers", reason="the BERT test builds its checkpoint with transformers")
    out = {}
    for kind in ("safetensors", "bin"):
        folder = tmp_path_factory.mktemp(f"bert_{kind}")
        (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
        config = transformers.BertConfig(**BERT)
        if kind == "safetensors":
            model = transformers.BertModel(config, add_pooling_layer=True)
            randomize(torch, model, 0)
            model.save_pretrained(folder)
            assert (folder / "model.safetensors").exists()
        else:
            mlm = transformers.BertForMaskedLM(config)
            randomize(torch, mlm, 1)
            torch.save(mlm.state_dict(), folder / "pytorch_model.bin")
            config.to_json_file(folder / "config.json")
            model = mlm.bert
        out[kind] = (str(folder), model.eval())
    return out


def test_wordpiece_ids_equal_transformers(bert_folders):
    transformers = pytest.importorskip("transformers")
    folder, _ = bert_folders["safetensors"]
    ours = tk.WordPieceTokenizer.from_folder(folder)
    hf = transformers.BertTokenizer.from_pretrained(folder)  # reads vocab.txt, as for any local BERT folder
    for length in (6, 40):
        want = hf(SENTENCES, padding="max_length", truncation=True, max_length=length)["input_ids"]
        np.testing.assert_array_equal(ours.encode(SENTENCES, length), np.array(want))
    assert (ours.encode(SENTENCES, 40) == ours.tk.token_to_id("[UNK]")).any()  # "€" is not in the vocabulary
    np.testing.assert_array_equal(ours.lengths(SENTENCES), [len(hf(s)["input_ids"]) for s in SENTENCES])


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_bert_hidden_states_equal_transformers(bert_folders, torch, kind):
    folder, model = bert_folders[kind]
    hidden, ids = pretrained.bert_hidden_states(folder, SENTENCES)
    assert hidden.dtype == np.float32 and hidden.shape == (*ids.shape, BERT["hidden_size"])
    with torch.no_grad():
        want = model(input_ids=torch.tensor(ids, dtype=torch.long),
                     attention_mask=torch.tensor(ids != 0, dtype=torch.long)).last_hidden_state.numpy()
    assert np.abs(hidden - want).max() <= 1e-4


def test_bert_report_and_unknown_layout(bert_folders, tmp_path):
    folder, _ = bert_folders["bin"]
    tree, report = pretrained.bert_params(folder, BERT["num_attention_heads"], BERT["num_hidden_layers"])
    status = dict(report)
    assert status["text/layers/1/qkv/kernel"] == "loaded" and status["text/emb_ln/scale"] == "loaded"
    assert {s for n, s in report if n.startswith("cls.")} == {"unused"}  # the MLM head
    assert tree["layers"][0]["qkv"]["kernel"].shape == (32, 96)
    from safetensors.numpy import save_file

    odd = tmp_path / "odd"
    odd.mkdir()
    for name in ("config.json", "vocab.txt"):
        (odd / name).write_text((tmp_path.parent / folder / name).read_text())
    save_file({"encoder.block.0.weight": np.zeros((2, 2), np.float32)}, str(odd / "model.safetensors"))
    with pytest.raises(ValueError, match="unknown key layout .*encoder.block.0.weight"):
        pretrained.bert_params(str(odd), 4, 2)


def test_truncate_tokens_ends_in_sep(bert_folders):
    tok = tk.WordPieceTokenizer.from_folder(bert_folders["safetensors"][0])
    stored = tok.encode(SENTENCES, 40)
    for length in (2, 3, 7, 12, 40):
        got = np.asarray(text_model.truncate_tokens(jnp.asarray(stored), length))
        np.testing.assert_array_equal(got, tok.encode(SENTENCES, length))


def test_resolve_takes_the_bert_sizes(bert_folders):
    cfg = tiny_config()
    assert pretrained.resolve(cfg) is cfg  # no model.text.init
    cfg.model.text.init = bert_folders["safetensors"][0]
    got = pretrained.resolve(cfg).model.text
    assert (got.arch, got.width, got.depth, got.heads, got.mlp_dim, got.vocab_size, got.max_len) == (
        "bert", 32, 2, 4, 64, len(VOCAB), 512)
    assert got.bert.to_dict() == {"type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu"}
    assert cfg.model.text.arch == "pre_ln"  # a copy
    cfg.prep.text_len = 600
    with pytest.raises(ValueError, match="exceed the 512 positions"):
        pretrained.resolve(cfg)


def test_training_refuses_records_of_another_tokenizer(bert_folders, tmp_path):
    """stages.prepared_config (train, eval and export start there) against manifests as prepare writes them."""
    folder = bert_folders["safetensors"][0]
    other = tmp_path / "other_bert"
    other.mkdir()
    (other / "vocab.txt").write_text("\n".join(VOCAB + ["extra"]) + "\n")
    records = tmp_path / "work" / "records"
    records.mkdir(parents=True)
    cfg = tiny_config()

    def prepared_with(bert):
        tok, name = tk.make_tokenizer(bert, ["no effusion"] * 50, str(records), 32)
        assert tk.load_tokenizer(str(records / name)).identity() == tok.identity()
        manifest = {"anatomies": list(cfg.prep.anatomies), "vocab_size": tok.vocab_size, "tokenizer": name,
                    "tokenizer_identity": tok.identity(), "text_len": cfg.prep.text_len}
        (records / "manifest.json").write_text(json.dumps(manifest))

    prepared_with(str(other))
    cfg.model.text.init = folder
    with pytest.raises(ValueError, match="tokenised with a WordPiece vocabulary .* needs the WordPiece of "
                                         "model.text.init"):
        stages.prepared_config(cfg, str(tmp_path / "work"))
    prepared_with(folder)
    resolved, _ = stages.prepared_config(cfg, str(tmp_path / "work"))
    assert resolved.model.text.width == 32
    cfg.model.text.init = ""
    with pytest.raises(ValueError, match="needs sentencepiece"):
        stages.prepared_config(cfg, str(tmp_path / "work"))
    prepared_with("")
    stages.prepared_config(cfg, str(tmp_path / "work"))
    cfg.model.text.init = folder
    with pytest.raises(ValueError, match="tokenised with sentencepiece"):
        stages.prepared_config(cfg, str(tmp_path / "work"))


# ---------------------------------------------------------------------------------------------------------------
# ViT
# ---------------------------------------------------------------------------------------------------------------
def vit2d_state_dict(torch, seed=0) -> dict:
    """A 2D ViT state dict in timm's / MAE's key layout, random weights."""
    g = torch.Generator().manual_seed(seed)
    d, m, p, n = VIT["width"], VIT["mlp"], VIT["patch"], VIT["side"] ** 2

    def r(*shape, base=0.0, scale=0.3):
        return base + scale * torch.randn(shape, generator=g)

    sd = {"cls_token": r(1, 1, d), "pos_embed": r(1, n + 1, d), "patch_embed.proj.weight": r(d, 3, p, p, scale=0.1),
          "patch_embed.proj.bias": r(d), "norm.weight": r(d, base=1, scale=0.1), "norm.bias": r(d),
          "head.weight": r(10, d), "head.bias": r(10)}
    for i in range(VIT["depth"]):
        b = f"blocks.{i}."
        sd |= {b + "norm1.weight": r(d, base=1, scale=0.1), b + "norm1.bias": r(d), b + "attn.qkv.weight": r(3 * d, d),
               b + "attn.qkv.bias": r(3 * d), b + "attn.proj.weight": r(d, d), b + "attn.proj.bias": r(d),
               b + "norm2.weight": r(d, base=1, scale=0.1), b + "norm2.bias": r(d), b + "mlp.fc1.weight": r(m, d),
               b + "mlp.fc1.bias": r(m), b + "mlp.fc2.weight": r(d, m), b + "mlp.fc2.bias": r(d)}
    return sd


def vit2d_reference(torch, sd, img, heads):
    """The 2D ViT's block outputs and final norm on img [B, 3, H, W], written plainly in PyTorch (timm's Block:
    pre-LN, fused qkv rows [q|k|v][head][channel], LayerNorm eps 1e-6), without the class token: fVLM's 3D ViT has
    none. GELU in its exact (erf) form, as timm and MAE compute it (model.gelu="erf" here)."""
    import torch.nn.functional as F

    x = F.conv2d(img, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=VIT["patch"])
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"][:, 1:]
    b, n, d = x.shape
    outs = []
    for i in range(VIT["depth"]):
        k = f"blocks.{i}."
        h = F.layer_norm(x, (d,), sd[k + "norm1.weight"], sd[k + "norm1.bias"], eps=1e-6)
        q, kk, v = F.linear(h, sd[k + "attn.qkv.weight"], sd[k + "attn.qkv.bias"]).reshape(
            b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ kk.transpose(-2, -1) * (d // heads) ** -0.5, dim=-1) @ v
        x = x + F.linear(a.transpose(1, 2).reshape(b, n, d), sd[k + "attn.proj.weight"], sd[k + "attn.proj.bias"])
        h = F.layer_norm(x, (d,), sd[k + "norm2.weight"], sd[k + "norm2.bias"], eps=1e-6)
        h = F.gelu(F.linear(h, sd[k + "mlp.fc1.weight"], sd[k + "mlp.fc1.bias"]))
        x = x + F.linear(h, sd[k + "mlp.fc2.weight"], sd[k + "mlp.fc2.bias"])
        outs.append(x)
    outs.append(F.layer_norm(x, (d,), sd["norm.weight"], sd["norm.bias"], eps=1e-6))
    return np.stack([o.numpy() for o in outs])


def vision_cfg(**kw):
    v = dict(patch_zyx=(4, VIT["patch"], VIT["patch"]), width=VIT["width"], depth=VIT["depth"], heads=VIT["heads"],
             mlp_dim=VIT["mlp"], feature_blocks=(1, 2), stem_channels=(), init="", init_patch="inflate")
    return ml_collections.ConfigDict(v | kw)


@pytest.fixture(scope="module")
def vit_files(tmp_path_factory, torch):
    """{"safetensors": timm's format, "pth": MAE's torch.save({"model": state dict})} -> (path, state dict)."""
    save_file = pytest.importorskip("safetensors.torch", reason="pip install safetensors").save_file

    folder = tmp_path_factory.mktemp("vit")
    sd = vit2d_state_dict(torch)
    save_file(sd, str(folder / "vit.safetensors"))
    torch.save({"model": sd}, folder / "mae.pth")
    return {"safetensors": str(folder / "vit.safetensors"), "pth": str(folder / "mae.pth")}, sd


@pytest.mark.parametrize("kind", ["safetensors", "pth"])
def test_inflated_vit_equals_the_2d_model_on_one_patch_depth(vit_files, torch, kind):
    files, sd = vit_files
    side = VIT["side"] * VIT["patch"]
    v = vision_cfg(init=files[kind])
    tree, report = pretrained.vit_params(v.init, v, (4, side, side))
    status = dict(report)
    assert status["vision/stem/layers/0/kernel"] == "inflated" and status["vision/pos"] == "resized"
    assert status["vision/blocks/1/qkv/kernel"] == "loaded" and status["vision/final_ln/scale"] == "loaded"
    assert {n for n, s in report if s == "unused"} == {"head.weight", "head.bias"}
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: ViT3D(
        input_zyx=(4, side, side), patch_zyx=v.patch_zyx, width=v.width, depth=v.depth, heads=v.heads,
        mlp_dim=v.mlp_dim, feature_blocks=v.feature_blocks, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(abstract, pretrained.merge(nnx.to_pure_dict(abstract), tree))

    grey = np.random.default_rng(0).random((2, side, side), np.float32)
    volume = np.repeat(grey[:, None], 4, axis=1)  # [B, Z = one patch, Y, X], identical slices
    def run(s, x):
        model = nnx.merge(graphdef, s)
        configure_blocks(model, gelu="erf")  # MAE's and timm's GELU (--config.model.gelu=erf)
        return model(x)

    got = np.asarray(jax.jit(run)(abstract, volume))  # [levels, B, N, D]
    want = vit2d_reference(torch, sd, torch.from_numpy(np.repeat(grey[:, None], 3, axis=1)), VIT["heads"])
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4


def test_resize_bilinear_equals_torch(torch):
    import torch.nn.functional as F

    grid = np.random.default_rng(1).normal(size=(14, 14, 5))  # float64: the same formula agrees to rounding
    for out in ((16, 11), (14, 14), (5, 20), (1, 3)):
        want = F.interpolate(torch.from_numpy(grid).permute(2, 0, 1)[None], size=out, mode="bilinear",
                             align_corners=False)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(pretrained.resize_bilinear(grid, out), want, rtol=0, atol=1e-12)


def test_vit_position_grid_fresh_stem_and_errors(vit_files, torch, tmp_path):
    files, sd = vit_files
    v = vision_cfg(init=files["safetensors"], init_patch="fresh", stem_channels=(16,))
    tree, report = pretrained.vit_params(v.init, v, (12, 48, 24))  # grid (3, 6, 3)
    assert dict(report)["vision/stem"] == "new" and "stem" not in tree
    grid2d = sd["pos_embed"][0, 1:].numpy().reshape(4, 4, -1)
    pos = tree["pos"].reshape(3, 6, 3, -1)
    for z in range(3):  # the resized 2D grid repeated along z
        np.testing.assert_allclose(pos[z], pretrained.resize_bilinear(grid2d, (6, 3)), atol=1e-6)
    with pytest.raises(ValueError, match="width 32, depth 2, mlp_dim 64; model.vision has width 48"):
        pretrained.vit_params(v.init, vision_cfg(init=v.init, width=48), (4, 32, 32))
    with pytest.raises(ValueError, match="init_patch='inflate' needs the linear patch embedding"):
        pretrained.vit_params(v.init, vision_cfg(init=v.init, stem_channels=(16,)), (4, 32, 32))
    from safetensors.torch import save_file

    save_file(sd | {"blocks.0.ls1.gamma": torch.ones(32)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ValueError, match="unknown key layout .*blocks.0.ls1.gamma"):
        pretrained.vit_params(str(tmp_path / "odd.safetensors"), v, (4, 32, 32))


def test_init_state_starts_from_both_checkpoints(bert_folders, vit_files):
    """train_state.init_state: the FVLM's encoders hold the imported weights, everything else its own init."""
    cfg = tiny_config()
    cfg.model.vision.update(stem_channels=(), depth=VIT["depth"], mlp_dim=VIT["mlp"], init=vit_files[0]["pth"],
                            init_patch="inflate")
    cfg.model.text.init = bert_folders["bin"][0]
    cfg = pretrained.resolve(cfg)
    loaded, _ = pretrained.load_encoders(cfg)
    state = train_state.init_state(cfg, "fvlm", train_state.make_optimizer(cfg), None)
    params = state["params"]
    np.testing.assert_array_equal(params["text"]["layers"][1]["fc2"]["kernel"],
                                  loaded["text"]["layers"][1]["fc2"]["kernel"])
    np.testing.assert_array_equal(params["text"]["tok"]["embedding"], loaded["text"]["tok"]["embedding"])
    np.testing.assert_array_equal(params["vision"]["pos"], loaded["vision"]["pos"])
    np.testing.assert_array_equal(params["vision"]["stem"]["layers"][0]["kernel"],
                                  loaded["vision"]["stem"]["layers"][0]["kernel"])
    assert params["vision"]["pos"].shape == (4 * 6 * 8, 32)  # the demo's grid, from the 2D 4 x 4


def test_bert_architecture_without_checkpoint_has_logical_axes():
    """model.text.arch="bert" alone: a randomly initialised BERT-shaped encoder, every weight sharded by name."""
    cfg = tiny_config()
    cfg.model.text.arch = "bert"
    model = nnx.eval_shape(lambda: train_state.create_model(cfg, "fvlm"))
    assert sharding.unnamed_weights(nnx.state(model, nnx.Param)) == []
    assert type(model.text).__name__ == "BertEncoder"
