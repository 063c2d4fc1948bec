"""What the config family reports, shared by the inotify and file-poll workers
so that both emit the same events with the same fields by construction.

A worker only decides *which* paths to look at again and *when*. Everything
else is here: looking at a directory entry without trusting it (size caps,
FIFOs, symlink loops), hashing, parsing a CNI config the way libcni does, the
per-path state that turns looks into created/modified/deleted exactly once,
the active config, and the schedule of deferred looks (quiet periods, settle
delays, files still being written).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from cnisup.protocol.kinds import ConfigKind
from cnisup.protocol.settings import Cni

#: What ``libcni.ConfFiles`` lists, as containerd and CRI-O call it.
CONF_EXTENSIONS = frozenset({".conf", ".conflist", ".json"})
#: A file modified less than this long ago may still be being written.
QUIET_S = 1.0
#: A new name is reported only once it has existed this long, so a temp file
#: renamed away at once (write + rename installers) is never reported. Kept
#: short: it is the latency of every ``created`` (budget: p99 under 50 ms).
SETTLE_S = 0.05
#: A file rewritten without pause is reported after this long anyway.
MAX_HOLD_S = 10.0
#: Bytes read between heartbeats while hashing (a 256 MiB binary is 256 reads).
CHUNK = 1 << 20

#: What a path is: a network config, or a plugin binary (a path may be both).
CONFIG = "config"
BINARY = "binary"
_KIND = {
    (CONFIG, "discovered"): ConfigKind.CONFIG_DISCOVERED, (CONFIG, "created"): ConfigKind.CONFIG_CREATED,
    (CONFIG, "modified"): ConfigKind.CONFIG_MODIFIED, (CONFIG, "deleted"): ConfigKind.CONFIG_DELETED,
    (BINARY, "discovered"): ConfigKind.BINARY_DISCOVERED, (BINARY, "created"): ConfigKind.BINARY_CREATED,
    (BINARY, "modified"): ConfigKind.BINARY_MODIFIED, (BINARY, "deleted"): ConfigKind.BINARY_DELETED,
}


class Sink(Protocol):
    """The part of ``WorkerContext`` the engine uses."""

    def publish(self, kind: str, data: dict[str, Any]) -> None: ...
    def warn(self, code: str, message: str, **fields: Any) -> None: ...
    def heartbeat(self) -> None: ...
    @property
    def stopping(self) -> bool: ...


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def shown(path: str) -> str:
    """Paths go out as UTF-8 JSON: bytes of a name that are not UTF-8 are shown as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _text(value: str) -> str:
    """A string from a file's JSON: a lone surrogate (``"\\ud800"``) cannot be
    encoded as UTF-8 and would break the envelope; it is shown escaped."""
    return value.encode("utf-8", "backslashreplace").decode()


def conf_ext(name: str) -> bool:
    """Go's ``filepath.Ext``: from the last dot, so ``.conf`` alone counts and
    ``10-x.conflist.tmp`` does not."""
    dot = name.rfind(".")
    return dot >= 0 and name[dot:] in CONF_EXTENSIONS


# -- looking at one entry ----------------------------------------------------------


@dataclass(frozen=True)
class Look:
    """``lstat`` (and ``stat`` through a symlink) of an entry, before any read."""

    is_link: bool
    st: os.stat_result  #: of the target; of the link itself when the target is unreachable
    key: tuple[Any, ...]  #: changes whenever the entry may have changed
    error: str | None  #: the target cannot be reached (loop, dangling, permission)


@dataclass(frozen=True)
class Content:
    error: str | None = None
    sha256: str | None = None
    data: bytes | None = None  #: kept for configs only
    st: os.stat_result | None = None  #: fstat of what was read


class Vanished(Exception):
    """The entry disappeared between listing and reading it."""


_KIND_NAMES = ((stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
               (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory"))


def _not_regular(mode: int) -> str:
    what = next((name for test, name in _KIND_NAMES if test(mode)), "unknown type")
    return f"not a regular file ({what})"


def _os_error(exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    return f"cannot read: {exc.strerror or exc}"


def look(path: str) -> Look | None:
    """None when there is no entry, or it is (or points to) a directory:
    subdirectories are not entries, the monitor does not recurse."""
    try:
        lst = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISDIR(lst.st_mode):
        return None
    st, error = lst, None
    is_link = stat.S_ISLNK(lst.st_mode)
    if is_link:
        try:
            st = os.stat(path)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                try:
                    error = f"dangling symlink to {shown(os.readlink(path))!r}"
                except OSError:
                    return None  # the link itself went away
            else:
                error = _os_error(exc)
        if stat.S_ISDIR(st.st_mode):
            return None
    key = (lst.st_ino, lst.st_mtime_ns, lst.st_ctime_ns,
           st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode, error)
    return Look(is_link=is_link, st=st, key=key, error=error)


def read(path: str, seen: Look, *, cap: int, keep: bool, tick: Callable[[], None]) -> Content:
    """Hash (and for configs keep) at most ``cap`` bytes. Never opens what is
    not a regular file; O_NONBLOCK so a FIFO swapped in after the look cannot
    block, and fstat refuses it."""
    if seen.error:
        return Content(error=seen.error)
    if not stat.S_ISREG(seen.st.st_mode):
        return Content(error=_not_regular(seen.st.st_mode))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise Vanished(path) from exc
    except OSError as exc:
        return Content(error=_os_error(exc))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return Content(error=_not_regular(st.st_mode), st=st)
        if st.st_size > cap:  # decided from fstat: a huge file is never read
            return Content(error=f"file too large: {st.st_size} bytes > cap {cap}", st=st)
        digest, chunks, total = hashlib.sha256(), [], 0
        while total <= cap:  # one byte past the cap tells a file that grew while read
            buf = os.read(fd, min(CHUNK, cap + 1 - total))
            if not buf:
                break
            total += len(buf)
            digest.update(buf)
            if keep:
                chunks.append(buf)
            tick()
        if total > cap:
            return Content(error=f"file too large: grew past the cap of {cap} bytes while read", st=st)
        return Content(sha256=digest.hexdigest(), data=b"".join(chunks) if keep else None, st=st)
    except OSError as exc:
        return Content(error=_os_error(exc))
    finally:
        os.close(fd)


# -- CNI config parsing, as libcni does it -----------------------------------------


class Invalid(ValueError):
    """Why libcni would refuse a config file."""


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _go_field(obj: dict[str, Any], key: str) -> Any:
    """Go's encoding/json fills struct fields case-insensitively, last key wins."""
    value = None
    for k, v in obj.items():
        if k.lower() == key.lower():
            value = v
    return value


def _check_netconf(obj: Any, where: str) -> str:
    """The fields libcni unmarshals into ``types.NetConf``, with Go's type
    rules (null is always fine); returns the plugin type."""
    if not isinstance(obj, dict):
        raise Invalid(f"{where}not a JSON object but {_json_type(obj)}")
    for key in ("name", "type", "cniVersion"):
        value = _go_field(obj, key)
        if value is not None and not isinstance(value, str):
            raise Invalid(f"{where}'{key}' must be a string, not {_json_type(value)}")
    caps = _go_field(obj, "capabilities")
    if caps is not None and not (isinstance(caps, dict) and all(isinstance(v, bool) for v in caps.values())):
        raise Invalid(f"{where}'capabilities' must map names to booleans")
    for key in ("ipam", "dns"):
        value = _go_field(obj, key)
        if value is not None and not isinstance(value, dict):
            raise Invalid(f"{where}'{key}' must be an object, not {_json_type(value)}")
    ipam_type = _go_field(_go_field(obj, "ipam") or {}, "type")
    if ipam_type is not None and not isinstance(ipam_type, str):
        raise Invalid(f"{where}'ipam.type' must be a string")
    plugin_type = _go_field(obj, "type")
    if not plugin_type:
        hint = " (it has 'plugins': a conflist needs the .conflist extension)" if "plugins" in obj else ""
        raise Invalid(f"{where}missing 'type'{hint}")
    return str(plugin_type)


def _conflist(obj: dict[str, Any]) -> tuple[str, str | None, list[str]]:
    """``libcni.ConfListFromBytes``: top-level keys are exact (a Go map)."""
    if "name" not in obj:
        raise Invalid("missing 'name'")
    name = obj["name"]
    if not isinstance(name, str):
        raise Invalid(f"'name' must be a string, not {_json_type(name)}")
    version = obj.get("cniVersion")
    if "cniVersion" in obj and not isinstance(version, str):
        raise Invalid(f"'cniVersion' must be a string, not {_json_type(version)}")
    if "disableCheck" in obj and not isinstance(obj["disableCheck"], bool):
        raise Invalid("'disableCheck' must be a boolean")
    if "plugins" not in obj:
        raise Invalid("missing 'plugins'")
    plugins = obj["plugins"]
    if not isinstance(plugins, list):
        raise Invalid(f"'plugins' must be an array, not {_json_type(plugins)}")
    if not plugins:
        raise Invalid("'plugins' is empty")
    return name, version, [_check_netconf(p, f"plugins[{i}]: ") for i, p in enumerate(plugins)]


def _conf(obj: dict[str, Any]) -> tuple[str | None, str | None, list[str]]:
    """``libcni.ConfFromBytes``: one plugin, needs a ``type``."""
    plugin_type = _check_netconf(obj, "")
    return _go_field(obj, "name") or None, _go_field(obj, "cniVersion") or None, [plugin_type]


def _no_constants(name: str) -> Any:
    raise Invalid(f"invalid JSON: {name} is not a JSON value")


def parse_config(name: str, content: bytes) -> dict[str, Any]:
    """``valid`` and either ``network``/``cni_version``/``plugins`` or ``error``."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        return {"valid": False,
                "error": f"not UTF-8 text: byte 0x{content[exc.start]:02x} at offset {exc.start}"}
    if not text.strip():
        return {"valid": False, "error": "empty file"}
    try:
        obj = json.loads(text, parse_constant=_no_constants)
        if not isinstance(obj, dict):
            raise Invalid(f"not a JSON object but {_json_type(obj)}")
        network, version, plugins = (_conflist if name.endswith(".conflist") else _conf)(obj)
    except json.JSONDecodeError as exc:
        return {"valid": False, "error": f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"}
    except RecursionError:
        return {"valid": False, "error": "invalid JSON: nested too deeply"}
    except Invalid as exc:
        return {"valid": False, "error": str(exc)}
    out: dict[str, Any] = {"valid": True}
    if network is not None:
        out["network"] = _text(network)
    if version is not None:
        out["cni_version"] = _text(version)
    out["plugins"] = [_text(p) for p in plugins]
    return out


# -- the state that turns looks into events -------------------------------------------


def _report(kind: str, path: str, content: Content,
            st: os.stat_result) -> tuple[dict[str, Any], tuple[Any, ...]]:
    """The event data for what was read, and what must change for a new event:
    the content when it could be read, else any metadata."""
    d, name = os.path.split(path)
    data: dict[str, Any] = {"path": shown(path), "dir": shown(d)}
    if kind == BINARY:
        data["name"] = shown(name)
    data.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
    if content.sha256:
        data["sha256"] = content.sha256
    if kind == CONFIG:
        data.update(parse_config(name, content.data) if content.data is not None
                    else {"valid": False, "error": content.error})
    else:
        data["executable"] = stat.S_ISREG(st.st_mode) and bool(st.st_mode & 0o111)
        if content.error:
            data["error"] = content.error
    dedupe: tuple[Any, ...] = ((content.sha256,) if content.sha256 else
                               (st.st_size, st.st_mtime_ns, st.st_ino, content.error))
    if kind == BINARY:  # chmod -x: same bytes, but a runtime can no longer run it
        dedupe += (data["executable"],)
    return data, dedupe


@dataclass
class _Record:
    """What was last reported for one (kind, path)."""

    dir: str
    key: tuple[Any, ...]  #: Look.key at the last read: unchanged means "no need to read"
    dedupe: tuple[Any, ...]  #: unchanged means "nothing to report"
    sha256: str | None
    is_link: bool
    valid: bool = False
    network: str | None = None


@dataclass
class _Due:
    at: float  #: monotonic
    hold: bool  #: re-check freshness (the content may be incomplete) before reading
    first: float  #: when the path was first deferred, for MAX_HOLD_S
    use_cache: bool = False  #: skip the read when the stat key did not change


class Engine:
    """Per-path state, diff and schedule of one config-family worker."""

    def __init__(self, sink: Sink, cni: Cni) -> None:
        self.sink = sink
        self.cni = cni
        conf_dirs = _unique(os.path.normpath(d) for d in cni.conf_dirs)
        bin_dirs = _unique(os.path.normpath(d) for d in cni.bin_dirs)
        self.dirs = _unique((*conf_dirs, *bin_dirs))
        self._conf_dirs = frozenset(conf_dirs)
        self._bin_dirs = frozenset(bin_dirs)
        self._first_conf = conf_dirs[0] if conf_dirs else None
        self._records: dict[tuple[str, str], _Record] = {}
        self._due: dict[str, _Due] = {}
        self._initial = True
        self._active: tuple[str | None, str | None] = (None, None)
        self._dir_problem: dict[str, str] = {}

    # -- what a path is ----------------------------------------------------------
    def kinds(self, path: str) -> list[str]:
        d, name = os.path.split(path)
        kinds = []
        if d in self._conf_dirs and conf_ext(name):
            kinds.append(CONFIG)
        if d in self._bin_dirs:
            kinds.append(BINARY)
        return kinds

    def knows(self, path: str) -> bool:
        return any((k, path) in self._records for k in (CONFIG, BINARY))

    @property
    def files_known(self) -> int:
        return len(self._records)

    # -- looking ----------------------------------------------------------------
    def examine(self, path: str, *, hold_fresh: bool = False, use_cache: bool = False) -> float | None:
        """Look at ``path`` and report what changed. With ``hold_fresh``, a file
        modified less than QUIET_S ago is not read: returns the seconds to wait."""
        held = [self._examine(k, path, hold_fresh, use_cache) for k in self.kinds(path)]
        return max((h for h in held if h is not None), default=None)

    def _examine(self, kind: str, path: str, hold_fresh: bool, use_cache: bool) -> float | None:
        rec = self._records.get((kind, path))
        seen = look(path)
        if seen is None:
            self._gone(kind, path)
            return None
        if use_cache and rec is not None and rec.key == seen.key:
            return None
        if hold_fresh:
            age_s = (time.time_ns() - seen.st.st_mtime_ns) / 1e9
            if 0 <= age_s < QUIET_S:  # a future mtime (clock skew) is not waited for
                return QUIET_S - age_s
        cap = self.cni.max_config_size if kind == CONFIG else self.cni.max_binary_size
        try:
            content = read(path, seen, cap=cap, keep=kind == CONFIG, tick=self.sink.heartbeat)
        except Vanished:
            self._gone(kind, path)
            return None
        data, dedupe = _report(kind, path, content, content.st or seen.st)
        d = os.path.dirname(path)
        self._records[(kind, path)] = _Record(
            dir=d, key=seen.key, dedupe=dedupe, sha256=content.sha256, is_link=seen.is_link,
            valid=bool(data.get("valid")), network=data.get("network"))
        if rec is None:
            self.sink.publish(_KIND[kind, "discovered" if self._initial else "created"], data)
        elif rec.dedupe != dedupe:
            if rec.sha256:
                data["previous_sha256"] = rec.sha256
            self.sink.publish(_KIND[kind, "modified"], data)
        else:
            return None
        if kind == CONFIG and d == self._first_conf:
            self._update_active()
        return None

    def _gone(self, kind: str, path: str) -> None:
        rec = self._records.pop((kind, path), None)
        if rec is None:
            return
        d, name = os.path.split(path)
        data: dict[str, Any] = {"path": shown(path), "dir": shown(d)}
        if kind == BINARY:
            data["name"] = shown(name)
        if rec.sha256:
            data["previous_sha256"] = rec.sha256
        if rec.network:
            data["network"] = rec.network
        self.sink.publish(_KIND[kind, "deleted"], data)
        if kind == CONFIG and d == self._first_conf:
            self._update_active()

    def scan_dir(self, d: str, *, hold_fresh: bool = True, use_cache: bool = False) -> None:
        """Examine every entry of ``d``, and what is known there but no longer listed."""
        try:
            names = os.listdir(d)
        except (FileNotFoundError, NotADirectoryError):
            self._problem(d, None)
            self.dir_gone(d)
            return
        except OSError as exc:  # known files stay as they were: nothing proves them gone
            self._problem(d, f"cannot list {shown(d)}: {_os_error(exc)}")
            return
        self._problem(d, None)
        present = set()
        for name in sorted(names, key=os.fsencode):  # byte order, as Go's sort.Strings
            path = os.path.join(d, name)
            if not self.kinds(path):
                continue
            present.add(path)
            self._examine_or_defer(path, hold_fresh=hold_fresh, use_cache=use_cache)
            self.sink.heartbeat()
            if self.sink.stopping:
                return
        for kind, path in [k for k, r in self._records.items() if r.dir == d and k[1] not in present]:
            self._gone(kind, path)

    def dir_gone(self, d: str) -> None:
        """``d`` is gone (or no longer the watched directory): its files are deleted."""
        for kind, path in sorted(k for k, r in self._records.items() if r.dir == d):
            self._gone(kind, path)

    def _problem(self, d: str, message: str | None) -> None:
        """Warn once per new problem with a directory, not at every look."""
        if message is None:
            self._dir_problem.pop(d, None)
        elif self._dir_problem.get(d) != message:
            self._dir_problem[d] = message
            self.sink.warn("dir_unreadable", message, path=shown(d))

    # -- the active config --------------------------------------------------------
    def active(self) -> tuple[str | None, str | None]:
        """(path, network) of the lexically first valid file of the first conf
        dir, as libcni and containerd pick it (byte order of basenames)."""
        first = self._first_conf
        candidates = sorted((os.fsencode(p), p, r.network) for (k, p), r in self._records.items()
                            if k == CONFIG and r.dir == first and r.valid)
        return (candidates[0][1], candidates[0][2]) if candidates else (None, None)

    def _update_active(self, *, initial: bool = False) -> None:
        if self._initial and not initial:
            return  # the initial one is published once the inventory is complete
        (path, network), previous = self.active(), self._active[0]
        self._active = (path, network)
        if not initial and path == previous:
            return  # same file: its content changes are ``modified`` events
        data: dict[str, Any] = {"path": None if path is None else shown(path),
                                "previous": None if previous is None else shown(previous),
                                "initial": initial}
        if network is not None:
            data["network"] = network
        self.sink.publish(ConfigKind.CONFIG_ACTIVE_CHANGED, data)

    # -- deferred looks -----------------------------------------------------------
    def schedule(self, path: str, delay_s: float, *, hold: bool = False, push: bool = False,
                 use_cache: bool = False) -> None:
        """Examine ``path`` after ``delay_s``. An earlier request wins, unless
        ``push`` (more writes seen: the quiet period starts again). A path
        deferred for MAX_HOLD_S is examined anyway."""
        now = time.monotonic()
        due = self._due.get(path)
        if due is None:
            self._due[path] = _Due(now + delay_s, hold, now, use_cache)
            return
        due.at = min(now + delay_s, due.first + MAX_HOLD_S) if push else min(due.at, now + delay_s)
        due.hold = due.hold and hold  # anyone who knows the content is complete wins
        due.use_cache = due.use_cache and use_cache

    def schedule_links(self, d: str, delay_s: float) -> None:
        """Symlinks in ``d`` may now resolve elsewhere (ConfigMap-style ``..data``
        swaps): look at them again, reading only those whose target changed."""
        for (_, path), rec in list(self._records.items()):
            if rec.dir == d and rec.is_link:
                self.schedule(path, delay_s, use_cache=True)

    def pending(self, path: str) -> bool:
        return path in self._due

    def next_due(self) -> float | None:
        return min((d.at for d in self._due.values()), default=None)

    def run_due(self, *, force: bool = False) -> None:
        """Examine what is due (everything with ``force``), earliest first."""
        now = time.monotonic()
        for path in sorted((p for p, d in self._due.items() if force or d.at <= now),
                           key=lambda p: self._due[p].at):
            due = self._due.pop(path)
            hold = due.hold and not force and now - due.first < MAX_HOLD_S
            held = self.examine(path, hold_fresh=hold, use_cache=due.use_cache)
            if held is not None:
                self._due[path] = _Due(now + held, True, due.first, due.use_cache)
            self.sink.heartbeat()
            if self.sink.stopping:
                return

    def _examine_or_defer(self, path: str, *, hold_fresh: bool, use_cache: bool) -> None:
        held = self.examine(path, hold_fresh=hold_fresh, use_cache=use_cache)
        if held is not None:
            self.schedule(path, held, hold=True)

    # -- start -----------------------------------------------------------------
    def initial_scan(self, wait: Callable[[float], bool]) -> bool:
        """Report what is there (``discovered``), then the active config
        (``initial``). Files still being written are waited for, briefly.
        ``wait`` is the worker's interruptible sleep; False if asked to stop."""
        for d in self.dirs:
            self.scan_dir(d, hold_fresh=True)
            if self.sink.stopping:
                return False
        deadline = time.monotonic() + QUIET_S + SETTLE_S
        while self._due:
            next_at = self.next_due() or deadline
            if time.monotonic() >= deadline:
                self.run_due(force=True)
                break
            if wait(max(0.0, min(next_at, deadline) - time.monotonic())):
                return False
            self.run_due()
        self._initial = False
        self._update_active(initial=True)
        return not self.sink.stopping
