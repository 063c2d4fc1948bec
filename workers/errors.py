"""Exceptions a worker raises to choose its exit code."""


class CapabilityMissing(Exception):
    """A capability or kernel feature this worker needs is missing (exit 77)."""


class NoClusterConfig(CapabilityMissing):
    """No Kubernetes client configuration anywhere: not a fault, there is nothing to watch."""


class WorkerConfigError(Exception):
    """The configuration cannot work for this worker (exit 78); names the key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
