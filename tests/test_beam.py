"""The Apache Beam preparation path writes exactly the records, rejects and statistics of the local process pool:
on the DirectRunner, and on the DaskRunner over a dask.distributed cluster of worker processes."""

import json
import logging

import pytest
import tensorflow_datasets as tfds
from conftest import manifest_config
from test_rejects import EXPECTED, bad_manifest  # noqa: F401  (fixture)

from input_pipeline import prepare, records

beam = pytest.importorskip("apache_beam", reason="Apache Beam is not installed (pip install 'fvlm-jax[beam]')")


def assert_same_preparation(local, other):
    files = sorted(p.name for p in local.glob(f"{records.DATASET_NAME}-*"))
    assert files and files == sorted(p.name for p in other.glob(f"{records.DATASET_NAME}-*"))
    for name in files:
        assert (local / name).read_bytes() == (other / name).read_bytes(), name
    for name in ("rejects.jsonl", "stats.json"):
        assert (local / name).read_text() == (other / name).read_text()
    assert len([json.loads(line) for line in (other / "rejects.jsonl").read_text().splitlines()]) == len(EXPECTED)
    ds = tfds.builder_from_directory(str(other)).as_dataset(split="train")
    assert sorted(ex["id"].numpy().decode() for ex in ds) == ["ok1", "ok2"]


def test_dask_runner_options_spread_one_scan_per_task():
    dask = "apache_beam.runners.dask.dask_runner.DaskRunner"
    assert prepare.beam_runner_options("--runner DaskRunner --dask_client_address=tcp://h:8786") == [
        f"--runner={dask}", "--dask_client_address=tcp://h:8786", "--dask_partition_size=1"]
    assert prepare.beam_runner_options(f"--runner={dask} --dask_npartitions 40") == [
        f"--runner={dask}", "--dask_npartitions", "40"]
    assert prepare.beam_runner_options("--runner=DirectRunner --direct_num_workers=2") == [
        "--runner=DirectRunner", "--direct_num_workers=2"]
    assert prepare.beam_runner_options("") == []


@pytest.mark.slow  # subprocesses: not in the fast lane
def test_beam_runners_write_the_local_records(bad_manifest, tmp_path, caplog):  # noqa: F811
    """One local preparation (the rejects hold the manifest's paths) against the DirectRunner, then the DaskRunner
    on a cluster of 2 worker processes started here."""
    local, direct, on_dask = tmp_path / "local", tmp_path / "direct", tmp_path / "dask"
    prepare.prepare(manifest_config(), str(bad_manifest), str(local), progress=False)
    caplog.set_level(logging.INFO, logger="input_pipeline.prepare")
    prepare.prepare(manifest_config(runner="beam", beam_options="--runner=DirectRunner --direct_num_workers=2 "
                                    "--direct_running_mode=multi_threading"),
                    str(bad_manifest), str(direct), progress=False)
    assert "through Apache Beam, DirectRunner" in caplog.text
    assert_same_preparation(local, direct)

    distributed = pytest.importorskip("distributed", reason="dask.distributed is not installed: the DirectRunner "
                                      "case passed, the DaskRunner case did not run (pip install 'fvlm-jax[beam]')")
    # Worker processes (spawned) inherit this process's sys.path, so they import this checkout's input_pipeline.
    with (distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                   local_directory=str(tmp_path / "dask-workers")) as cluster,
          distributed.Client(cluster) as client):
        with distributed.get_task_stream(client) as tasks:
            prepare.prepare(manifest_config(runner="beam", beam_options="--runner=DaskRunner "
                                            f"--dask_client_address={cluster.scheduler_address}"),
                            str(bad_manifest), str(on_dask), progress=False)
    assert f"dask.distributed cluster at {cluster.scheduler_address}: 2 workers, 2 threads" in caplog.text
    # The scans were spread over both worker processes (Beam's default dask.bag partitions of 128 scans: one).
    assert len({task["worker"] for task in tasks.data}) == 2
    assert_same_preparation(local, on_dask)
