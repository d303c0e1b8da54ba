"""One reconstruction per scan and epoch (CT-RATE: train_1_a_1, train_1_a_2 are one scan): choice, stream, resume."""

import json
from pathlib import Path

import numpy as np
import pytest

from input_pipeline import ct_rate, label_packing, records, tfdata
from input_pipeline.tf_modules import tf

SIZE = (4, 6, 8)


def test_choice_is_the_same_in_numpy_and_tensorflow_and_spreads():
    rng = np.random.default_rng(0)
    group = rng.integers(0, 2**31 - 1, 500)
    count = rng.integers(1, 5, 500)
    for seed, epoch in ((0, 0), (3, 7), (2**40 + 5, 123_456)):
        a = tfdata.reconstruction_choice(group, seed, epoch, count)
        b = tfdata.reconstruction_choice(tf.constant(group, tf.int64), seed, tf.constant(epoch, tf.int64),
                                         tf.constant(count, tf.int64)).numpy()
        np.testing.assert_array_equal(a, b)
        for c in range(1, 5):  # every reconstruction of every count is chosen for some scan
            assert set(a[count == c].tolist()) == set(range(c)), (seed, epoch, c)
    # Scans of two reconstructions: about half the epochs take each one, and scans do not move in lockstep.
    two = np.full(500, 2)
    picks = np.stack([tfdata.reconstruction_choice(group, 1, e, two) for e in range(40)])  # [epoch, scan]
    assert 0.4 < picks.mean() < 0.6
    lo, hi = np.quantile(picks.mean(0), [0.05, 0.95])  # per-scan frequency over 40 epochs, binomial sd ~0.08
    assert 0.3 < lo and hi < 0.7
    assert np.corrcoef(picks[:, 0], picks[:, 1])[0, 1] < 0.9


def test_reconstruction_table():
    ids = ["train_1_a_1", "train_2_a_2", "train_1_a_2", "train_2_a_1", "train_3_b_1", "hospital_scan_9"]
    t = records.reconstruction_table(ids, ct_rate.scan_key)
    assert t["count"] == [2, 2, 2, 2, 1, 1]
    assert t["index"] == [0, 1, 1, 0, 0, 0]
    assert t["group"][0] == t["group"][2] != t["group"][1] == t["group"][3]
    assert records.shard_rows(7, 3) == [[0, 3, 6], [1, 4], [2, 5]]


@pytest.fixture(scope="module")
def multi_recon_records(tmp_path_factory):
    """Records of 9 scans with 1-3 reconstructions each (18 records, 3 files); report_tokens[0] = record number."""
    out = tmp_path_factory.mktemp("recon_records")
    ids = [f"train_{s}_a_{r}" for s in range(9) for r in range(1, 2 + s % 3)]
    spec = records.features(4, 2, 3, 5, 1)
    w = records.ShardedWriter(str(out), "train", 3, spec)
    rng = np.random.default_rng(0)
    for j, i in enumerate(ids):
        labels = rng.integers(0, 5, SIZE, dtype=np.uint8)
        w.write({"id": i, "image": rng.integers(0, 255, SIZE, dtype=np.uint8),
                 "labels_packed": label_packing.pack_labels(labels, 2), "text_tokens": np.zeros((4, 3), np.int32),
                 "has_text": np.ones(4, bool), "normal": np.ones(4, bool), "disease": np.zeros((4, 2), bool),
                 "text_id": np.zeros(4, np.int32), "report_tokens": np.full(5, j, np.int32),
                 "targets": np.zeros(1, np.int32)})
    records.write_metadata(str(out), spec, [w.close()], "test")
    table = records.reconstruction_table(ids, ct_rate.scan_key)
    (out / records.RECONSTRUCTIONS_FILE).write_text(json.dumps({"train": table}))
    return out, ids, table


def _stream(rdir, n, **kw):
    args = dict(batch_size=3, size_zyx=SIZE, flip_prob=0.5, seed=4, shuffle_buffer=4, block_files=2,
                reconstructions="one_per_epoch")
    it = tfdata.train_batches(str(rdir), "train", **(args | kw))
    return [next(it) for _ in range(n)]


def test_stream_takes_one_reconstruction_per_scan_each_epoch_and_resumes(multi_recon_records):
    rdir, ids, table = multi_recon_records
    batches = _stream(rdir, 12)  # 36 examples = 4 epochs of 9 scans
    order = [int(r) for b in batches for r in b["report_tokens"][:, 0]]
    picked = []
    for e in range(4):
        epoch = order[9 * e: 9 * (e + 1)]
        assert sorted(ct_rate.scan_key(ids[j]) for j in epoch) == sorted({ct_rate.scan_key(i) for i in ids})
        choice = tfdata.reconstruction_choice(np.array(table["group"]), 4, e, np.array(table["count"]))
        assert set(epoch) == {j for j in range(len(ids)) if choice[j] == table["index"][j]}
        picked.append(set(epoch))
    assert len({frozenset(p) for p in picked}) > 1  # the reconstruction changes between epochs
    for start in (2, 5, 7):  # resumes inside and across epochs give the uninterrupted batches
        for x, y in zip(batches[start:start + 2], _stream(rdir, 2, start_step=start)):
            for k in x:
                np.testing.assert_array_equal(x[k], y[k])


def test_ranged_reads_give_the_stream_of_reading_every_record(multi_recon_records, tmp_path):
    rdir, _, _ = multi_recon_records
    files = records.split_files(str(rdir), "train")
    for path in files:  # the spans are exactly the records' bytes
        offsets, lengths = tfdata.record_spans(path)
        raw = Path(path).read_bytes()
        assert [raw[o:o + n] for o, n in zip(offsets, lengths)] == list(
            tf.data.TFRecordDataset(path).as_numpy_iterator())
    ranged = _stream(rdir, 12)
    dropped = _stream(rdir, 12, ranged_reads=False)
    for x, y in zip(ranged, dropped):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    for x, y in zip(ranged[5:], _stream(rdir, 2, start_step=5)):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    cut, short = tmp_path / "cut.tfrecord", tmp_path / "short.tfrecord"
    cut.write_bytes(Path(files[-1]).read_bytes()[:-3])
    short.write_bytes(Path(files[-1]).read_bytes() + b"\0\0\0")
    for bad in (cut, short):
        with pytest.raises(ValueError, match="past the end|truncated"):
            tfdata.record_spans(str(bad))


def _copy_records(rdir, to):
    to.mkdir()
    for f in rdir.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    return to


def test_record_index_gives_the_spans_and_reads_are_checked(multi_recon_records, tmp_path, caplog):
    rdir, _, _ = multi_recon_records
    index = records.load_record_index(str(rdir), "train")
    files = records.split_files(str(rdir), "train")
    assert sorted(index) == sorted(Path(f).name for f in files)
    for path in files:  # the index written at preparation gives the spans the headers give
        scanned = tfdata.record_spans(path)
        indexed = tfdata.record_spans(path, index[Path(path).name])
        for a, b in zip(scanned, indexed):
            np.testing.assert_array_equal(a, b)
        stale = dict(index[Path(path).name], bytes=index[Path(path).name]["bytes"] + 1)
        with caplog.at_level("WARNING"):
            for a, b in zip(scanned, tfdata.record_spans(path, stale)):  # a stale entry: the headers are read
                np.testing.assert_array_equal(a, b)
        assert "does not match" in caplog.text

    # The stream takes the spans from the index: swapped lengths (same file size) put reads off the records.
    wrong = _copy_records(rdir, tmp_path / "wrong_index")
    bad_index = json.loads(json.dumps(index))
    for entry in bad_index.values():
        n = entry["record_bytes"]
        n[0], n[1] = n[1] + 8, n[0] - 8
    (wrong / Path(records.record_index_path(str(wrong), "train")).name).write_text(json.dumps(bad_index))
    with pytest.raises(tf.errors.DataLossError, match="corrupted record"):
        _stream(wrong, 12)

    # Without an index the spans come from the headers, and the stream is the same.
    plain = _copy_records(rdir, tmp_path / "no_index")
    Path(records.record_index_path(str(plain), "train")).unlink()
    for x, y in zip(_stream(rdir, 6), _stream(plain, 6)):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])

    # A flipped byte inside a record's data fails its CRC check.
    flipped = _copy_records(rdir, tmp_path / "flipped")
    for path in records.split_files(str(flipped), "train"):
        _corrupt(path, range(len(tfdata.record_spans(path)[0])))
    with pytest.raises(tf.errors.DataLossError, match="corrupted record"):
        _stream(flipped, 12)


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's /proc/self/io read counters")
def test_record_at_reads_only_its_record(tmp_path):
    """record_at seeks to the record: reading the last of 8 records of 1 MiB reads about 1 MiB, not the file."""
    path = str(tmp_path / "big.tfrecord")
    rng = np.random.default_rng(0)
    payloads = [rng.integers(0, 255, 2**20, dtype=np.uint8).tobytes() for _ in range(8)]
    with tf.io.TFRecordWriter(path) as w:
        for p in payloads:
            w.write(p)
    offsets, _ = tfdata.record_spans(path)

    def rchar():
        return int(next(line for line in open("/proc/self/io") if line.startswith("rchar")).split()[1])

    ds = tf.data.Dataset.from_tensors(tf.constant(int(offsets[-1]) - 12, tf.int64)).flat_map(
        lambda start: tfdata.record_at(path, start))
    it = iter(ds)
    before = rchar()
    assert next(it).numpy() == payloads[-1]
    assert rchar() - before < 1.5 * 2**20


def _corrupt(path, positions):
    """Flips a byte in the data of the records at `positions` of the record file `path`."""
    offsets, lengths = tfdata.record_spans(path)
    data = bytearray(Path(path).read_bytes())
    for p in positions:
        data[offsets[p] + lengths[p] // 2] ^= 0x01
    Path(path).write_bytes(bytes(data))


def test_left_out_reconstructions_are_not_read(multi_recon_records, tmp_path):
    """Records no epoch keeps (their index set past their count) are corrupted: ranged reads never touch them, while
    TFRecordDataset, which reads every record, fails on them."""
    rdir, _, table = multi_recon_records
    out = _copy_records(rdir, tmp_path / "never_kept")
    never = [j for j in range(len(table["index"])) if table["count"][j] > 1 and table["index"][j] == 0]
    assert len(never) == 6
    changed = dict(table, index=[99 if j in never else v for j, v in enumerate(table["index"])])
    (out / records.RECONSTRUCTIONS_FILE).write_text(json.dumps({"train": changed}))
    files = records.split_files(str(out), "train")
    for f, rows in zip(files, records.shard_rows(len(table["index"]), len(files))):
        _corrupt(f, [pos for pos, j in enumerate(rows) if j in never])
    order = [int(r) for b in _stream(out, 8) for r in b["report_tokens"][:, 0]]
    assert not set(order) & set(never)
    with pytest.raises(tf.errors.DataLossError, match="corrupted record"):
        _stream(out, 8, ranged_reads=False)


@pytest.mark.slow
def test_parallel_reads_give_the_same_stream(multi_recon_records):
    rdir, _, _ = multi_recon_records
    for mode in ("all", "one_per_epoch"):
        one = _stream(rdir, 8, reconstructions=mode)
        for par in (2, -1):
            for x, y in zip(one, _stream(rdir, 8, reconstructions=mode, parallel_reads=par), strict=True):
                for k in x:
                    np.testing.assert_array_equal(x[k], y[k])
        for x, y in zip(one[5:], _stream(rdir, 3, reconstructions=mode, parallel_reads=2, start_step=5), strict=True):
            for k in x:
                np.testing.assert_array_equal(x[k], y[k])
    with pytest.raises(ValueError, match="parallel_reads"):
        _stream(rdir, 1, parallel_reads=0)


def _graph_ops(ds) -> set[str]:
    """The op types in the graph of a tf.data.Dataset, its functions included."""
    from tensorflow.core.framework import graph_pb2
    graph = graph_pb2.GraphDef.FromString(ds._as_serialized_graph().numpy())
    return {n.op for n in graph.node} | {n.op for f in graph.library.function for n in f.node_def}


def test_no_python_in_the_training_or_eval_stream(multi_recon_records):
    """A Python op (tf.py_function / numpy_function) with a call in flight when the endless stream's iterator is
    destroyed can deadlock the process; the training stream has none, whatever it reads, nor does evaluation."""
    rdir, _, _ = multi_recon_records
    for kw in ({}, {"reconstructions": "one_per_epoch"}, {"reconstructions": "one_per_epoch", "ranged_reads": False},
               {"decode": "after_shuffle"}):
        it = tfdata.train_batches(str(rdir), "train", batch_size=3, size_zyx=SIZE, flip_prob=0.5, seed=4,
                                  shuffle_buffer=4, block_files=2, **kw)
        ops = _graph_ops(it._iterator._dataset)
        assert not ops & {"PyFunc", "PyFuncStateless", "EagerPyFunc"}, kw
        assert ("TFRecordDatasetV2" in ops) == (kw.get("reconstructions") == "one_per_epoch" and
                                                kw.get("ranged_reads", True)), kw
    # Evaluation too (an abandoned eval loop destroys its iterator mid-stream as well).
    ops = _graph_ops(tfdata.eval_dataset(str(rdir), "train", batch_size=2, size_zyx=SIZE))
    assert "TFRecordDataset" in ops or "TFRecordDatasetV2" in ops
    assert not ops & {"PyFunc", "PyFuncStateless", "EagerPyFunc"}


def test_all_reconstructions_by_default(multi_recon_records):
    rdir, ids, _ = multi_recon_records
    batches = _stream(rdir, 6, reconstructions="all")
    assert sorted(int(r) for b in batches for r in b["report_tokens"][:, 0]) == list(range(18))
    # Every record by byte range (the default) and by TFRecordDataset: the same stream, resumes included.
    for x, y in zip(batches, _stream(rdir, 6, reconstructions="all", ranged_reads=False)):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    for x, y in zip(batches[4:], _stream(rdir, 2, reconstructions="all", start_step=4)):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    with pytest.raises(ValueError, match="one_per_epoch"):
        _stream(rdir, 1, reconstructions="random")


def test_resume_point_with_per_epoch_lengths():
    lengths = lambda e: [2 + e % 2, 0, 3]  # noqa: E731
    walk = []
    for epoch in range(4):
        per_file = lengths(epoch)
        for b, files in enumerate(tfdata.epoch_blocks(3, 2, 9, epoch)):
            walk += [(epoch, b, k) for k in range(sum(per_file[i] for i in files))]
    for consumed, want in enumerate(walk):
        assert tfdata.resume_point(lengths, 2, 9, consumed) == want
