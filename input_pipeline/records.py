"""Sharded TFRecord files of prepared scans, readable through tensorflow-datasets (`tfds.builder_from_directory`)."""

from __future__ import annotations

import json
import os
import zlib

import numpy as np

from input_pipeline.tf_modules import tf, tfds

DATASET_NAME = "fvlm_records"
FILE_FORMAT = "tfrecord"


VOLUME_ENCODINGS = {"none": tfds.features.Encoding.BYTES, "zlib": tfds.features.Encoding.ZLIB}


def features(num_anatomies: int, num_diseases: int, text_len: int, report_len: int, num_targets: int,
             volume_encoding: str = "none"):
    """The tfds feature spec of one prepared scan. Volumes are uint8 (window mapped to 0..255).

    `labels_packed` is the anatomy index map (0 background, a + 1 for anatomy a) bit-packed along x as
    `input_pipeline.label_packing.pack_labels` describes, with `label_packing.packing_factor(num_anatomies)` voxels per
    byte;
    `label_packing.unpack_labels(ex["labels_packed"], k, ex["image"].shape[2])` restores it.

    volume_encoding "none" stores them as raw bytes (fastest input pipeline); "zlib" makes records about 2.8x
    smaller at about 4x the decoding CPU time (bench/input_pipeline.py). The choice is kept in the records'
    metadata, so readers need not know it.
    """
    if volume_encoding not in VOLUME_ENCODINGS:
        raise ValueError(f"volume_encoding={volume_encoding!r}: choose one of {sorted(VOLUME_ENCODINGS)}")
    enc = VOLUME_ENCODINGS[volume_encoding]
    t = tfds.features.Tensor
    return tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "image": t(shape=(None, None, None), dtype=np.uint8, encoding=enc),
        "labels_packed": t(shape=(None, None, None), dtype=np.uint8, encoding=enc),
        "text_tokens": t(shape=(num_anatomies, text_len), dtype=np.int32),
        "has_text": t(shape=(num_anatomies,), dtype=np.bool_),
        "normal": t(shape=(num_anatomies,), dtype=np.bool_),
        "disease": t(shape=(num_anatomies, num_diseases), dtype=np.bool_),
        "text_id": t(shape=(num_anatomies,), dtype=np.int32),
        "report_tokens": t(shape=(report_len,), dtype=np.int32),
        "targets": t(shape=(num_targets,), dtype=np.int32),
    })


def shard_path(records_dir: str, split: str, shard: int, num_shards: int) -> str:
    return os.path.join(records_dir, f"{DATASET_NAME}-{split}.{FILE_FORMAT}-{shard:05d}-of-{num_shards:05d}")


def serialize(spec, serializer, example: dict) -> bytes:
    """`spec.serialize_example`, made deterministic: a tf.train.Example keeps its features in a protobuf map, which
    the default serialization writes in an order that changes from one process to the next (the same example gave
    three different byte strings in three runs); deterministic serialization sorts the map by feature name."""
    return serializer.get_tf_example(spec.encode_example(example)).SerializeToString(deterministic=True)


class ShardedWriter:
    """Round-robin writer over `num_shards` files of one split; records each file's record lengths for the metadata
    and the record index."""

    def __init__(self, records_dir: str, split: str, num_shards: int, feature_spec):
        self.split, self.spec = split, feature_spec
        self.serializer = tfds.core.example_serializer.ExampleSerializer(feature_spec.get_serialized_info())
        self.paths = [shard_path(records_dir, split, i, num_shards) for i in range(num_shards)]
        self.writers = [tf.io.TFRecordWriter(p) for p in self.paths]
        self.record_bytes: list[list[int]] = [[] for _ in range(num_shards)]
        self.count = 0

    def write(self, example: dict) -> None:
        i = self.count % len(self.writers)
        data = serialize(self.spec, self.serializer, example)
        self.writers[i].write(data)
        self.record_bytes[i].append(len(data))
        self.count += 1

    def close(self) -> tfds.core.SplitInfo:
        for w in self.writers:
            w.close()
        sizes = [os.path.getsize(p) for p in self.paths]
        write_record_index(os.path.dirname(self.paths[0]), self.split, {
            os.path.basename(p): {"bytes": size, "record_bytes": n}
            for p, size, n in zip(self.paths, sizes, self.record_bytes)})
        return tfds.core.SplitInfo(name=self.split, shard_lengths=[len(n) for n in self.record_bytes],
                                   num_bytes=sum(sizes),
                                   filename_template=file_template(os.path.dirname(self.paths[0]), self.split))


RECONSTRUCTIONS_FILE = "reconstructions.json"


def record_index_path(records_dir: str, split: str) -> str:
    return os.path.join(records_dir, f"record_index-{split}.json")


def write_json_atomic(path: str, obj, indent: int | None = None) -> None:
    """Writes `obj` as JSON to a temporary name and renames it: a reader (or a kill) never sees half of it."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=indent)
    os.replace(path + ".tmp", path)


def write_record_index(records_dir: str, split: str, index: dict) -> None:
    """Writes {file name: {"bytes": file size, "record_bytes": [data length of each record, in file order]}} of a
    split's record files, so readers can find every record's byte range without scanning the files
    (`tfdata.record_spans`), atomically (`write_json_atomic`)."""
    write_json_atomic(record_index_path(records_dir, split), index)


def load_record_index(records_dir: str, split: str) -> dict | None:
    """The split's record index written by `ShardedWriter.close`, or None where there is none (older records)."""
    path = record_index_path(records_dir, split)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def reconstruction_table(ids: list[str], scan_of) -> dict:
    """Which records are reconstructions of the same scan, in write order: {"group", "index", "count"} lists.

    group: a 31-bit hash of the scan (`scan_of(id)`), index: the record's rank among its scan's reconstructions
    (by id), count: how many the scan has. The training stream uses it to take one reconstruction per scan and
    epoch (`tfdata.train_batches(reconstructions="one_per_epoch")`).
    """
    scans = [scan_of(i) for i in ids]
    members: dict[str, list[str]] = {}
    for i, scan in zip(ids, scans):
        members.setdefault(scan, []).append(i)
    rank = {i: r for m in members.values() for r, i in enumerate(sorted(m))}
    return {"group": [zlib.crc32(scan.encode()) & 0x7FFFFFFF for scan in scans], "index": [rank[i] for i in ids],
            "count": [len(members[scan]) for scan in scans]}


def shard_rows(num_records: int, num_shards: int) -> list[list[int]]:
    """The write-order numbers of the records in each shard file, in file order (ShardedWriter's round robin)."""
    return [list(range(f, num_records, num_shards)) for f in range(num_shards)]


def file_template(records_dir: str, split: str | None = None) -> tfds.core.ShardedFileTemplate:
    return tfds.core.ShardedFileTemplate(data_dir=records_dir, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
                                         dataset_name=DATASET_NAME, split=split, filetype_suffix=FILE_FORMAT)


def write_metadata(records_dir: str, feature_spec, split_infos, description: str) -> None:
    tfds.folder_dataset.write_metadata(data_dir=records_dir, features=feature_spec, split_infos=split_infos,
                                       filename_template=file_template(records_dir), description=description,
                                       check_data=False)


def load_builder(records_dir: str):
    """The tfds builder of a prepared records folder (feature spec, splits, sizes)."""
    if not os.path.exists(os.path.join(records_dir, "dataset_info.json")):
        raise FileNotFoundError(f"no prepared records in {records_dir}: run --mode=prepare first")
    return tfds.builder_from_directory(records_dir)


def split_files(records_dir: str, split: str) -> list[str]:
    files = sorted(tf.io.gfile.glob(os.path.join(records_dir, f"{DATASET_NAME}-{split}.{FILE_FORMAT}-*")))
    if not files:
        raise FileNotFoundError(f"no records for split {split!r} in {records_dir}")
    return files
