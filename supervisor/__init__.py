"""The supervisor: CLI, configuration, capability probes, the proxy and
control sockets, and the loop that runs one process per monitor."""

from functools import cache


@cache
def version() -> str:
    """The installed version. Asked for, not imported: importlib.metadata takes ~45 ms to
    import, and every CLI command imports this package."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("cnisup")
    except PackageNotFoundError:  # running from a tree that was not installed
        return "0+unknown"
