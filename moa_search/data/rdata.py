"""Minimal pure-Python reader for R's XDR serialisation and lazy-load databases.

Why: the Austen corpus ships in Debian's ``r-cran-janeaustenr`` as an R lazy-load
database (``.rdx`` index + ``.rdb`` blobs). Decoding it here keeps the corpus
rebuildable from the Debian package without installing R. Only the parts of the
format that plain data objects use are supported (vectors, pairlists, symbols,
attributes, references, environments); closures/bytecode raise ``ValueError``.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP, STRSXP, DOTSXP = 9, 10, 13, 14, 15, 16, 17
VECSXP, EXPRSXP, RAWSXP, S4SXP = 19, 20, 24, 25
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP = 255, 254, 253, 252
MISSINGARG_SXP, BASENAMESPACE_SXP, NAMESPACESXP, PACKAGESXP = 251, 250, 249, 248
PERSISTSXP, EMPTYENV_SXP, BASEENV_SXP, ATTRLANGSXP, ATTRLISTSXP, ALTREP_SXP = (
    247,
    242,
    241,
    240,
    239,
    238,
)
NA_INTEGER = -(2**31)
_PAIRLIKE = {LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP, ATTRLANGSXP, ATTRLISTSXP}


@dataclass
class RObject:
    """An R value with its SEXP type and attributes (``names``, ``class`` ...)."""

    type: int
    value: Any
    attributes: dict[str, Any] = field(default_factory=dict)


class _XdrReader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated R serialisation stream")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def header(self) -> None:
        if self.take(2) != b"X\n":
            raise ValueError("only XDR ('X') R serialisation is supported")
        version = self.int()
        self.int()  # writer R version
        self.int()  # minimal reader R version
        if version == 3:
            self.take(self.int())  # native encoding name
        elif version != 2:
            raise ValueError(f"unsupported R serialisation version {version}")

    def item(self) -> Any:
        flags = self.int()
        kind = flags & 0xFF
        levels = flags >> 12
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))

        if kind == NILVALUE_SXP:
            return None
        if kind in (EMPTYENV_SXP, BASEENV_SXP, GLOBALENV_SXP, BASENAMESPACE_SXP):
            return RObject(ENVSXP, {"special": kind})
        if kind in (UNBOUNDVALUE_SXP, MISSINGARG_SXP):
            return None
        if kind == REFSXP:
            idx = flags >> 8
            return self.refs[(idx or self.int()) - 1]
        if kind in (PERSISTSXP, NAMESPACESXP, PACKAGESXP):
            names = self._persistent_names()
            obj = RObject(ENVSXP, {"namespace": names})
            self.refs.append(obj)
            return obj
        if kind == SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == ENVSXP:
            obj = RObject(ENVSXP, {})
            self.refs.append(obj)
            self.int()  # locked
            enclos, frame, hashtab, attrib = self.item(), self.item(), self.item(), self.item()
            obj.value = {"enclos": enclos, "frame": frame, "hashtab": hashtab}
            obj.attributes = _pairlist_dict(attrib)
            return obj
        if kind in _PAIRLIKE:
            return self._pairlist(kind, has_attr, has_tag)
        if kind == CHARSXP:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            raw = self.take(n)
            return raw.decode("latin-1" if levels & 4 else "utf-8", errors="replace")
        if kind == ALTREP_SXP:
            self.item()  # class info (pairlist of symbols)
            state = self.item()
            self.item()  # attributes
            return state
        value = self._vector(kind)
        attrs = _pairlist_dict(self.item()) if has_attr else {}
        if attrs or kind in (VECSXP, EXPRSXP, STRSXP):
            return RObject(kind, value, attrs)
        return value

    def _persistent_names(self) -> list[Any]:
        if self.int() != 0:
            raise ValueError("bad persistent-name block")
        return [self.item() for _ in range(self.int())]

    def _pairlist(self, kind: int, has_attr: bool, has_tag: bool) -> RObject:
        cells: list[tuple[Any, Any]] = []
        attrs: dict[str, Any] = {}
        while True:
            if has_attr:
                got = _pairlist_dict(self.item())
                attrs = attrs or got
            tag = self.item() if has_tag else None
            cells.append((tag, self.item()))
            flags = self.int()
            nxt = flags & 0xFF
            if nxt == NILVALUE_SXP:
                break
            if nxt not in _PAIRLIKE:  # improper tail: push back and read generically
                self.pos -= 4
                cells.append((None, self.item()))
                break
            has_attr = bool(flags & (1 << 9))
            has_tag = bool(flags & (1 << 10))
        return RObject(kind, cells, attrs)

    def _vector(self, kind: int) -> Any:
        n = self.length()
        if kind == STRSXP:
            return [self.item() for _ in range(n)]
        if kind in (VECSXP, EXPRSXP):
            return [self.item() for _ in range(n)]
        if kind in (LGLSXP, INTSXP):
            vals = struct.unpack(f">{n}i", self.take(4 * n))
            return [None if v == NA_INTEGER else v for v in vals]
        if kind == REALSXP:
            return list(struct.unpack(f">{n}d", self.take(8 * n)))
        if kind == CPLXSXP:
            v = struct.unpack(f">{2 * n}d", self.take(16 * n))
            return [complex(v[i], v[i + 1]) for i in range(0, 2 * n, 2)]
        if kind == RAWSXP:
            return self.take(n)
        raise ValueError(f"unsupported R SEXP type {kind}")


def _pairlist_dict(obj: Any) -> dict[str, Any]:
    """Turn a tagged pairlist (attributes, named lists) into a dict."""
    if not isinstance(obj, RObject) or obj.type not in _PAIRLIKE:
        return {}
    return {str(tag): val for tag, val in obj.value if tag is not None}


def unserialize(data: bytes) -> Any:
    """Decode one XDR-serialised R object (the payload of ``saveRDS``/lazy-load)."""
    reader = _XdrReader(data)
    reader.header()
    return reader.item()


def _decompress(blob: bytes) -> bytes:
    """Lazy-load blobs: 4-byte big-endian size, then zlib (or typed xz/bzip2/none)."""
    size = struct.unpack(">I", blob[:4])[0]
    tag = blob[4:5]
    if tag == b"Z":
        out = lzma.decompress(blob[5:])
    elif tag == b"2":
        out = bz2.decompress(blob[5:])
    elif tag == b"0":
        out = blob[5:]
    else:
        out = zlib.decompress(blob[4:])
    if len(out) != size:
        raise ValueError("lazy-load blob has the wrong decompressed size")
    return out


def to_python(obj: Any) -> Any:
    """Strip R wrappers: named lists become dicts, vectors become lists."""
    if isinstance(obj, RObject):
        if obj.type in (VECSXP, EXPRSXP):
            vals = [to_python(v) for v in obj.value]
            names = obj.attributes.get("names")
            names = to_python(names) if names is not None else None
            return dict(zip(names, vals, strict=True)) if names else vals
        if obj.type == STRSXP:
            return list(obj.value)
        if obj.type in _PAIRLIKE:
            return {str(t): to_python(v) for t, v in obj.value}
        return obj.value
    return obj


def read_rds(data: bytes) -> Any:
    """Decode an ``.rds`` file's bytes (gzip/xz/bzip2 wrapped or raw)."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    elif data[:6] == b"\xfd7zXZ\x00":
        data = lzma.decompress(data)
    elif data[:3] == b"BZh":
        data = bz2.decompress(data)
    elif data[:2] != b"X\n":
        data = _decompress(data)  # older R: .rdx is a lazy-load style blob
    return unserialize(data)


def read_lazyload_db(stem: str | Path) -> dict[str, Any]:
    """Read every object of an R lazy-load database ``stem.rdx``/``stem.rdb``."""
    stem = Path(stem)
    index = to_python(read_rds(stem.with_suffix(".rdx").read_bytes()))
    blob = stem.with_suffix(".rdb").read_bytes()
    out: dict[str, Any] = {}
    for name, (offset, length) in index["variables"].items():
        chunk = blob[int(offset) : int(offset) + int(length)]
        out[name] = to_python(unserialize(_decompress(chunk)))
    return out
