"""Kernel-confirmed link and address changes, one rtnetlink listener per
network namespace (the lean capture's replacement for syscall tracepoints on
the plugins' netlink requests).

A NETLINK_ROUTE socket belongs to the namespace it was created in, so each
listener is made inside its namespace: ``setns`` in, ``socket`` + ``bind`` to
RTNLGRP_LINK, RTNLGRP_IPV4_IFADDR and RTNLGRP_IPV6_IFADDR, ``setns`` back
(tens of microseconds, on the worker's one thread). Python 3.11 has no
``os.setns``: libc's, through ctypes. No pyroute2 here: its ``NetNS`` forks a
proxy process per namespace; a few dozen lines of parsing are enough.

Which namespaces: the worker's own (the host's), every pin file in
``/run/netns`` and ``/var/run/netns`` (inotify; a pin is an empty file until
its bind mount lands, which ``/proc/self/mountinfo`` announces with POLLPRI;
a pin dir that does not exist yet is awaited in its parent),
and whatever path a run's ``CNI_NETNS`` names (``watch``). A listener asks
for a dump of links and addresses when it opens, so one that opens after a
plugin's first change still learns the state. A socket pins its namespace,
so a listener is closed when its pin file goes or when ``close_path`` says
the runtime's DEL is over.

Every message is untrusted input: bounded, parsed defensively, and a
malformed one is skipped, never raised.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

NETNS_DIRS = ("/run/netns", "/var/run/netns")
CLONE_NEWNET = 0x40000000
NSFS_MAGIC = 0x6E736673
SO_NETNS_COOKIE = 71
RTNLGRP_LINK, RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV6_IFADDR = 1, 5, 9
GROUPS = (1 << (RTNLGRP_LINK - 1)) | (1 << (RTNLGRP_IPV4_IFADDR - 1)) | (1 << (RTNLGRP_IPV6_IFADDR - 1))
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 16, 17, 18, 20, 21, 22
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_DUMP = 0x1, 0x2, 0x300
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_MASTER, IFLA_LINKINFO = 1, 3, 4, 5, 10, 18
IFLA_LINK_NETNSID, IFLA_INFO_KIND = 37, 1
IFA_ADDRESS, IFA_LOCAL, IFA_LABEL = 1, 2, 3
IFF_UP, IFF_LOOPBACK = 0x1, 0x8
NLMSG_HDR = struct.Struct("=IHHII")
IFINFO = struct.Struct("=BxHiII")
IFADDR = struct.Struct("=BBBBi")
IN_CREATE, IN_DELETE, IN_MOVED_FROM, IN_MOVED_TO, IN_ONLYDIR = 0x100, 0x200, 0x40, 0x80, 0x01000000
INOTIFY_EVENT = struct.Struct("=iIII")
#: Bytes the kernel may queue per listener: a burst of changes fits.
RCVBUF = 1 << 20
#: A pin file not yet a namespace (its bind mount is on the way) is forgotten after this long.
PENDING_TTL_S = 10.0

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_long * 15)]


_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.POINTER(_Statfs)]
_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.POINTER(_Statfs)]


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def is_nsfs(fd: int) -> bool:
    st = _Statfs()
    return bool(_libc.fstatfs(fd, ctypes.byref(st)) == 0 and st.f_type == NSFS_MAGIC)


def path_is_nsfs(path: str) -> bool:
    st = _Statfs()
    return bool(_libc.statfs(os.fsencode(path), ctypes.byref(st)) == 0 and st.f_type == NSFS_MAGIC)


def netns_cookie(sock: socket.socket) -> int:
    """The namespace's cookie (never reused, unlike its inode number)."""
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


# -- parsing (untrusted bytes) ------------------------------------------------------

@dataclass
class Change:
    """One rtnetlink notification, as the kernel confirmed it."""

    kind: str  #: "link" or "addr"
    deleted: bool
    nl_pid: int  #: the requester's netlink port id (its tgid for its first socket); 0 from the kernel
    dump: bool  #: part of the state dump a new listener asked for
    data: dict[str, Any]
    link: int = 0  #: IFLA_LINK: the peer's ifindex (veth)
    link_netnsid: int | None = None  #: IFLA_LINK_NETNSID: the peer is in another namespace


def _attrs(buf: bytes, off: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while off + 4 <= len(buf):
        ln, typ = struct.unpack_from("=HH", buf, off)
        if ln < 4 or off + ln > len(buf):
            break
        out[typ & 0x3FFF] = buf[off + 4:off + ln]
        off += (ln + 3) & ~3
    return out


def _text(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def _u32(raw: bytes | None) -> int | None:
    return struct.unpack_from("=I", raw)[0] if raw is not None and len(raw) >= 4 else None


def _link(mtype: int, flags: int, pid: int, body: bytes) -> Change | None:
    if len(body) < IFINFO.size:
        return None
    family, _type, index, ifflags, _change = IFINFO.unpack_from(body)
    if family == socket.AF_BRIDGE:
        return None  # a bridge port's own notification; the link's comes as AF_UNSPEC
    a = _attrs(body, IFINFO.size)
    data: dict[str, Any] = {"ifindex": index}
    if (name := _text(a.get(IFLA_IFNAME))) is not None:
        data["name"] = name
    if IFLA_LINKINFO in a and (kind := _text(_attrs(a[IFLA_LINKINFO], 0).get(IFLA_INFO_KIND))):
        data["kind"] = kind
    if (master := _u32(a.get(IFLA_MASTER))) is not None:
        data["master"] = master
    if (mtu := _u32(a.get(IFLA_MTU))) is not None:
        data["mtu"] = mtu
    data["up"] = bool(ifflags & IFF_UP)
    if ifflags & IFF_LOOPBACK:
        data["loopback"] = True
    mac = a.get(IFLA_ADDRESS)
    if mac and len(mac) == 6:
        data["mac"] = ":".join(f"{b:02x}" for b in mac)
    nsid = _u32(a.get(IFLA_LINK_NETNSID))
    return Change("link", mtype == RTM_DELLINK, pid, bool(flags & NLM_F_MULTI), data,
                  link=_u32(a.get(IFLA_LINK)) or 0,
                  link_netnsid=None if nsid is None else struct.unpack("=i", struct.pack("=I", nsid))[0])


def _addr(mtype: int, flags: int, pid: int, body: bytes) -> Change | None:
    if len(body) < IFADDR.size:
        return None
    family, prefixlen, _flags, _scope, index = IFADDR.unpack_from(body)
    a = _attrs(body, IFADDR.size)
    raw = a.get(IFA_LOCAL) or a.get(IFA_ADDRESS)
    names = {socket.AF_INET: ("inet", 4), socket.AF_INET6: ("inet6", 16)}
    if family not in names or raw is None or len(raw) != names[family][1]:
        return None
    data: dict[str, Any] = {"address": socket.inet_ntop(family, raw), "prefixlen": prefixlen,
                            "family": names[family][0], "ifindex": index}
    if (label := _text(a.get(IFA_LABEL))) is not None:
        data["label"] = label
    return Change("addr", mtype == RTM_DELADDR, pid, bool(flags & NLM_F_MULTI), data)


def parse(buf: bytes) -> tuple[list[Change], list[int]]:
    """(link and address changes, seq of each dump that ended) in one datagram."""
    changes: list[Change] = []
    done: list[int] = []
    off = 0
    while off + NLMSG_HDR.size <= len(buf):
        ln, mtype, flags, seq, pid = NLMSG_HDR.unpack_from(buf, off)
        if ln < NLMSG_HDR.size or off + ln > len(buf):
            break
        body = buf[off + NLMSG_HDR.size:off + ln]
        if mtype in (NLMSG_DONE, NLMSG_ERROR):
            done.append(seq)
        else:
            parser = {RTM_NEWLINK: _link, RTM_DELLINK: _link, RTM_NEWADDR: _addr, RTM_DELADDR: _addr}.get(mtype)
            if parser is not None and (c := parser(mtype, flags, pid, body)) is not None:
                changes.append(c)
        off += (ln + 3) & ~3
    return changes, done


def _dump_request(mtype: int, seq: int) -> bytes:
    body = struct.pack("=BxHiII", 0, 0, 0, 0, 0) if mtype == RTM_GETLINK else struct.pack("=BBBBi", 0, 0, 0, 0, 0)
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), mtype, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


# -- listeners --------------------------------------------------------------------------

@dataclass
class Listener:
    inode: int
    cookie: int
    path: str | None  #: the pin file or CNI_NETNS it was opened for (None: the worker's own)
    sock: socket.socket
    opened_ns: int  #: CLOCK_BOOTTIME, comparable with the BPF timestamps
    drained_ns: int  #: everything the kernel queued before this was read
    dumping: int = 1  #: seq of the dump in progress (1 links, 2 addresses), 0 when done
    links: dict[int, dict[str, Any]] = field(default_factory=dict)  #: ifindex -> last known state

    @property
    def netns(self) -> str:
        return f"net:[{self.inode}]"


def boot_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


class NetnsWatcher:
    """Listeners, the pin-file watch, and one epoll of their fds for the worker's loop."""

    def __init__(self, epoll: select.epoll, *, dirs: tuple[str, ...] = NETNS_DIRS) -> None:
        self.epoll = epoll
        self.home_fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.by_fd: dict[int, Listener] = {}
        self.by_inode: dict[int, Listener] = {}
        self.pending: dict[str, float] = {}  #: pin file seen, bind mount not yet -> since (monotonic)
        self.counts = {"listeners_opened": 0, "listeners_closed": 0, "listener_errors": 0, "netlink_overruns": 0,
                       "netlink_messages": 0}
        self.opened: list[Listener] = []  #: opened since the last ``take_opened``
        self.home = self._open(self.home_fd, None)
        self.ino_fd = self._inotify(dirs)
        self.mi_fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        # mountinfo is always readable; POLLPRI|POLLERR alone say "the mount table changed".
        epoll.register(self.mi_fd, select.EPOLLPRI | select.EPOLLERR)
        epoll.register(self.ino_fd, select.EPOLLIN)
        for d in self.watched_dirs:
            for name in sorted(os.listdir(d)):
                self.watch(os.path.join(d, name))

    def _inotify(self, dirs: tuple[str, ...]) -> int:
        fd: int = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.wd: dict[int, str] = {}  #: a pin dir's watch -> its path
        self.parents: dict[int, tuple[str, set[str]]] = {}  #: a parent's watch -> (path, pin dirs awaited in it)
        for d in dirs:
            real = os.path.realpath(d)
            if os.path.isdir(real):
                self._watch_dir(fd, real)
                continue
            # Made by the first `ip netns add`; we do not make it (/run may be read-only to us).
            parent, name = os.path.split(real)
            wd = _libc.inotify_add_watch(fd, parent.encode(), IN_CREATE | IN_MOVED_TO | IN_ONLYDIR)
            if wd >= 0:
                self.parents.setdefault(wd, (parent, set()))[1].add(name)
        return fd

    def _watch_dir(self, fd: int, real: str) -> bool:
        if real in self.wd.values():
            return False  # /var/run -> /run
        wd = _libc.inotify_add_watch(fd, real.encode(), IN_CREATE | IN_DELETE | IN_MOVED_TO | IN_MOVED_FROM
                                     | IN_ONLYDIR)
        if wd < 0:
            return False
        self.wd[wd] = real
        return True

    @property
    def watched_dirs(self) -> list[str]:
        return list(self.wd.values())

    def _open(self, ns_fd: int, path: str | None) -> Listener | None:
        inode = os.fstat(ns_fd).st_ino
        if inode in self.by_inode:
            return self.by_inode[inode]
        try:
            _setns(ns_fd)
            try:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                     socket.NETLINK_ROUTE)
            finally:
                _setns(self.home_fd)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
                sock.bind((0, GROUPS))
                cookie = netns_cookie(sock)
                sock.send(_dump_request(RTM_GETLINK, 1))
            except OSError:
                sock.close()
                raise
        except OSError:
            self.counts["listener_errors"] += 1
            return None
        now = boot_ns()
        lst = Listener(inode, cookie, path, sock, now, now)
        self.by_fd[sock.fileno()] = lst
        self.by_inode[inode] = lst
        self.epoll.register(sock.fileno(), select.EPOLLIN)
        self.counts["listeners_opened"] += 1
        self.opened.append(lst)
        return lst

    def watch(self, path: str) -> Listener | None:
        """A listener for the namespace bound at ``path`` (a pin file, a
        CNI_NETNS); None while it is not (yet) a namespace."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            self.pending.pop(path, None)
            return None
        try:
            if not is_nsfs(fd):
                self.pending.setdefault(path, time.monotonic())
                return None
            self.pending.pop(path, None)
            return self._open(fd, path)
        finally:
            os.close(fd)

    def take_opened(self) -> list[Listener]:
        out, self.opened = self.opened, []
        return out

    def close(self, lst: Listener) -> None:
        if lst is self.home or self.by_inode.get(lst.inode) is not lst:
            return
        del self.by_inode[lst.inode]
        self.by_fd.pop(lst.sock.fileno(), None)
        self.epoll.unregister(lst.sock.fileno())
        lst.sock.close()
        self.counts["listeners_closed"] += 1

    def close_inode(self, inode: int) -> None:
        if (lst := self.by_inode.get(inode)) is not None:
            self.close(lst)

    def close_path(self, path: str) -> None:
        for lst in [x for x in self.by_inode.values() if x.path == path]:
            self.close(lst)

    def pending_deadline(self) -> float | None:
        """When pending pin files are looked at again without a mount-table wake-up."""
        return min(self.pending.values()) + PENDING_TTL_S if self.pending else None

    def expire_pending(self) -> None:
        now = time.monotonic()
        for path, since in list(self.pending.items()):
            if now - since >= PENDING_TTL_S:
                del self.pending[path]

    # -- readiness -----------------------------------------------------------------
    def on_ready(self, fd: int) -> bool:
        """Handle the pin-dir and mount-table fds; False if ``fd`` is not one."""
        if fd == self.ino_fd:
            self._read_inotify()
            return True
        if fd == self.mi_fd:
            os.lseek(self.mi_fd, 0, os.SEEK_SET)
            while os.read(self.mi_fd, 1 << 16):  # read to the end: re-arms POLLPRI
                pass
            for path in list(self.pending):
                self.watch(path)
            # A namespace bound elsewhere than the pin dirs (a runtime's own
            # dir): unmounted means done with; the socket must not keep it alive.
            for lst in list(self.by_inode.values()):
                if lst.path and os.path.dirname(lst.path) not in NETNS_DIRS and lst.path.startswith("/") \
                        and not lst.path.startswith("/proc/") and not path_is_nsfs(lst.path):
                    self.close(lst)
            return True
        return False

    def _read_inotify(self) -> None:
        try:
            buf = os.read(self.ino_fd, 1 << 16)
        except BlockingIOError:
            return
        off = 0
        while off + INOTIFY_EVENT.size <= len(buf):
            wd, mask, _cookie, ln = INOTIFY_EVENT.unpack_from(buf, off)
            name = buf[off + INOTIFY_EVENT.size:off + INOTIFY_EVENT.size + ln].split(b"\0", 1)[0]
            off += INOTIFY_EVENT.size + ln
            if not name:
                continue
            if wd in self.parents and os.fsdecode(name) in self.parents[wd][1]:
                real = os.path.join(self.parents[wd][0], os.fsdecode(name))
                if self._watch_dir(self.ino_fd, real):  # the pin dir appeared: watch it, and what is in it
                    for entry in sorted(os.listdir(real)):
                        self.watch(os.path.join(real, entry))
                continue
            if wd not in self.wd:
                continue
            path = os.path.join(self.wd[wd], os.fsdecode(name))
            if mask & (IN_CREATE | IN_MOVED_TO):
                self.watch(path)
            elif mask & (IN_DELETE | IN_MOVED_FROM):
                self.pending.pop(path, None)
                self.close_path(path)
                self.close_path(path.replace("/run/", "/var/run/", 1))

    def drain(self) -> Iterator[tuple[Listener, int, Change]]:
        """Every message queued on every listener, now (not only the ready
        ones: a veth's two halves are announced in two namespaces), with the
        boot time since which it was queued (the listener's previous drain)."""
        for lst in list(self.by_fd.values()):
            yield from self._drain(lst)

    def _drain(self, lst: Listener) -> Iterator[tuple[Listener, int, Change]]:
        since = lst.drained_ns
        while True:
            now = boot_ns()
            try:
                buf = lst.sock.recv(1 << 16)
            except BlockingIOError:
                lst.drained_ns = now
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # the kernel dropped notifications: a dump resyncs
                    self.counts["netlink_overruns"] += 1
                    if not lst.dumping:
                        lst.dumping = 1
                        lst.sock.send(_dump_request(RTM_GETLINK, 1))
                    continue
                lst.drained_ns = now
                return
            changes, done = parse(buf)
            self.counts["netlink_messages"] += len(changes)
            for c in changes:
                yield lst, since, c
            for seq in done:
                if seq == 1 and lst.dumping == 1:
                    lst.dumping = 2
                    lst.sock.send(_dump_request(RTM_GETADDR, 2))  # one dump at a time per socket
                elif seq == 2 and lst.dumping == 2:
                    lst.dumping = 0

    def close_all(self) -> None:
        for lst in list(self.by_inode.values()):
            self.epoll.unregister(lst.sock.fileno())
            lst.sock.close()
        self.by_inode.clear()
        self.by_fd.clear()
        for fd in (self.ino_fd, self.mi_fd):
            self.epoll.unregister(fd)
            os.close(fd)
        os.close(self.home_fd)
