"""Joining a Ray cluster (README "Running on a Ray cluster"), for `editor serve --replicas` and
`editor batch --ray`. Imports Ray at the top: only those paths import this module."""

from __future__ import annotations

import ray


def connect(address: str | None) -> bool:
    """Join the cluster at `address` ('auto', or host:port of `ray start --head`), or start a
    local Ray instance (no dashboard) when None. A process already connected stays connected.
    True when this call connected (so the caller also disconnects)."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)
    return True


def use_gpus(device: str) -> bool:
    """Whether each replica or batch worker takes one GPU: the cluster has GPUs and the device
    setting does not force the CPU."""
    return device not in ("cpu", "mps") and ray.cluster_resources().get("GPU", 0) >= 1


__all__ = ["connect", "use_gpus"]
