"""Struct member offsets of the running kernel, from its BTF
(``/sys/kernel/btf/vmlinux``), for the lean BPF program.

Why BTF and not the headers: BCC compiles against the installed kernel
headers, which may belong to another kernel (on our CI hosts: 6.1 headers,
a 6.18 kernel; ``task_struct.exit_code`` is at 2312 in one and 1164 in the
other). A read at a header offset silently returns another field. So the
program never dereferences a kernel struct type: the worker resolves every
offset it needs here at start and passes them as ``-DOFF_*`` constants, and
the C side reads ``base + OFF_*`` with ``bpf_probe_read_kernel``. BCC 0.26
has no CO-RE relocation for its own programs, so this is the way it supports.

A small reader, standard library only: the file header, each type's
12-byte header and kind-specific tail (include/uapi/linux/btf.h), member
lookup through anonymous struct/union members (``mm_struct.env_start``
lives in an unnamed struct) and both bitfield encodings. Parsing takes
~0.1 s; no type is decoded until asked for.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass

BTF_PATH = "/sys/kernel/btf/vmlinux"
MAGIC = 0xEB9F

INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
_MODIFIERS = (TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG)
_NO_TAIL = (PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG)

#: What the lean program reads: cflag -> member path. A step after the first
#: names an embedded struct (``net.ns.inum``); a pointer is a separate read.
OFFSETS = {
    "OFF_TASK_MM": "task_struct.mm",
    "OFF_TASK_EXIT_CODE": "task_struct.exit_code",
    "OFF_TASK_TGID": "task_struct.tgid",
    "OFF_TASK_PID": "task_struct.pid",
    "OFF_TASK_REAL_PARENT": "task_struct.real_parent",
    "OFF_TASK_GROUP_LEADER": "task_struct.group_leader",
    "OFF_TASK_NSPROXY": "task_struct.nsproxy",
    "OFF_TASK_FILES": "task_struct.files",
    "OFF_TASK_CHILDREN": "task_struct.children",
    "OFF_TASK_SIBLING": "task_struct.sibling",
    "OFF_MM_ENV_START": "mm_struct.env_start",
    "OFF_MM_ENV_END": "mm_struct.env_end",
    "OFF_NSPROXY_NET_NS": "nsproxy.net_ns",
    "OFF_NET_NS_INUM": "net.ns.inum",
    "OFF_NET_COOKIE": "net.net_cookie",
    "OFF_FILES_FDT": "files_struct.fdt",
    "OFF_FDT_MAX_FDS": "fdtable.max_fds",
    "OFF_FDT_FD": "fdtable.fd",
}


class BTFError(Exception):
    """The BTF cannot be read, or lacks a member the program needs."""


@dataclass(frozen=True)
class Member:
    name: str
    type_id: int
    bit_offset: int  #: from the start of the containing struct
    bitfield_size: int  #: 0: not a bitfield


class BTF:
    def __init__(self, data: bytes) -> None:
        if len(data) < 24:
            raise BTFError("file too short")
        magic, version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != MAGIC:
            raise BTFError(f"bad magic {magic:#x} (big-endian BTF is not supported)")
        if version != 1:
            raise BTFError(f"unknown BTF version {version}")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._data = data
        self._strings = data[hdr_len + str_off:hdr_len + str_off + str_len]
        # Per type id, where its header is: 4 bytes a type instead of an object.
        self._pos = array("I", [0])
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        while pos < end:
            self._pos.append(pos)
            info = struct.unpack_from("<I", data, pos + 4)[0]
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            pos += 12
            if kind in (INT, VAR, DECL_TAG):
                pos += 4
            elif kind == ARRAY:
                pos += 12
            elif kind in (STRUCT, UNION, DATASEC, ENUM64):
                pos += 12 * vlen
            elif kind in (ENUM, FUNC_PROTO):
                pos += 8 * vlen
            elif kind not in _NO_TAIL:
                raise BTFError(f"unknown BTF kind {kind} at type id {len(self._pos) - 1}")
        self._structs: dict[str, list[int]] | None = None

    @classmethod
    def load(cls, path: str = BTF_PATH) -> BTF:
        try:
            with open(path, "rb") as f:
                return cls(f.read())
        except OSError as exc:
            raise BTFError(f"cannot read {path}: {exc.strerror}") from exc

    def _header(self, tid: int) -> tuple[int, int, int, int, int, int]:
        """(kind, name_off, vlen, kind_flag, size_or_type, tail position)."""
        p = self._pos[tid]
        name_off, info, size_or_type = struct.unpack_from("<III", self._data, p)
        return (info >> 24) & 0x1F, name_off, info & 0xFFFF, info >> 31, size_or_type, p + 12

    def _str(self, off: int) -> str:
        return self._strings[off:self._strings.index(b"\0", off)].decode()

    def _strip(self, tid: int) -> int:
        while tid and self._header(tid)[0] in _MODIFIERS:
            tid = self._header(tid)[4]
        return tid

    def _struct_ids(self, name: str) -> list[int]:
        if self._structs is None:
            idx: dict[str, list[int]] = {}
            for tid in range(1, len(self._pos)):
                kind, name_off, vlen, _, size, _ = self._header(tid)
                if name_off and kind in (STRUCT, UNION) and (vlen or size):
                    idx.setdefault(self._str(name_off), []).append(tid)
            self._structs = idx
        return self._structs.get(name, [])

    def members(self, tid: int) -> list[Member]:
        kind, _, vlen, kflag, _, pos = self._header(self._strip(tid))
        if kind not in (STRUCT, UNION):
            raise BTFError(f"type {tid} is not a struct or union")
        out = []
        for i in range(vlen):
            name_off, mtype, off = struct.unpack_from("<III", self._data, pos + 12 * i)
            if kflag:  # bitfield_size << 24 | bit offset
                out.append(Member(self._str(name_off), mtype, off & 0xFFFFFF, off >> 24))
                continue
            bits, m = 0, self._strip(mtype)
            mkind, _, _, _, msize, mpos = self._header(m) if m else (0, 0, 0, 0, 0, 0)
            if mkind == INT:  # the older encoding: bitfields in the INT type
                enc = struct.unpack_from("<I", self._data, mpos)[0]
                if enc & 0xFF != msize * 8:
                    bits, off = enc & 0xFF, off + ((enc >> 16) & 0xFF)
            out.append(Member(self._str(name_off), mtype, off, bits))
        return out

    def _lookup(self, tid: int, name: str) -> tuple[int, Member] | None:
        """(bit offset, member): anonymous struct/union members are searched
        depth-first, as C resolves them."""
        for m in self.members(tid):
            if m.name == name:
                return m.bit_offset, m
            if not m.name and self._header(self._strip(m.type_id))[0] in (STRUCT, UNION):
                found = self._lookup(m.type_id, name)
                if found is not None:
                    return m.bit_offset + found[0], found[1]
        return None

    def offset(self, path: str) -> int:
        """Byte offset of ``struct.member[.member…]`` from the struct's start."""
        first, *names = path.split(".")
        ids = self._struct_ids(first)
        if not ids:
            raise BTFError(f"BTF has no struct {first}")
        if len({self._header(t)[4] for t in ids}) > 1:
            raise BTFError(f"BTF has {len(ids)} different structs named {first}")
        tid, bits = ids[0], 0
        member: Member | None = None
        for i, name in enumerate(names):
            if member is not None:
                tid = self._strip(member.type_id)
                if self._header(tid)[0] not in (STRUCT, UNION):
                    raise BTFError(f"{'.'.join([first, *names[:i]])} is not an embedded struct")
            found = self._lookup(tid, name)
            if found is None:
                raise BTFError(f"BTF lacks {'.'.join([first, *names[:i + 1]])}")
            off, member = found
            bits += off
        if member is None:
            raise BTFError(f"{path}: no member named")
        if member.bitfield_size or bits % 8:
            raise BTFError(f"{path} is a bitfield")
        return bits // 8


def offsets(btf: BTF | None = None) -> dict[str, int]:
    """Every ``OFFSETS`` entry resolved; ``BTFError`` names the first one missing."""
    btf = btf or BTF.load()
    return {flag: btf.offset(path) for flag, path in OFFSETS.items()}
