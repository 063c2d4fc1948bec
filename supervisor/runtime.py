"""The runtime dir (``runtime_dir``): the lock, the private bus and the sockets.

Whoever can write to it can plant a symlink where a root supervisor will
create, write or chmod a file, or take the lock. So it is created here with a
safe mode, one that another user owns or can write is refused, and nothing in
it is ever followed if it is a symlink (``O_NOFOLLOW``, and ``O_PATH`` handles
for changing a socket's mode and owner).
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
import stat

#: Mode of a runtime dir we create: everyone may traverse it (subscribers and the
#: workers' user reach their sockets; each socket's own mode decides), nobody else writes.
DIR_MODE = 0o755
#: The lock is ours alone: a lock that others can open is a lock others can hold.
LOCK_MODE = 0o600
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Refused(Exception):
    """The runtime dir (or something in it) is not safe to use: a configuration error."""


class Held(Exception):
    """Another supervisor holds the lock."""


def _owner(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _check(st: os.stat_result, path: str, what: str) -> None:
    if st.st_uid != os.geteuid():
        raise Refused(f"{what} {path} is owned by {_owner(st.st_uid)}, not by us ({_owner(os.geteuid())}); "
                      "refusing to use it")
    if st.st_mode & 0o022:
        raise Refused(f"{what} {path} (owner {_owner(st.st_uid)}) is writable by others "
                      f"(mode {stat.S_IMODE(st.st_mode):04o}); refusing to use it")


def open_dir(path: str, *, mode: int = DIR_MODE, dir_fd: int | None = None, what: str = "runtime_dir",
             shown: str | None = None) -> int:
    """An fd of directory ``path`` (relative to ``dir_fd`` if given, then named
    ``shown`` in errors): created with ``mode`` if missing; refused if it is a
    symlink, not ours or writable by others."""
    created = False
    name = shown or path
    try:
        os.mkdir(path, mode, dir_fd=dir_fd)
        created = True
    except FileExistsError:
        pass
    except OSError as exc:
        raise Refused(f"cannot create {what} {name}: {exc.strerror}") from None
    try:
        fd = os.open(path, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        why = exc.strerror
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            why = "a symlink" if stat.S_ISLNK(os.lstat(path, dir_fd=dir_fd).st_mode) else "not a directory"
        raise Refused(f"{what} {name} is {why}; refusing to use it") from None
    try:
        if created:
            os.fchmod(fd, mode)  # mkdir's mode went through the umask
        _check(os.fstat(fd), name, what)
    except BaseException:
        os.close(fd)
        raise
    return fd


def ensure(path: str) -> int:
    """The runtime dir's fd (its parents are created as usual if missing)."""
    parent = os.path.dirname(path.rstrip("/")) or "/"
    try:
        os.makedirs(parent, mode=DIR_MODE, exist_ok=True)
    except OSError as exc:
        raise Refused(f"cannot create {parent}: {exc.strerror}") from None
    return open_dir(path)


def lock(dir_fd: int, name: str, shown: str) -> int:
    """Take the lock file ``name`` in the runtime dir and write our pid into it."""
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, LOCK_MODE, dir_fd=dir_fd)
    except OSError as exc:
        why = "is a symlink" if exc.errno == errno.ELOOP else f"cannot be opened: {exc.strerror}"
        raise Refused(f"lock file {shown} {why}; refusing to use it") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(f"lock file {shown} is not a regular file; refusing to use it")
        _check(st, shown, "lock file")
        os.fchmod(fd, LOCK_MODE)  # a lock left by an older version was 0644
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise Held(f"another cnisup instance (pid {holder}) holds {shown}; refusing to start a second one") \
                from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def secure_socket(path: str, mode: int, uid: int = -1, gid: int = -1) -> None:
    """Set the mode (and owner) of the ipc socket we just bound at ``path``,
    never following a symlink someone put in its place."""
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise Refused(f"socket {path}: {exc.strerror}") from None
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise Refused(f"{path} is not the socket we bound; refusing to change it")
        # chmod has no O_PATH variant; the fd's /proc link names exactly this inode.
        os.chmod(f"/proc/self/fd/{fd}", mode)
        if uid != -1 or gid != -1:
            os.chown(f"/proc/self/fd/{fd}", uid, gid)
    finally:
        os.close(fd)
