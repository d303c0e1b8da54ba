"""Prepared records: readable through tensorflow-datasets, deterministic batches, exact resume, eval padding."""

import json
import os

import numpy as np
import pytest

from configs import demo
from fvlm_jax import augment
from input_pipeline import label_packing, preprocess, tfdata
from input_pipeline.tf_modules import tf, tfds


@pytest.mark.slow
def test_records_read_through_tfds(prepared_demo):
    rdir = prepared_demo / "records"
    manifest = json.loads((rdir / "manifest.json").read_text())
    builder = tfds.builder_from_directory(str(rdir))
    assert {s: builder.info.splits[s].num_examples for s in ("train", "valid", "test")} == manifest["splits"]
    ex = next(iter(builder.as_dataset(split="train").take(1)))
    image, packed = ex["image"].numpy(), ex["labels_packed"].numpy()
    k = label_packing.packing_factor(len(manifest["anatomies"]))
    assert k == 2 and packed.shape == (*image.shape[:2], (image.shape[2] - 1) // 2 + 2)  # 4 anatomies: 4 bits each
    labels = label_packing.unpack_labels(packed, k, image.shape[2])
    assert image.dtype == np.uint8 and labels.shape == image.shape and image.max() > 200
    assert set(np.unique(labels)) <= set(range(len(manifest["anatomies"]) + 1))
    assert ex["text_tokens"].shape == (len(manifest["anatomies"]), demo.get_config().prep.text_len) == (
        len(manifest["anatomies"]), manifest["text_len"])
    assert ex["targets"].shape == (len(manifest["label_columns"]),)


def _take(it, n):
    return [next(it) for _ in range(n)]


@pytest.mark.slow
def test_train_batches_deterministic_and_resumable(prepared_demo):
    kw = dict(batch_size=4, size_zyx=(32, 48, 64), flip_prob=0.5, seed=3, shuffle_buffer=16)
    rdir = str(prepared_demo / "records")
    a = _take(tfdata.train_batches(rdir, "train", **kw), 5)
    b = _take(tfdata.train_batches(rdir, "train", **kw), 5)
    resumed = _take(tfdata.train_batches(rdir, "train", start_step=3, **kw), 2)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    for x, y in zip(a[3:], resumed):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert a[0]["image"].shape == (4, 32, 48, 64) and a[0]["labels_packed"].shape == (4, 32, 48, 33)
    assert a[0]["flip"].shape == (4, 3) and a[0]["label_shift"].shape == (4,)
    assert not np.array_equal(a[0]["image"], a[1]["image"])


def _zlib_copy(src, dst):
    """The train split of prepared records `src` written again, record by record into files of the same names, with
    zlib-compressed volumes."""

    from input_pipeline import records
    info = records.load_builder(str(src)).info
    spec = info.features
    (anatomies, text_len), diseases = spec["text_tokens"].shape, spec["disease"].shape[1]
    zspec = records.features(anatomies, diseases, text_len, spec["report_tokens"].shape[0], spec["targets"].shape[0],
                             volume_encoding="zlib")
    dst.mkdir()
    for path in records.split_files(str(src), "train"):
        with tf.io.TFRecordWriter(str(dst / path.rsplit("/", 1)[1])) as w:
            for serialized in tf.data.TFRecordDataset(path).as_numpy_iterator():
                w.write(zspec.serialize_example(tfds.as_numpy(spec.deserialize_example(serialized))))
    split = info.splits["train"]
    records.write_metadata(str(dst), zspec, [tfds.core.SplitInfo(
        name="train", shard_lengths=split.shard_lengths, num_bytes=sum(p.stat().st_size for p in dst.iterdir()),
        filename_template=records.file_template(str(dst), "train"))], "zlib copy")
    return dst


@pytest.mark.slow
def test_zlib_records_decoded_after_the_shuffle_give_the_same_batches(prepared_demo, tmp_path):
    from input_pipeline import records
    kw = dict(batch_size=4, size_zyx=(32, 48, 64), flip_prob=0.5, seed=3, shuffle_buffer=16)
    raw = str(prepared_demo / "records")
    zdir = str(_zlib_copy(prepared_demo / "records", tmp_path / "zlib"))
    assert tfdata.decodes_before_shuffle(records.load_builder(raw).info.features)
    assert not tfdata.decodes_before_shuffle(records.load_builder(zdir).info.features)
    expected = _take(tfdata.train_batches(raw, "train", **kw), 5)
    for rdir, decode in ((raw, "after_shuffle"), (zdir, "auto"), (zdir, "before_shuffle")):
        got = _take(tfdata.train_batches(rdir, "train", decode=decode, **kw), 5)
        for x, y in zip(expected, got):
            for k in x:
                np.testing.assert_array_equal(x[k], y[k], err_msg=f"{rdir} decode={decode}: {k}")
    resumed = _take(tfdata.train_batches(zdir, "train", start_step=3, **kw), 2)
    for x, y in zip(expected[3:], resumed):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    with pytest.raises(ValueError, match="decode="):
        tfdata.train_batches(raw, "train", decode="later", **kw)


def test_resume_point_matches_walking_the_stream():
    """The pure-Python resume point against a brute-force walk over the blocks of several epochs."""
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(0, 6, 7)]  # one empty file included
    lengths[2] = 0
    walk = []
    for epoch in range(3):
        for b, files in enumerate(tfdata.epoch_blocks(len(lengths), 3, 11, epoch)):
            walk += [(epoch, b, k) for k in range(sum(lengths[i] for i in files))]
    assert len(walk) == 3 * sum(lengths)
    for consumed, want in enumerate(walk):
        assert tfdata.resume_point(lengths, 3, 11, consumed) == want


@pytest.mark.slow
def test_epochs_visit_every_example_once_and_resume_across_epochs(prepared_demo):
    rdir = str(prepared_demo / "records")
    kw = dict(batch_size=4, size_zyx=(32, 48, 64), flip_prob=0.5, seed=5, shuffle_buffer=8, block_files=1)
    run = _take(tfdata.train_batches(rdir, "train", **kw), 20)  # 32 training scans: 8 steps per epoch
    for epoch in range(2):
        reports = {b["report_tokens"][i].tobytes() for b in run[8 * epoch:8 * epoch + 8] for i in range(4)}
        assert len(reports) == 32
    order = [b["report_tokens"][0].tobytes() for b in run]
    assert order[:8] != order[8:16]  # each epoch has its own order
    resumed = _take(tfdata.train_batches(rdir, "train", start_step=13, **kw), 7)
    for x, y in zip(run[13:], resumed):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.slow
def test_processes_read_disjoint_slices_that_cover_the_epoch(prepared_demo):
    """Two processes (hosts) each stream their own record files: one epoch of both is every training scan once,
    and their crops and flips are drawn independently (not the same draws on other data)."""
    rdir = str(prepared_demo / "records")
    kw = dict(batch_size=4, size_zyx=(32, 48, 64), flip_prob=0.5, seed=5, shuffle_buffer=8, block_files=1,
              process_count=2)
    runs = [_take(tfdata.train_batches(rdir, "train", process_index=i, **kw), 4) for i in range(2)]  # 16 scans each
    reports = [{b["report_tokens"][j].tobytes() for b in run for j in range(4)} for run in runs]
    assert len(reports[0]) == len(reports[1]) == 16 and not reports[0] & reports[1]
    assert len(reports[0] | reports[1]) == 32
    assert any((x["flip"] != y["flip"]).any() for x, y in zip(*runs))
    resumed = _take(tfdata.train_batches(rdir, "train", process_index=1, start_step=2, **kw), 2)
    for x, y in zip(runs[1][2:], resumed):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    with pytest.raises(ValueError, match="gets no record"):
        tfdata.train_batches(rdir, "train", **{**kw, "process_count": 3, "process_index": 2})


def _crop(image, labels, size, k, seed):
    """Host crop (tfdata.random_crop on packed labels) + device finish (augment.finish_on_device), one sample."""

    im, packed, shift, flip = tfdata.random_crop(tf.constant(image), tf.constant(label_packing.pack_labels(labels, k)),
                                                 list(size), k, 0.5, tf.constant(seed, tf.int64))
    out = augment.finish_on_device({"image": im.numpy()[None], "labels_packed": packed.numpy()[None],
                                    "label_shift": np.array([shift.numpy()]), "flip": flip.numpy()[None]}, size[2])
    return np.asarray(out["image"][0]), np.asarray(out["labels"][0])


def test_crop_flip_moves_image_and_labels_together():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (10, 12, 14), dtype=np.uint8)
    labels = (image // 64).astype(np.uint8)
    for s in range(5):
        im, lb = _crop(image, labels, (8, 12, 16), 2, [s, 1])
        assert im.shape == lb.shape == (8, 12, 16)
        real = im > 0
        np.testing.assert_array_equal(lb[real], im[real] // 64)


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("size", [(4, 7, 6), (4, 3, 12)])
def test_crop_flip_is_a_flipped_window_of_the_padded_volume(k, size):
    """Against a brute-force NumPy search: every output of the host crop + device finish is one window of the
    zero-padded volume, flipped on some axes; over many seeds every offset along an axis with room and every flip
    pattern occurs. Both packed label layouts of odd crops (shift 1..k-1) and padding along the packed x axis."""
    import itertools

    rng = np.random.default_rng(1)
    image = rng.integers(1, 255, (6, 5, 9), dtype=np.uint8)
    labels = rng.integers(0, 2 ** (8 // k), (6, 5, 9), dtype=np.uint8)
    pad = [max(c - n, 0) for c, n in zip(size, image.shape)]
    before = [pad[0] // 2, pad[1] // 2, pad[2] // 2 // k * k]  # x padding keeps packed bytes aligned
    padded = [np.pad(a, [(b, p - b) for b, p in zip(before, pad)]) for a in (image, labels)]
    seen_offsets, seen_flips = set(), set()
    for s in range(60):
        im, lb = _crop(image, labels, size, k, [s, 7])
        matches = []
        for off in itertools.product(*(range(p - c + 1) for p, c in zip(padded[0].shape, size))):
            window = [a[tuple(slice(o, o + c) for o, c in zip(off, size))] for a in padded]
            for flips in itertools.product((False, True), repeat=3):
                axes = [i for i, f in enumerate(flips) if f]
                w_im, w_lb = (np.flip(w, axes) if axes else w for w in window)
                if np.array_equal(w_im, im) and np.array_equal(w_lb, lb):
                    matches.append((off, flips))
        assert len(matches) == 1, (s, matches)
        seen_offsets.add(matches[0][0])
        seen_flips.add(matches[0][1])
    for axis in range(3):
        assert {o[axis] for o in seen_offsets} == set(range(padded[0].shape[axis] - size[axis] + 1))
    assert len(seen_flips) == 8


def test_pack_unpack_round_trip_and_factor():
    rng = np.random.default_rng(2)
    assert [label_packing.packing_factor(a) for a in (1, 3, 4, 15, 16, 255)] == [8, 4, 2, 2, 1, 1]
    with pytest.raises(ValueError):
        label_packing.packing_factor(256)
    for a in (1, 3, 4, 16):
        k = label_packing.packing_factor(a)
        for x in (1, 2, 7, 8, 9, 33):
            lab = rng.integers(0, a + 1, (3, 2, x), dtype=np.uint8)
            packed = label_packing.pack_labels(lab, k)
            assert packed.shape == (3, 2, (x - 1) // k + 2)
            np.testing.assert_array_equal(label_packing.unpack_labels(packed, k, x), lab)
            for shift in range(min(k, x)):  # a window starting inside the first byte
                np.testing.assert_array_equal(label_packing.unpack_labels(packed, k, x - shift, shift),
                                              lab[..., shift:])


def test_eval_center_window_is_the_numpy_crop():
    """The eval stream's in-graph crop (TF ops) is preprocess.fit_to_size, the crop export applies to new scans,
    on every mix of padded, cropped and even/odd axes; its packed label window, unpacked on the device, is
    fit_to_size of the labels, for every packing factor."""
    import jax
    rng = np.random.default_rng(5)
    size = (4, 5, 6)
    for shape in [(4, 5, 6), (1, 2, 3), (7, 9, 11), (2, 10, 5), (8, 3, 13), (5, 6, 7), (4, 5, 1), (3, 8, 14)]:
        x = rng.integers(0, 255, shape, dtype=np.uint8)
        for a in (1, 3, 15, 200):
            k = label_packing.packing_factor(a)
            lab = rng.integers(0, a + 1, shape, dtype=np.uint8)
            im, packed, shift = (t.numpy() for t in tfdata.center_window(
                tf.constant(x), tf.constant(label_packing.pack_labels(lab, k)), k, size))
            np.testing.assert_array_equal(im, preprocess.fit_to_size(x, size))
            got = jax.jit(augment.unpack_window, static_argnums=1)(packed[None], size[2], np.array([shift]))[0]
            np.testing.assert_array_equal(got, preprocess.fit_to_size(lab, size), err_msg=f"{shape} k={k}")


@pytest.mark.slow
def test_eval_batches_pad_last_batch(prepared_demo):
    batches = list(tfdata.eval_batches(str(prepared_demo / "records"), "valid", batch_size=5, size_zyx=(32, 48, 64)))
    assert [int(b["mask"].sum()) for b in batches] == [5, 5, 2]
    assert all(b["image"].shape == (5, 32, 48, 64) for b in batches)
    ids = [i for b in batches for i, m in zip(b["id"], b["mask"]) if m]
    assert len(set(ids)) == 12


@pytest.mark.slow
def test_reconstruction_table_matches_the_record_files(prepared_demo):
    """prepare's reconstructions.json describes each record file in order (the one-per-epoch filter relies on it)."""
    import zlib

    from input_pipeline import ct_rate, records

    rdir = str(prepared_demo / "records")
    table = json.loads((prepared_demo / "records" / records.RECONSTRUCTIONS_FILE).read_text())["train"]
    spec = records.load_builder(rdir).info.features
    files = records.split_files(rdir, "train")
    for f, rows in zip(files, records.shard_rows(len(table["group"]), len(files))):
        ids = [spec.deserialize_example(r)["id"].numpy().decode() for r in tf.data.TFRecordDataset(f)]
        assert [zlib.crc32(ct_rate.scan_key(i).encode()) & 0x7FFFFFFF for i in ids] == [table["group"][j] for j in rows]
    assert set(table["count"]) == {1}  # the demo has one reconstruction per scan
    for split in ("train", "valid"):  # and its record index gives every record's bytes, as the headers do
        index = records.load_record_index(rdir, split)
        for f in records.split_files(rdir, split):
            for a, b in zip(tfdata.record_spans(f), tfdata.record_spans(f, index[os.path.basename(f)])):
                np.testing.assert_array_equal(a, b)


def test_records_without_packed_labels_get_a_clear_error():
    old = tfds.features.FeaturesDict({"image": tfds.features.Tensor(shape=(None, None, None), dtype=np.uint8),
                                      "labels": tfds.features.Tensor(shape=(None, None, None), dtype=np.uint8),
                                      "text_tokens": tfds.features.Tensor(shape=(4, 8), dtype=np.int32)})
    with pytest.raises(ValueError, match="prepare again"):
        tfdata.records_packing_factor(old)


@pytest.mark.slow
def test_text_length_statistics_per_anatomy(prepared_demo):
    """stats.json gives the token lengths of each anatomy's texts (to set prep.text_len from the data) and the
    share the configured length truncates: recounted from the tokens of the training records."""
    from input_pipeline.tokenizer import EOS_ID

    stats = json.loads((prepared_demo / "records" / "stats.json").read_text())
    manifest = json.loads((prepared_demo / "records" / "manifest.json").read_text())
    pooled, by = stats["anatomy_text_tokens"], stats["anatomy_text_tokens_by_anatomy"]
    counts = {a: [] for a in manifest["anatomies"]}  # tokens of each described anatomy's text, [EOS] included
    for ex in tfds.builder_from_directory(str(prepared_demo / "records")).as_dataset(split="train").as_numpy_iterator():
        for a, tokens, described in zip(manifest["anatomies"], ex["text_tokens"], ex["has_text"]):
            if described:
                counts[a].append(int(np.flatnonzero(tokens == EOS_ID)[0]) + 1)
    assert set(by) == {a for a, n in counts.items() if n} and len(by) >= 3
    # The records keep min(length, text_len) tokens: the demo's texts all fit, so these are the lengths.
    assert max(max(n) for n in counts.values() if n) < manifest["text_len"]

    def percentile(values, q):  # linear interpolation between the closest ranks
        v = sorted(values)
        pos = q / 100 * (len(v) - 1)
        lo = int(pos)
        return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (pos - lo)

    pooled_counts = [x for per_anatomy in counts.values() for x in per_anatomy]
    for got, n in [(pooled, pooled_counts), *((by[a], counts[a]) for a in by)]:
        assert got == pytest.approx({**{f"p{q}": percentile(n, q) for q in (50, 90, 95, 99, 100)},
                                     "truncated_at_configured": 0.0})


@pytest.mark.slow
def test_tensorflow_loads_without_keras_and_leaves_it_importable():
    """`import tensorflow` would import Keras (2.3 CPU-s per process); input_pipeline.tf_modules keeps it out, in a
    fresh process, while tf.data works, and `import keras` (with tf.keras) still works afterwards."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import sys
        from input_pipeline import tfdata
        from input_pipeline.tf_modules import tf
        assert "keras" not in sys.modules, "keras was imported"
        assert list(tf.data.Dataset.range(3).map(lambda x: x * 2).as_numpy_iterator()) == [0, 2, 4]
        import keras
        assert tf.keras.layers.Dense is keras.layers.Dense
        print("OK")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]
