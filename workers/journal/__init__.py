"""The journal family: every event into a local SQLite file (WAL, batched,
retention by size and age), read by ``cnisup history``, ``explain`` and
``tail --since``."""
