"""Config monitor family: CNI network configs and plugin binaries on disk.

``inotify`` (primary) and ``file-poll`` (fallback) share ``events``, so both
emit the same kinds with the same fields; they differ only in how they learn
which paths to look at again.
"""
