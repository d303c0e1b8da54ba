"""Tokens per anatomy text (model.text.anatomy_len): the cut against the real tokenizer, the grouped encoding
against one encoder call per anatomy, the resolution from stats.json, and the FLOP count."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import demo
from fvlm_jax import flops, layout, sharding, text_lengths, train
from fvlm_jax.models import text as text_model
from fvlm_jax.models.fvlm import FVLM
from fvlm_jax.tools import text_lengths as text_lengths_cli

TEXTS = [
    "No pleural effusion.",
    "The lungs are clear. No nodule, mass or consolidation. Mild emphysema in both upper lobes.",
    "Heart size normal.",
    "Ground glass opacity in the right lower lobe with interlobular septal thickening; bronchiectasis.",
    "Normal.",
    "Small hiatal hernia.",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from input_pipeline import tokenizer as tk

    path = str(tmp_path_factory.mktemp("spm") / "t.model")
    tk.train_tokenizer(TEXTS * 20, path, vocab_size=60)
    return tk.Tokenizer(path)


def test_ids_match_the_tokenizer():
    from input_pipeline import tokenizer as tk

    assert text_model.PAD_ID == tk.PAD_ID  # the end token is each text's own last token (truncate_tokens)


@pytest.mark.parametrize("length", [2, 3, 5, 8, 13, 40])
def test_truncate_equals_tokenizing_at_that_length(tokenizer, length):
    stored = tokenizer.encode(TEXTS, 40)
    got = np.asarray(text_model.truncate_tokens(jnp.asarray(stored), length))
    np.testing.assert_array_equal(got, tokenizer.encode(TEXTS, length))
    # Texts that fit and texts that are cut are both present at the shorter lengths.
    n = tokenizer.lengths(TEXTS)
    if 8 <= length <= 13:
        assert (n <= length).any() and (n > length).any()


def test_parse_explicit_lengths():
    anat = ["lung", "heart", "liver"]
    assert text_lengths.parse("", anat, 64) is None
    assert text_lengths.parse("lung=64", anat, 64) is None  # nothing cut
    assert text_lengths.parse("lung=40, heart=16", anat, 64) == (40, 16, 64)
    for bad, match in (("kidney=8", "anatomy=length"), ("lung", "anatomy=length"), ("lung=x", "not an integer"),
                       ("lung=65", r"\[2, 64\]"), ("lung=1", r"\[2, 64\]"), ("p95", "stats.json")):
        with pytest.raises(ValueError, match=match):
            text_lengths.parse(bad, anat, 64)


def test_from_stats_rounds_up_to_eight_within_the_stored_length():
    anat = ["lung", "heart", "liver"]
    stats = {"anatomy_text_tokens_by_anatomy": {
        "lung": {"p95": 105.2, "p99": 129.9}, "heart": {"p95": 16.0, "p99": 17.0}, "liver": {"p95": 3.0, "p99": 9.0}}}
    assert text_lengths.from_stats("p95", anat, 120, stats) == "lung=112,heart=16,liver=8"
    assert text_lengths.from_stats("p99", anat, 120, stats) == "lung=120,heart=24,liver=16"
    with pytest.raises(ValueError, match="prepare"):
        text_lengths.from_stats("p95", anat, 120, {})
    with pytest.raises(ValueError, match="kidney"):
        text_lengths.from_stats("p95", [*anat, "kidney"], 120, stats)
    assert text_lengths.groups((40, 16, 40, 8)) == [(8, [3]), (16, [1]), (40, [0, 2])]


def _model_and_tokens(t=24):
    cfg = demo.get_config("tiny")
    a = len(cfg.prep.anatomies)
    model = FVLM(cfg.model, a, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    n = rng.integers(2, t + 4, (3, a))  # some texts fill the stored length, most are padded
    ids = rng.integers(4, 60, (3, a, t))
    ids[..., 0] = 2
    ids = np.where(np.arange(t) < np.minimum(n, t)[..., None], ids, 0)
    return model, jnp.asarray(ids, jnp.int32), a


@pytest.mark.slow
def test_grouped_encoding_equals_one_call_per_anatomy():
    model, tokens, a = _model_and_tokens()
    lengths = (8, 16, 8, 24, 12, 16, 5)[:a]
    got = np.asarray(nnx.jit(lambda m, t: m.encode_anatomy_texts(t, lengths))(model, tokens))
    encode = nnx.jit(lambda m, t: m.encode_text(t))
    for i in range(a):
        want = np.asarray(encode(model, text_model.truncate_tokens(tokens[:, i], lengths[i])))
        np.testing.assert_allclose(got[:, i], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, t: m.encode_anatomy_texts(t, None))(model, tokens)),
                               np.asarray(encode(model, tokens)), rtol=1e-6)


@pytest.mark.slow
def test_cutting_only_padding_leaves_embeddings_unchanged():
    """A text that fits its anatomy's length encodes the same as at the stored length (the padding is masked)."""
    model, tokens, a = _model_and_tokens()
    fits = np.asarray((tokens[..., 12:] == 0).all(-1))  # [B, A]: texts of at most 12 tokens
    assert fits.any() and not fits.all()
    short = np.asarray(nnx.jit(lambda m, t: m.encode_anatomy_texts(t, (12,) * a))(model, tokens))
    full = np.asarray(nnx.jit(lambda m, t: m.encode_text(t))(model, tokens))
    np.testing.assert_allclose(short[fits], full[fits], rtol=1e-4, atol=1e-5)
    assert not np.allclose(short[~fits], full[~fits], atol=1e-3)


@pytest.mark.slow
def test_gradient_reaches_every_anatomy_text():
    """Every kept token of every anatomy gets a gradient; tokens only past their anatomy's cut get none."""
    model, tokens, a = _model_and_tokens()
    lengths = (8, 16, 8, 24, 12, 16, 5)[:a]
    graphdef, params = nnx.split(model, nnx.Param)
    w = jax.random.normal(jax.random.key(1), (tokens.shape[0], a, model.txt_proj.kernel.shape[1]))

    def f(p):
        return jnp.sum(nnx.merge(graphdef, p).encode_anatomy_texts(tokens, lengths) * w)

    g = np.abs(np.asarray(jax.jit(jax.grad(f))(params)["text"]["tok"]["embedding"][...])).sum(-1)
    kept = np.concatenate([np.asarray(text_model.truncate_tokens(tokens[:, i], n)).ravel()
                           for i, n in enumerate(lengths)])
    kept = np.unique(kept[kept > 0])
    assert g[kept].min() > 0
    dropped = np.setdiff1d(np.unique(np.asarray(tokens)), np.concatenate([kept, [0]]))
    assert len(dropped) and g[dropped].max() == 0


def test_flops_count_each_anatomy_at_its_length():
    cfg = demo.get_config()
    t = cfg.model.text
    lengths = text_lengths.parse(t.anatomy_len, cfg.prep.anatomies, cfg.prep.text_len)
    assert len(set(lengths)) > 1 and max(lengths) < cfg.prep.text_len  # the demo's lengths differ and cut

    def by_hand(n):  # per layer: q, k, v, out and MLP weights; Q K^T and P V
        return t.depth * (2 * n * (4 * t.width**2 + 2 * t.width * t.mlp_dim) + 2 * 2 * n**2 * t.width)

    assert flops.train_step_flops(cfg, 4)["text"] == 3 * 4 * sum(by_hand(n) for n in lengths)
    cfg.model.text.anatomy_len = ""
    assert flops.train_step_flops(cfg, 4)["text"] == 3 * 4 * len(lengths) * by_hand(cfg.prep.text_len)


@pytest.mark.slow
def test_train_stage_resolves_a_percentile_from_the_records(prepared_demo):
    with open(os.path.join(layout.records_dir(prepared_demo), "stats.json")) as f:
        stats = json.load(f)
    manifest = layout.load_manifest(prepared_demo)
    cfg = demo.get_config()
    cfg.model.text.anatomy_len = "p95"
    with pytest.raises(ValueError, match="stats.json"):
        train.Trainer(cfg, "fvlm", sharding.make_mesh(cfg))  # unresolved: the Trainer does not guess
    resolved = text_lengths.resolve(cfg, manifest, stats)
    assert cfg.model.text.anatomy_len == "p95"  # the caller's config is left as it was
    lengths = text_lengths.parse(resolved.model.text.anatomy_len, cfg.prep.anatomies, cfg.prep.text_len)
    for a, n in zip(cfg.prep.anatomies, lengths):
        p95 = stats["anatomy_text_tokens_by_anatomy"][a]["p95"]
        assert n % 8 == 0 and n - 8 < p95 <= n or n == cfg.prep.text_len
    bad = demo.get_config()
    bad.prep.text_len = 64
    with pytest.raises(ValueError, match="prepare again"):
        text_lengths.resolve(bad, manifest, stats)


@pytest.mark.slow
def test_cli_prints_the_spec(prepared_demo, capsys):
    with open(os.path.join(layout.records_dir(prepared_demo), "stats.json")) as f:
        stats = json.load(f)
    manifest = layout.load_manifest(prepared_demo)
    text_lengths_cli.main([str(prepared_demo), "p99"])
    out = capsys.readouterr().out
    # Each anatomy's p99 rounded up to a multiple of 8, at most the stored length.
    want = {a: min(manifest["text_len"], -(-stats["anatomy_text_tokens_by_anatomy"][a]["p99"] // 8) * 8)
            for a in manifest["anatomies"]}
    assert len(set(want.values())) > 1
    assert 'model.text.anatomy_len="' + ",".join(f"{a}={int(n)}" for a, n in want.items()) + '"' in out
    for a, n in want.items():
        assert any(line.split()[:1] == [a] and line.endswith(f"-> {int(n)}") for line in out.splitlines()), a
    with pytest.raises(SystemExit, match="prepare"):
        text_lengths_cli.main([str(prepared_demo / "nothing")])
