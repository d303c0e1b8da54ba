"""The reference recipe (configs/recipes.py): each point of the public fVLM code against a slow transcription of
what that code does (alibaba-damo-academy/fvlm d768ec1; file:line in each test), and the recipe's resolution."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import ct_rate, demo, recipes
from fvlm_jax import losses, train_state, train_step
from fvlm_jax.models import transformer
from fvlm_jax.models.fvlm import FVLM, AnatomyPool
from input_pipeline import captions, prepare, report_split

ORGANS = ["lung", "heart", "esophagus", "aorta"]


# ---------------------------------------------------------------------------------------------------------------
# Texts: caption_datasets.py and blip_pretrain.py, transcribed
# ---------------------------------------------------------------------------------------------------------------
def public_caption(organ, desc_info, conc_info):
    """caption_datasets.py:68-91 for one organ of one patient (desc_info / conc_info: {organ: text}), with one
    deviation, the space between impression and findings (input_pipeline/captions.py says why)."""
    desc = ''
    if organ in desc_info:
        desc += desc_info[organ]
        if not desc.endswith('.'):
            desc += '.'
    conc = ''
    if organ in conc_info:
        conc += conc_info[organ]
        if not conc.endswith('.'):
            conc += '.'
    if not len(conc):
        conc = f'{organ} shows no significant abnormalities.'
    input_text = conc + (' ' + desc if desc else '')
    for ch in ['"', '\'', '(', ')']:
        input_text = input_text.replace(ch, '')
    return input_text


def public_abnormal(organ, text):  # caption_datasets.py:118
    return not text.startswith(f'{organ} shows no significant abnormalities.')


def public_encoded(organ, text):  # blip_pretrain.py:188, 204-206
    template = f'{organ} shows no significant abnormalities.'
    return text.replace(template, '') if text.startswith(template) and text != template else text


PHRASES = ["Emphysema in the upper lobes", "Mild (stable) cardiomegaly.", "The patient's aorta is calcified",
           "No pleural effusion.", 'A "small" hiatal hernia']


def random_parts(rng):
    """Random findings / impression tables {organ: text} of one patient: some organs in neither."""
    desc = {o: str(rng.choice(PHRASES)) for o in ORGANS if rng.random() < 0.6}
    conc = {o: str(rng.choice(PHRASES)) for o in ORGANS if rng.random() < 0.4}
    return desc, conc


@pytest.mark.parametrize("seed", range(4))
def test_captions_normal_flags_and_encoded_texts_as_the_public_code(seed):
    rng = np.random.default_rng(seed)
    for _ in range(20):
        desc, conc = random_parts(rng)
        parts = [{o: report_split.AnatomyText(t, True, ()) for o, t in table.items()} for table in (desc, conc)]
        got = captions.anatomy_texts(*parts, ORGANS, template_texts=True, normal_from_impression=True)
        assert list(got) == ORGANS  # every organ has a text: the template when the report says nothing
        for o in ORGANS:
            want = public_caption(o, desc, conc)
            assert got[o].text == want
            assert got[o].normal == (not public_abnormal(o, want)) == (o not in conc)
            assert captions.encoded_text(o, want) == " ".join(public_encoded(o, want).split())
            if o not in desc and o not in conc:
                assert want == captions.template(o) == captions.encoded_text(o, want)


def test_project_texts_are_unchanged_without_the_switches():
    findings, impression = "Emphysema in both lungs. The heart is normal.", "Mild cardiomegaly."
    lex, voc = report_split.DEFAULT_LEXICON, report_split.DEFAULT_VOCABULARY
    joint = report_split.split_report(findings, impression, lex, voc)
    apart = captions.anatomy_texts(report_split.split_report(findings, "", lex, voc),
                                   report_split.split_report("", impression, lex, voc), ORGANS,
                                   template_texts=False, normal_from_impression=False)
    assert apart == {a: t for a, t in joint.items() if a in ORGANS}
    # normal_from_impression alone: the lung (findings only, a disease) is normal, the heart (impression) is not.
    by_impression = captions.anatomy_texts(report_split.split_report(findings, "", lex, voc),
                                           report_split.split_report("", impression, lex, voc), ORGANS,
                                           template_texts=False, normal_from_impression=True)
    assert by_impression["lung"].normal and not by_impression["heart"].normal
    assert by_impression["lung"].diseases == ("Emphysema",)


# ---------------------------------------------------------------------------------------------------------------
# Loss: blip_pretrain.py:173-285, transcribed with NumPy
# ---------------------------------------------------------------------------------------------------------------
def public_loss(img, txt, intact, captions_by_organ, temp):
    """blip_pretrain.py:178-285 on one device: img, txt [O, B, D] normalised features (of every sample; the public
    code computes them for the intact ones only), intact [B, O], captions_by_organ {organ: [B texts]}."""
    abnormal = np.array([[public_abnormal(o, captions_by_organ[o][i]) for o in ORGANS] for i in range(len(intact))])
    organ_status_world = (abnormal & intact).sum(0)
    total = 0.0
    for cl_organ_id in np.where(organ_status_world)[0]:
        organ_name = ORGANS[cl_organ_id]
        template = f'{organ_name} shows no significant abnormalities.'
        ids = np.where(intact[:, cl_organ_id])[0]
        image_feat, text_feat = img[cl_organ_id, ids], txt[cl_organ_id, ids]
        cl_text_input_all = np.array([captions_by_organ[organ_name][i] for i in ids])
        sim_i2t = image_feat @ text_feat.T / temp
        sim_t2i = text_feat @ image_feat.T / temp
        sim_targets = np.eye(len(ids))
        normal_flag = np.array([t.startswith(template) for t in cl_text_input_all])
        semantic = (normal_flag[:, None] * normal_flag[None, :]).astype(float)
        semantic = (semantic + (cl_text_input_all[:, None] == cl_text_input_all[None, :])).astype(bool)
        np.fill_diagonal(semantic, 0)
        sim_targets = sim_targets + semantic
        sim_targets = sim_targets / sim_targets.sum(1, keepdims=True)
        if len(np.unique(sim_targets)) == 1 or not len(ids):
            continue

        def log_softmax(x):
            m = x.max(1, keepdims=True)
            return x - m - np.log(np.exp(x - m).sum(1, keepdims=True))

        loss_i2t = -np.sum(log_softmax(sim_i2t) * sim_targets, axis=1).mean()
        loss_t2i = -np.sum(log_softmax(sim_t2i) * sim_targets, axis=1).mean()
        total += (loss_i2t + loss_t2i) / 2
    return total


def public_batch(seed, b=10, d=6):
    """A batch built like the public code's: every organ has a caption (template texts for the normal ones, so
    identical texts), some share an abnormal caption; random intact flags and unit features."""
    rng = np.random.default_rng(seed)
    caps = {o: [] for o in ORGANS}
    for _ in range(b):
        desc, conc = random_parts(rng)
        for o in ORGANS:
            caps[o].append(public_caption(o, desc, conc))
    caps["aorta"] = [public_caption("aorta", {}, {"aorta": "Calcified plaques"})] * b  # all positive: skipped
    intact = rng.random((b, len(ORGANS))) < 0.8
    img, txt = (rng.normal(size=(len(ORGANS), b, d)) for _ in range(2))
    img /= np.linalg.norm(img, axis=-1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
    return img.astype(np.float32), txt.astype(np.float32), intact, caps


@pytest.mark.parametrize("seed", range(4))
def test_reference_loss_equals_the_public_formula(seed):
    img, txt, intact, caps = public_batch(seed)
    # The records as preparation writes them under the reference recipe: every organ has text; text identity is
    # the whole caption; normal = the caption starts with the template.
    text_id = np.array([[prepare.text_id(caps[o][i]) for i in range(len(intact))] for o in ORGANS])
    normal = np.array([[not public_abnormal(o, caps[o][i]) for i in range(len(intact))] for o in ORGANS])
    sw = {k.split(".")[1]: v for k, v in recipes.REFERENCE.items() if k.startswith("loss.")}
    got, per_anatomy = losses.anatomy_contrastive_loss(
        img, txt, valid=intact.T, normal=normal, text_id=text_id, disease=np.zeros((*normal.shape, 1), bool),
        temperature=0.07, return_per_anatomy=True, **sw)
    want = public_loss(img, txt, intact, caps, 0.07)
    assert float(got) == pytest.approx(want, rel=1e-5)
    assert float(per_anatomy[3]) == 0.0  # the aorta's texts are all one: its targets are all ones
    without_rule = losses.anatomy_contrastive_loss(
        img, txt, valid=intact.T, normal=normal, text_id=text_id, disease=np.zeros((*normal.shape, 1), bool),
        temperature=0.07, **(sw | {"skip_all_positive": False}))
    assert float(without_rule) > float(got)


# ---------------------------------------------------------------------------------------------------------------
# Model and training switches
# ---------------------------------------------------------------------------------------------------------------
def test_erf_gelu_against_math_erf():
    x = np.random.default_rng(0).normal(scale=3.0, size=(4, 9)).astype(np.float32)
    want = np.vectorize(lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))))(x.astype(np.float64))
    np.testing.assert_allclose(np.asarray(transformer.GELU_FNS["erf"](x)), want, rtol=1e-5, atol=1e-6)
    dwant = np.vectorize(lambda v: 0.5 * (1 + math.erf(v / math.sqrt(2))) + v * math.exp(-v * v / 2)
                         / math.sqrt(2 * math.pi))(x.astype(np.float64))
    got = jax.grad(lambda a: transformer.GELU_FNS["erf"](a).sum())(x)
    np.testing.assert_allclose(np.asarray(got), dwant, rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(transformer.GELU_FNS["tanh"](x)) - want).max() > 1e-4  # the two forms differ


def small_model_config(recipe):
    cfg = demo.get_config("tiny")
    cfg.recipe = recipe
    recipes.resolve(cfg)
    cfg.model.vision.stem_channels = ()
    return cfg


def test_reference_model_switches_and_dropout_only_in_training():
    cfg = small_model_config("reference")
    model = nnx.eval_shape(lambda: FVLM(cfg.model, len(cfg.prep.anatomies), rngs=nnx.Rngs(0)))  # no weights
    blocks = [m for _, m in model.iter_modules() if isinstance(m, transformer.Block)]
    assert blocks and all(b.gelu == "erf" for b in blocks)
    assert all(d.rate == 0.1 for _, d in model.vision.iter_modules() if isinstance(d, nnx.Dropout))
    assert model.pool.drop.rate == 0.1
    assert all(d.rate == 0.0 for _, d in model.text.iter_modules() if isinstance(d, nnx.Dropout))

    # A block and the pooling as the reference model has them: dropout only once train_dropout turns it on. Built
    # and run in one jitted function (built eagerly, their initialisers alone took seconds).
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 6, 16)), jnp.float32)
    levels = jnp.asarray(rng.normal(size=(2, 2, 6, 16)), jnp.float32)
    member = jnp.asarray(rng.random((2, 3, 6)) < 0.5)

    @jax.jit
    def outputs(x, levels, member):
        out = []
        for module, args in ((transformer.Block(16, 2, 32, rngs=nnx.Rngs(0)), (x,)),
                             (AnatomyPool(3, 16, 2, rngs=nnx.Rngs(0)), (levels, member))):
            graphdef, state = nnx.split(module)

            def run(key=None, rate=0.1, graphdef=graphdef, state=state, args=args):
                m = nnx.merge(graphdef, state)
                transformer.configure_blocks(m, dropout=rate)
                if key is not None:
                    transformer.train_dropout(m, key)
                return m(*args)

            out.append((run(), run(rate=0.0), run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))))
        return out

    for evaluated, without, trained, again, other in jax.tree.map(np.asarray, outputs(x, levels, member)):
        np.testing.assert_array_equal(evaluated, without)  # evaluation: as if there were no dropout
        np.testing.assert_array_equal(trained, again)  # a key decides the masks
        assert np.abs(trained - evaluated).max() > 1e-3 and np.abs(trained - other).max() > 1e-3


class AddOne(optax.GradientTransformation):
    """An update that adds 1 to every parameter, whatever the gradient."""

    def __new__(cls):
        return super().__new__(cls, lambda p: optax.EmptyState(),
                               lambda g, s, p=None: (jax.tree.map(jnp.ones_like, g), s))


@pytest.mark.parametrize("mode", ["clip", "clamp"])
def test_temperature_clamped_after_the_update(mode):
    """The train step's update (train_step.apply_update): a temperature that the update takes out of its range is
    put back in the parameters themselves under "clamp", left there under "clip" (the forward pass clips it)."""
    cfg = small_model_config("project")
    cfg.model.temperature.mode = mode
    params = {"temperature": jnp.float32(0.07), "w": jnp.zeros((2, 3))}
    clamp = cfg.model.temperature if mode == "clamp" else None
    new, _ = train_step.apply_update(AddOne(), params, AddOne().init(params), params, clamp)
    assert float(new["temperature"]) == pytest.approx(0.5 if mode == "clamp" else 1.07)  # 0.07 + 1
    np.testing.assert_array_equal(np.asarray(new["w"]), 1.0)  # the other parameters as the update leaves them
    low = train_step.apply_update(optax.sgd(1.0), {"temperature": jnp.float32(1.0)}, optax.sgd(1.0).init(params),
                                  {"temperature": jnp.float32(0.07)}, clamp)[0]["temperature"]
    assert float(low) == pytest.approx(0.001 if mode == "clamp" else -0.93)


@pytest.mark.parametrize("mode", ["clip", "clamp"])
def test_temperature_gradient_at_the_bound(mode):
    """Past its bound a clipped temperature has no gradient, so nothing brings it back; the clamped one (the
    parameter itself, at the bound after the clamp) has one."""
    cfg = small_model_config("project")
    cfg.model.temperature.mode = mode
    graphdef, params = train_state.abstract_model(cfg, "fvlm")  # temp() reads the temperature alone
    params = nnx.to_pure_dict(params)
    img, txt, intact, caps = public_batch(0)
    text_id = np.array([[prepare.text_id(caps[o][i]) for i in range(len(intact))] for o in ORGANS])
    normal = np.array([[not public_abnormal(o, caps[o][i]) for i in range(len(intact))] for o in ORGANS])
    start = {"clip": 0.6, "clamp": 0.5}[mode]  # clip: past the bound; clamp: where clamping put it

    def loss(t):
        temp = nnx.merge(graphdef, {**params, "temperature": t}).temp()
        return losses.anatomy_contrastive_loss(img, txt, valid=intact.T, normal=normal, text_id=text_id,
                                               disease=np.zeros((*normal.shape, 1), bool), temperature=temp)

    grad = float(jax.grad(loss)(jnp.float32(start)))
    assert (grad == 0.0) if mode == "clip" else (abs(grad) > 1e-3)


# ---------------------------------------------------------------------------------------------------------------
# Resolution
# ---------------------------------------------------------------------------------------------------------------
def test_recipe_resolution_explicit_keys_win():
    project = demo.get_config("tiny")
    cfg = demo.get_config("tiny")
    assert recipes.resolve(cfg) and cfg.to_dict() == project.to_dict()  # "project" changes nothing

    cfg = demo.get_config("tiny")
    cfg.recipe = "reference"
    cfg.train.grad_clip_norm = 1.0  # as --config.train.grad_clip_norm=1.0 sets it
    got = recipes.resolve(cfg, {"recipe": "reference", "train.grad_clip_norm": 1.0})
    assert cfg.train.grad_clip_norm == 1.0 and got["train.grad_clip_norm"] == 1.0
    assert (cfg.model.dropout, cfg.model.gelu, cfg.model.temperature.mode, cfg.model.dtype) == (
        0.1, "erf", "clamp", "float32")
    assert cfg.prep.template_texts and cfg.prep.normal_from_impression and cfg.loss.skip_all_positive
    assert not cfg.loss.disease_pairs and cfg.eval.protocol == "public"
    assert cfg.prep.anatomies["heart"] == ["heart", "atrial_appendage_left"]
    assert list(cfg.prep.anatomies) == list(project.prep.anatomies)  # the order of the records and the model

    big = ct_rate.get_config()  # bfloat16 there; the reference recipe trains in float32
    big.recipe = "reference"
    recipes.resolve(big)
    assert big.model.dtype == "float32" and big.train.grad_clip_norm == 0.0
    assert big.prep.anatomies["heart"] == ["heart", "atrial_appendage_left"]

    bad = demo.get_config("tiny")
    bad.recipe = "public"
    with pytest.raises(ValueError, match="recipe='public'"):
        recipes.resolve(bad)


def test_records_of_the_other_recipe_are_refused(prepared_demo):
    from fvlm_jax import stages

    cfg = demo.get_config("tiny")
    stages.prepared_config(cfg, str(prepared_demo))  # the project recipe's records
    cfg.recipe = "reference"
    recipes.resolve(cfg)
    cfg.prep.anatomies = demo.get_config("tiny").prep.anatomies  # only the texts differ
    with pytest.raises(ValueError, match="anatomy texts .* prepare again"):
        stages.prepared_config(cfg, str(prepared_demo))
