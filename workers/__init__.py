"""Monitor workers: one process each, started by the supervisor with
``python -m cnisup.workers <name>``."""
