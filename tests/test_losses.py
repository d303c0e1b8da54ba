"""The contrastive losses against slow, obviously correct NumPy loops."""

import numpy as np
import pytest

from fvlm_jax import losses


def reference_anatomy_loss(img, txt, valid, normal, text_id, disease, temperature, normal_pairs=True,
                           same_text_pairs=True, disease_pairs=True, skip_all_positive=False):
    a_n, b_n, _ = img.shape
    total = 0.0
    for a in range(a_n):
        idx = [i for i in range(b_n) if valid[a, i]]
        if not any(not normal[a, i] for i in idx):
            continue
        n = len(idx)
        s = np.zeros((n, n))
        t = np.zeros((n, n))
        for r, i in enumerate(idx):
            for c, j in enumerate(idx):
                s[r, c] = float(np.dot(img[a, i], txt[a, j])) / temperature
                pos = i == j
                if normal_pairs and normal[a, i] and normal[a, j]:
                    pos = True
                if same_text_pairs and text_id[a, i] == text_id[a, j]:
                    pos = True
                if (disease_pairs and not normal[a, i] and not normal[a, j] and disease[a, i].any()
                        and disease[a, j].any() and (disease[a, i] == disease[a, j]).all()):
                    pos = True
                t[r, c] = float(pos)
        if skip_all_positive and t.all():
            continue

        def xent(logits, targets, n=n):
            out = 0.0
            for r in range(n):
                m = max(logits[r])
                lse = m + np.log(sum(np.exp(x - m) for x in logits[r]))
                tr = targets[r] / targets[r].sum()
                out += -sum(tr[c] * (logits[r, c] - lse) for c in range(n))
            return out / n

        total += 0.5 * (xent(s, t) + xent(s.T, t.T))
    return total


def random_inputs(seed, a=3, b=7, d=5, k=3):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(a, b, d))
    txt = rng.normal(size=(a, b, d))
    img /= np.linalg.norm(img, axis=-1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
    valid = rng.random((a, b)) < 0.8
    normal = rng.random((a, b)) < 0.5
    disease = (rng.random((a, b, k)) < 0.5) & ~normal[..., None]
    disease[:, :2] = disease[:, 2:3]  # force some equal disease vectors
    text_id = rng.integers(0, 4, (a, b))
    return img.astype(np.float32), txt.astype(np.float32), valid, normal, text_id, disease


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("switches", [(True, True, True), (False, False, False), (True, False, True),
                                      (False, True, False)])
def test_anatomy_loss_matches_reference(seed, switches):
    img, txt, valid, normal, text_id, disease = random_inputs(seed)
    kw = dict(normal_pairs=switches[0], same_text_pairs=switches[1], disease_pairs=switches[2])
    got = losses.anatomy_contrastive_loss(img, txt, valid=valid, normal=normal, text_id=text_id, disease=disease,
                                          temperature=0.1, **kw)
    want = reference_anatomy_loss(img, txt, valid, normal, text_id, disease, 0.1, **kw)
    np.testing.assert_allclose(float(got), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_all_positive_anatomy_contributes_zero_with_the_rule(seed):
    """loss.skip_all_positive (the public blip_pretrain.py:267): an anatomy whose valid samples are all positives
    of each other (here: all abnormal with one text) contributes 0; without the rule it has a loss (uniform targets);
    the other anatomies are unchanged either way."""
    img, txt, valid, normal, text_id, disease = random_inputs(seed)
    normal[1], text_id[1] = False, 5
    kw = dict(valid=valid, normal=normal, text_id=text_id, disease=disease, temperature=0.1, disease_pairs=False)
    _, per = losses.anatomy_contrastive_loss(img, txt, skip_all_positive=True, return_per_anatomy=True, **kw)
    _, per_without = losses.anatomy_contrastive_loss(img, txt, return_per_anatomy=True, **kw)
    assert float(per[1]) == 0.0 < float(per_without[1])
    np.testing.assert_array_equal(np.asarray(per)[[0, 2]], np.asarray(per_without)[[0, 2]])
    for flag in (True, False):
        want = reference_anatomy_loss(img, txt, valid, normal, text_id, disease, 0.1, disease_pairs=False,
                                      skip_all_positive=flag)
        got = losses.anatomy_contrastive_loss(img, txt, skip_all_positive=flag, **kw)
        np.testing.assert_allclose(float(got), want, rtol=1e-4, atol=1e-5)


def test_anatomy_without_abnormal_contributes_zero():
    img, txt, valid, normal, text_id, disease = random_inputs(0)
    normal[1] = True
    disease[1] = False
    _, per = losses.anatomy_contrastive_loss(img, txt, valid=valid, normal=normal, text_id=text_id,
                                             disease=disease, temperature=0.1, return_per_anatomy=True)
    assert float(per[1]) == 0.0
    for a in (0, 2):  # the other anatomies keep their own loss
        want = reference_anatomy_loss(img[a:a + 1], txt[a:a + 1], valid[a:a + 1], normal[a:a + 1], text_id[a:a + 1],
                                      disease[a:a + 1], 0.1)
        assert float(per[a]) == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_invalid_samples_do_not_change_loss():
    img, txt, valid, normal, text_id, disease = random_inputs(1)
    valid[:, 3] = False
    kw = dict(valid=valid, normal=normal, text_id=text_id, disease=disease, temperature=0.1)
    base = float(losses.anatomy_contrastive_loss(img, txt, **kw))
    img2 = img.copy()
    img2[:, 3] = -img2[:, 3]
    assert float(losses.anatomy_contrastive_loss(img2, txt, **kw)) == pytest.approx(base, rel=1e-6)


def test_clip_loss_matches_reference():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(6, 4))
    txt = rng.normal(size=(6, 4))
    img /= np.linalg.norm(img, axis=-1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
    s = img @ txt.T / 0.2
    ref = 0.0
    for i in range(6):
        ref += -(s[i, i] - np.log(np.exp(s[i]).sum())) / 12
        ref += -(s[i, i] - np.log(np.exp(s[:, i]).sum())) / 12
    np.testing.assert_allclose(float(losses.clip_loss(img, txt, temperature=0.2)), ref, rtol=1e-5)
