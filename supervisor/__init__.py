"""The supervisor: CLI, configuration, capability probes, the proxy and
control sockets, and the loop that runs one process per monitor."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cnisup")
except PackageNotFoundError:  # running from a tree that was not installed
    __version__ = "0+unknown"
