"""Joining a Ray cluster (README "Running on a Ray cluster"), for `editor serve --replicas` and
`editor batch --ray`. Imports Ray at the top: only those paths import this module."""

from __future__ import annotations

import ray

_started_local = False  # `connect` started the local Ray instance this process is connected to


def connect(address: str | None) -> bool:
    """Join the cluster at `address` ('auto', or host:port of `ray start --head`), or start a
    local Ray instance (no dashboard) when None. A process already connected stays connected.
    True when this call connected (so the caller also disconnects)."""
    global _started_local
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)
        _started_local = True
    return True


def started_local_ray() -> bool:
    """Whether `connect` started the local Ray instance this process is connected to, so this
    process must stop it (`stop_local_ray`): `editor serve` connects before its backend starts."""
    return _started_local and ray.is_initialized()


def stop_local_ray() -> None:
    """Stop the local Ray instance with all of its processes (GCS, raylet, dashboard and runtime
    env agents, workers). The driver must do it: a driver that dies by a signal, as a server
    after SIGTERM does once it has shut down, skips Ray's exit hook, and the agents outlive it."""
    global _started_local
    ray.shutdown()
    _started_local = False


def use_gpus(device: str) -> bool:
    """Whether each replica or batch worker takes one GPU: the cluster has GPUs and the device
    setting does not force the CPU."""
    return device not in ("cpu", "mps") and ray.cluster_resources().get("GPU", 0) >= 1


__all__ = ["connect", "started_local_ray", "stop_local_ray", "use_gpus"]
