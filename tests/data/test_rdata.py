"""The pure-Python R reader on hand-built XDR streams (the Debian DB is not needed)."""

from __future__ import annotations

import gzip
import struct
import zlib

from moa_search.data.rdata import read_lazyload_db, read_rds, unserialize


def _i(*v: int) -> bytes:
    return struct.pack(f">{len(v)}i", *v)


def _chars(s: str) -> bytes:
    raw = s.encode()
    return _i(9 | (1 << 15), len(raw)) + raw  # CHARSXP, UTF-8 flag


def _strsxp(*items: str | None) -> bytes:
    out = _i(16, len(items))
    for s in items:
        out += _i(9, -1) if s is None else _chars(s)
    return out


def _header() -> bytes:
    return b"X\n" + _i(3, 0x040201, 0x030500, 5) + b"UTF-8"


def _named_list(names: list[str], values: list[bytes]) -> bytes:
    body = _i(19 | (1 << 9), len(values)) + b"".join(values)
    attrs = _i(2 | (1 << 10)) + _i(1) + _chars("names") + _strsxp(*names) + _i(254)
    return body + attrs


def test_character_vector_with_na():
    assert unserialize(_header() + _strsxp("a", None, "é")).value == ["a", None, "é"]


def test_lazyload_db_roundtrip(tmp_path):
    blob = _header() + _strsxp("line one", "", "line three")
    chunk = struct.pack(">I", len(blob)) + zlib.compress(blob)
    (tmp_path / "db.rdb").write_bytes(chunk)
    offsets = _i(14, 2) + struct.pack(">2d", 0.0, float(len(chunk)))  # REALSXP c(0, len)
    index = _header() + _named_list(["variables"], [_named_list(["book"], [offsets])])
    (tmp_path / "db.rdx").write_bytes(gzip.compress(index))
    assert read_lazyload_db(tmp_path / "db") == {"book": ["line one", "", "line three"]}
    assert read_rds(gzip.compress(_header() + _strsxp("x"))).value == ["x"]
