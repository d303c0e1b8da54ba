"""The Apache Beam preparation path (DirectRunner) writes exactly the records, rejects and statistics of the local
process pool."""

import json
import logging

import pytest
import tensorflow_datasets as tfds
from conftest import manifest_config
from test_rejects import EXPECTED, bad_manifest  # noqa: F401  (fixture)

from input_pipeline import prepare, records

pytestmark = pytest.mark.slow  # subprocesses or training: not in the fast lane

beam = pytest.importorskip("apache_beam", reason="Apache Beam is not installed (pip install 'fvlm-jax[beam]')")


def test_beam_runner_writes_the_local_records(bad_manifest, tmp_path, caplog):  # noqa: F811
    local, on_beam = tmp_path / "local", tmp_path / "beam"
    prepare.prepare(manifest_config(), str(bad_manifest), str(local), progress=False)
    caplog.set_level(logging.INFO, logger="input_pipeline.prepare")
    prepare.prepare(manifest_config(runner="beam", beam_options="--runner=DirectRunner --direct_num_workers=2 "
                                    "--direct_running_mode=multi_threading"),
                    str(bad_manifest), str(on_beam), progress=False)
    assert "through Apache Beam" in caplog.text
    files = sorted(p.name for p in local.glob(f"{records.DATASET_NAME}-*"))
    assert files and files == sorted(p.name for p in on_beam.glob(f"{records.DATASET_NAME}-*"))
    for name in files:
        assert (local / name).read_bytes() == (on_beam / name).read_bytes(), name
    for name in ("rejects.jsonl", "stats.json"):
        assert (local / name).read_text() == (on_beam / name).read_text()
    assert len([json.loads(line) for line in (on_beam / "rejects.jsonl").read_text().splitlines()]) == len(EXPECTED)
    ds = tfds.builder_from_directory(str(on_beam)).as_dataset(split="train")
    assert sorted(ex["id"].numpy().decode() for ex in ds) == ["ok1", "ok2"]
