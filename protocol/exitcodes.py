"""Worker exit codes (sysexits), shared by workers and the supervisor."""

OK = 0  #: asked to stop, stopped
EX_NOPERM = 77  #: a capability or kernel feature is missing: run the fallback
EX_CONFIG = 78  #: configuration error: do not retry
EX_SOFTWARE = 70  #: internal error: a crash, restarted with backoff
