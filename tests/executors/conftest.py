"""One real two-node Ray cluster for the whole test run: a head and a second node started with
`ray start` on this machine, one CPU each, each with its own temp folder and a small object store
(megallama.executors.ray_local_cluster). Stopped in the finaliser, also when a test fails."""

from __future__ import annotations

import time

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    ray = pytest.importorskip("ray")
    from megallama.executors.ray_local_cluster import LocalRayCluster

    with LocalRayCluster(nodes=2, cpus_per_node=1) as cluster:
        try:
            ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
            deadline = time.time() + 60
            while ray.cluster_resources().get("CPU", 0) < 2 and time.time() < deadline:
                time.sleep(0.5)
            assert ray.cluster_resources().get("CPU", 0) == 2, ray.cluster_resources()
            yield cluster
        finally:
            if ray.is_initialized():
                ray.shutdown()
