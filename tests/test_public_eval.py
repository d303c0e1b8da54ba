"""eval.protocol="public": fVLM's public eval.py, piece by piece against slow references of what it does.

The references transcribe the public code (alibaba-damo-academy/fvlm at d768ec1): eval.py:92-118 (center_crop),
eval.py:143-160 (prompts), eval.py:231-237 (DivisiblePadd, method "end"), eval.py:266 (roi_size),
blip_pretrain.py:413-457 (which anatomies a window scores) and patchembedding.py:145-152 (position embeddings,
F.interpolate trilinear, align_corners=False).
"""

import itertools

import numpy as np
import pytest
import scipy.ndimage as ndi
from conftest import tiny_config

from fvlm_jax import anatomy, evaluate, zero_shot
from fvlm_jax.models import vit3d

# ---- Position embeddings at another token grid -------------------------------------------------------------------


def torch_trilinear_loop(grid, out_shape):
    """F.interpolate(mode="trilinear", align_corners=False, size=out_shape) of grid [Z, Y, X, D], one output voxel
    at a time: per axis src = (i + 0.5) * in / out - 0.5 clamped at 0, i0 = floor(src), i1 = min(i0 + 1, in - 1),
    weights 1 - (src - i0) and src - i0 (PyTorch's upsample kernels); the 8 corners' product weights."""
    def axis(i, n_in, n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = int(np.floor(src))
        return ((i0, 1.0 - (src - i0)), (min(i0 + 1, n_in - 1), src - i0))

    out = np.zeros((*out_shape, grid.shape[-1]))
    for idx in itertools.product(*(range(n) for n in out_shape)):
        corners = [axis(i, a, b) for i, a, b in zip(idx, grid.shape[:3], out_shape)]
        for (z, wz), (y, wy), (x, wx) in itertools.product(*corners):
            out[idx] += wz * wy * wx * grid[z, y, x]
    return out


@pytest.mark.parametrize("grid_in,grid_out", [((7, 16, 11), (7, 18, 11)),  # CT-RATE: 112 x 256 x 352 -> x 288
                                              ((3, 4, 5), (5, 2, 7)), ((2, 3, 3), (4, 7, 1)), ((4, 6, 8), (4, 6, 8))])
def test_position_embeddings_resize_as_pytorch_trilinear(grid_in, grid_out):
    rng = np.random.default_rng(0)
    grid = rng.normal(size=(*grid_in, 3)).astype(np.float32)
    got = np.asarray(vit3d.resize_pos_embed(grid.reshape(-1, 3), grid_in, grid_out)).reshape(*grid_out, 3)
    np.testing.assert_allclose(got, torch_trilinear_loop(grid.astype(np.float64), grid_out), atol=1e-5)
    # Independently: scipy's order-1 zoom with half-pixel (grid_mode) coordinates and edge clamping.
    zoom = [b / a for a, b in zip(grid_in, grid_out)]
    want = np.stack([ndi.zoom(grid[..., d].astype(np.float64), zoom, order=1, mode="nearest", grid_mode=True)
                     for d in range(3)], -1)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_fvlm():
    from fvlm_jax import train_state

    return train_state.create_model(tiny_config(), "fvlm")


def test_vit_on_a_larger_volume_uses_the_resized_position_embeddings(tiny_fvlm):
    """The tiny model's ViT fed a volume 2 patches longer in y equals the same ViT built for that size whose
    position embeddings are the trained ones resized by the slow loop."""
    from flax import nnx

    small = tiny_fvlm.vision  # input 32 x 48 x 64, patch 8: grid 4 x 6 x 8
    big = nnx.clone(small)
    pos = np.asarray(small.pos[...]).reshape(4, 6, 8, -1)
    big.grid_zyx = (4, 8, 8)
    big.pos = nnx.Param(torch_trilinear_loop(pos.astype(np.float64), (4, 8, 8)).reshape(4 * 8 * 8, -1)
                        .astype(np.float32))
    volume = np.random.default_rng(0).random((1, 32, 64, 64), np.float32)
    run = nnx.jit(lambda model, v: model(v))
    np.testing.assert_allclose(np.asarray(run(small, volume)), np.asarray(run(big, volume)), atol=1e-5)
    with pytest.raises(ValueError, match="multiple of the patch"):
        run(small, volume[:, :30])


# ---- Per-anatomy windows -------------------------------------------------------------------------------------------


def crop_by_search(mask, crop):
    """eval.py's window, described instead of computed: per axis, from the box first..last found voxel by voxel,
    the window is L = min(n, max(crop, last - first)) long and starts at the feasible start (0 .. n - L) nearest
    to (first + last) // 2 - max(crop, last - first) // 2."""
    coords = [(z, y, x) for z in range(mask.shape[0]) for y in range(mask.shape[1]) for x in range(mask.shape[2])
              if mask[z, y, x]]
    start, stop = [], []
    for ax, (n, c) in enumerate(zip(mask.shape, crop)):
        first, last = min(p[ax] for p in coords), max(p[ax] for p in coords)
        size = max(c, last - first)
        length = min(n, size)
        want = (first + last) // 2 - size // 2
        s = min(range(n - length + 1), key=lambda s: abs(s - want))
        start.append(s)
        stop.append(s + length)
    return tuple(start), tuple(stop)


def test_public_crop_window_matches_a_search_over_starts():
    rng = np.random.default_rng(0)
    for _ in range(60):
        shape = tuple(int(n) for n in rng.integers(3, 14, 3))
        mask = np.zeros(shape, bool)
        lo = [rng.integers(0, n) for n in shape]
        hi = [rng.integers(a, n) + 1 for a, n in zip(lo, shape)]
        mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = rng.random([b - a for a, b in zip(lo, hi)]) < 0.7
        mask[lo[0], lo[1], lo[2]] = True
        crop = tuple(int(c) for c in rng.integers(1, 16, 3))
        assert anatomy.public_crop_window(mask, crop) == crop_by_search(mask, crop)
    # eval.py's arithmetic, by hand: a lung 300 voxels long (y 10..309) in a 340-voxel axis gets a 299-voxel window
    # (max(288, 309 - 10)), centred at 159: 10..308, its last slice cut off; a short one gets 288, pushed back inside.
    mask = np.zeros((4, 340, 4), bool)
    mask[1, 10:310, 1] = True
    assert anatomy.public_crop_window(mask, (2, 288, 2))[0][1] == 10
    assert anatomy.public_crop_window(mask, (2, 288, 2))[1][1] == 309
    mask[:] = False
    mask[1, 300:320, 1] = True
    assert anatomy.public_crop_window(mask, (2, 288, 2)) == ((0, 52, 0), (2, 340, 2))
    with pytest.raises(ValueError, match="empty"):
        anatomy.public_crop_window(np.zeros((3, 3, 3), bool), (2, 2, 2))


def test_pad_end_to_multiple():
    v = np.arange(5 * 6 * 7).reshape(5, 6, 7)
    out = anatomy.pad_end_to_multiple(v, (4, 3, 8))
    assert out.shape == (8, 6, 8)
    np.testing.assert_array_equal(out[:5, :, :7], v)
    assert not out[5:].any() and not out[:, :, 7:].any()
    assert anatomy.pad_end_to_multiple(v, (5, 3, 7)) is v


def usable_by_loop(lab, whole, skip, margin=2, min_fraction=0.9):
    """blip_pretrain.py:413-457 voxel by voxel: the anatomies with a voxel less than `margin` from a face of the
    window are "boundary" (the skip anatomy excepted); the rest present are intact; an intact one whose window
    count over its whole-scan count is below min_fraction is dropped unless it is the skip anatomy."""
    Z, Y, X = lab.shape
    boundary, count = set(), {}
    for z in range(Z):
        for y in range(Y):
            for x in range(X):
                v = int(lab[z, y, x])
                if v:
                    count[v] = count.get(v, 0) + 1
                    if min(z, Z - 1 - z, y, Y - 1 - y, x, X - 1 - x) < margin:
                        boundary.add(v)
    boundary.discard(None if skip is None else skip + 1)
    intact = [v - 1 for v in count if v not in boundary]
    intact = [a for a in intact if not (count[a + 1] / whole[a] < min_fraction and a != skip)]
    return np.isin(np.arange(len(whole)), intact)


def test_public_usable_matches_a_voxel_loop():
    rng = np.random.default_rng(1)
    for i in range(80):
        shape = tuple(int(n) for n in rng.integers(3, 11, 3))
        lab = np.zeros(shape, np.uint8)
        for a in range(3):
            if rng.random() < 0.8:
                lo = [rng.integers(0, n) for n in shape]
                hi = [rng.integers(a_, n) + 1 for a_, n in zip(lo, shape)]
                lab[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = a + 1
        inside = np.array([(lab == a + 1).sum() for a in range(3)])
        whole = inside + rng.choice([0, 0, 1, 3, 50], 3)  # some anatomies reach outside the window
        skip = None if i % 4 == 0 else int(rng.integers(0, 3))
        np.testing.assert_array_equal(anatomy.public_usable(lab, whole, skip), usable_by_loop(lab, whole, skip))
    # At exactly 90 % inside an anatomy stays; below it goes, unless it is the cropped one.
    lab = np.zeros((9, 9, 9), np.uint8)
    lab[3:6, 3:6, 3] = 1  # 9 voxels, clear of the 2-voxel band
    assert anatomy.public_usable(lab, [10]).tolist() == [True]
    assert anatomy.public_usable(lab, [11]).tolist() == [False]
    assert anatomy.public_usable(lab, [11], skip=0).tolist() == [True]
    lab[1, 4, 4] = 1  # a voxel in the band: no longer intact
    assert anatomy.public_usable(lab, [10]).tolist() == [False]
    assert anatomy.public_usable(lab, [10], skip=0).tolist() == [True]


# ---- Prompts and scores ----------------------------------------------------------------------------------------

EVAL_PY_TEST_ITEMS = [  # eval.py:143-160 at d768ec1, verbatim
    ['lung', 'Emphysema', 'Not Emphysema.', 'Emphysema.'],
    ['lung', 'Atelectasis', 'Not Atelectatic.', 'Atelectatic.'],
    ['lung', 'Lung nodule', 'Not Nodule.', 'Nodule.'],
    ['lung', 'Lung opacity', 'Not Opacity.', 'Opacity.'],
    ['lung', 'Pulmonary fibrotic sequela', 'Not Pulmonary fibrotic.', 'Pulmonary fibrotic.'],
    ['lung', 'Pleural effusion', 'Not Pleural effusion.', 'Pleural effusion.'],
    ['lung', 'Mosaic attenuation pattern', 'Not Mosaic attenuation pattern.', 'Mosaic attenuation pattern.'],
    ['lung', 'Peribronchial thickening', 'Not Peribronchial thickening.', 'Peribronchial thickening.'],
    ['lung', 'Consolidation', 'Not Consolidation.', 'Consolidation.'],
    ['lung', 'Bronchiectasis', 'Not Bronchiectasis.', 'Bronchiectasis.'],
    ['lung', 'Interlobular septal thickening', 'Not Interlobular septal thickening.',
     'Interlobular septal thickening.'],
    ['heart', 'Cardiomegaly', 'Not Cardiomegaly.', 'Cardiomegaly.'],
    ['heart', 'Pericardial effusion', 'Not Pericardial effusion.', 'Pericardial effusion.'],
    ['heart', 'Coronary artery wall calcification', 'Not Coronary artery wall calcification.',
     'Coronary artery wall calcification.'],
    ['esophagus', 'Hiatal hernia', 'Not Hiatal hernia.', 'Hiatal hernia.'],
    ['aorta', 'Arterial wall calcification', 'Not Arterial wall calcification.', 'Arterial wall calcification.'],
]


def test_public_protocol_takes_eval_py_prompts_one_pair_per_task():
    from configs import ct_rate, demo

    cfg = ct_rate.get_config()
    assert cfg.eval.protocol == "project" and tuple(cfg.eval.public_crop_zyx) == (112, 288, 352)
    project = zero_shot.task_spec(cfg, list(ct_rate.LABEL_ANATOMY))
    assert len(project.pairs) == 3 * 16  # eval.tasks and its two variants per task
    cfg.eval.protocol = "public"
    spec = zero_shot.task_spec(cfg, list(ct_rate.LABEL_ANATOMY))
    assert [[a, n.split("/")[1], neg, pos] for (_, neg, pos), a, n in zip(spec.pairs, spec.anatomies, spec.names)] \
        == EVAL_PY_TEST_ITEMS
    differ = [t for t, p in zip(ct_rate.TASKS, ct_rate.PUBLIC_TASKS) if t != p]
    assert [t[1] for t in differ] == ["Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela"]
    # The demo has no public prompts of its own: its eval.tasks, one pair each.
    cfg = demo.get_config()
    cfg.eval.protocol = "public"
    spec = zero_shot.task_spec(cfg, [t[1] for t in demo.TASKS])
    assert [(neg, pos) for _, neg, pos in spec.pairs] == [t[2:] for t in demo.TASKS]
    cfg.eval.protocol = "eval.py"
    with pytest.raises(ValueError, match="eval.protocol"):
        zero_shot.task_spec(cfg, [t[1] for t in demo.TASKS])
    from fvlm_jax import config_checks

    cfg.eval.public_tasks = (("pancreas", "Mass", "No mass.", "Mass."),)
    with pytest.raises(ValueError, match="eval.protocol=.*eval.py.*\n.*eval.public_tasks entries"):
        config_checks.validate(cfg)


def test_a_task_whose_anatomy_has_no_window_scores_zero():
    rng = np.random.default_rng(2)
    img = rng.normal(size=(6, 3, 4))
    prompts = rng.normal(size=(2, 2, 4))
    scored = rng.random((6, 3)) < 0.6
    spec = zero_shot.TaskSpec(["b/x", "c/y"], ["b", "c"], [0, 1], [(0, "n", "p"), (1, "n", "p")])
    for method in ("fvlm", "clip"):  # under the public protocol both read their anatomy's window
        scores, per_pair = zero_shot.pair_scores(img, prompts, spec, ["a", "b", "c"], method, 0.1, scored)
        for n in range(6):
            for t, a in enumerate([1, 2]):
                s = [float(img[n, a] @ prompts[t, k]) / 0.1 for k in range(2)]
                want = np.exp(s[1]) / (np.exp(s[0]) + np.exp(s[1])) if scored[n, a] else 0.0
                assert scores[n, t] == pytest.approx(want) and per_pair[n, t] == pytest.approx(want)


# ---- Encoding whole scans ----------------------------------------------------------------------------------------


def test_encode_public_embeds_each_anatomy_from_its_own_window(tiny_fvlm):
    """Two whole scans (packed labels, as the records' stream gives them): each anatomy with a task is embedded from
    its window (larger than the model input), as the encoder embeds that window alone; an absent anatomy, or one
    with no task, has no window and a zero row."""
    from input_pipeline import label_packing

    cfg = tiny_config()
    rng = np.random.default_rng(3)
    shape = (40, 72, 64)
    labels = np.zeros((2, *shape), np.uint8)
    labels[0, 2:30, 10:30, 5:20] = 1  # lung
    labels[0, 10:20, 40:60, 30:50] = 2
    labels[1, 5:25, 20:50, 10:40] = 1  # scan 1 has no heart
    labels[:, 30:34, 60:70, 50:60] = 5  # an anatomy with no task: no window
    image = rng.integers(0, 256, (2, *shape), dtype=np.uint8)
    k = label_packing.packing_factor(7)
    batches = [{"image": image[i:i + 1], "labels_packed": label_packing.pack_labels(labels[i:i + 1], k),
                "label_shift": np.zeros(1, np.int32), "targets": np.full((1, 3), i), "id": np.array([f"s{i}".encode()]),
                "mask": np.ones(1, bool)} for i in range(2)]
    enc = evaluate.image_encoder(tiny_fvlm)
    got = evaluate.encode_public(enc, iter(batches), [0, 1], 7, cfg.eval.public_crop_zyx, cfg.model.vision.patch_zyx)
    assert got["ids"] == ["s0", "s1"] and got["targets"][:, 0].tolist() == [0, 1]
    assert got["scored"].tolist() == [[True, True] + [False] * 5, [True] + [False] * 6]
    for i, a in ((0, 0), (0, 1), (1, 0)):
        start, stop = anatomy.public_crop_window(labels[i] == a + 1, cfg.eval.public_crop_zyx)
        window = tuple(slice(s, e) for s, e in zip(start, stop))
        img = anatomy.pad_end_to_multiple(image[i][window], (8, 8, 8))
        lab = anatomy.pad_end_to_multiple(np.where(labels[i][window] == a + 1, a + 1, 0).astype(np.uint8), (8, 8, 8))
        assert img.shape == (32, 64, 64)  # eval.public_crop_zyx, not the model's 32 x 48 x 64
        want = np.asarray(enc(img[None], lab[None])[0])[0, a]
        np.testing.assert_allclose(got["emb"][i, a], want, atol=1e-5)
    assert not got["emb"][1, 1:].any() and not got["emb"][0, 2:].any()


@pytest.mark.slow
def test_public_protocol_on_the_prepared_demo(prepared_demo, tiny_fvlm, tmp_path):
    """evaluate_all with eval.protocol="public" on the demo records (a step-1 checkpoint of an untrained fvlm). The
    demo's stored volumes are all 32 x 48 x 64, the model input, and every window is then the whole volume with one
    anatomy's labels: its embedding of that anatomy is the project protocol's (pooling reads that anatomy's tokens
    only). So the public scores are the project path's scores with one prompt pair per task, and 0 where the scan
    lacks the anatomy; no retrieval runs."""
    from flax import nnx

    from fvlm_jax import checkpoint, sharding
    from fvlm_jax.layout import load_manifest, records_dir
    from input_pipeline import label_packing, tfdata
    from input_pipeline.tokenizer import Tokenizer

    cfg = tiny_config()
    cfg.train.methods = ("fvlm",)
    cfg.eval.protocol = "public"
    cfg.data.threshold_split = cfg.data.eval_split = "test"  # one pass over the records
    rdir = records_dir(str(prepared_demo))
    manifest = load_manifest(str(prepared_demo))

    def batches(split):
        return tfdata.eval_batches(rdir, split, batch_size=1, size_zyx=None)

    model = tiny_fvlm
    with checkpoint.manager(str(tmp_path / "train" / "checkpoints"), 1) as mngr:
        checkpoint.save(mngr, 1, {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param))})
    tok = Tokenizer(f"{rdir}/{manifest['tokenizer']}")
    summary, results, data = zero_shot.evaluate_all(cfg, str(tmp_path), manifest, tok, batches,
                                                    sharding.make_mesh(cfg))
    r = results["fvlm"]
    assert r["protocol"] == "public" and r["retrieval"] == {} and r["step"] == 1
    assert list(summary["fvlm"]["per_task"]) == [f"{t[0]}/{t[1]}" for t in cfg.eval.tasks]
    assert all(len(p) == 1 for p in r["prompts"].values())  # one pair per task
    assert "Protocol `public`" in zero_shot.markdown_report(results)

    test = data["fvlm"]["test"]
    project = evaluate.encode_images(model, tfdata.eval_batches(rdir, "test", batch_size=cfg.eval.batch_size,
                                                                size_zyx=cfg.model.input_zyx))
    assert project["ids"] == test["ids"]
    spec = zero_shot.task_spec(cfg, manifest["label_columns"])
    tokens = tok.encode([p for _, neg, pos in spec.pairs for p in (neg, pos)], cfg.prep.text_len)
    prompts = evaluate.prompt_embeddings(model, tokens.reshape(len(spec.pairs), 2, -1))
    index = [manifest["anatomies"].index(a) for a in spec.anatomies]
    want = evaluate.task_scores(project["emb"], prompts, index, float(model.temp()))
    k = label_packing.packing_factor(len(manifest["anatomies"]))
    present = np.stack([np.isin(np.arange(1, 8), label_packing.unpack_labels(b["labels_packed"][0], k, 64))
                        for b in batches("test")])
    np.testing.assert_array_equal(test["scored"], present)
    np.testing.assert_allclose(test["scores"], np.where(present[:, index], want, 0.0), atol=1e-5)
