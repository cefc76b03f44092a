"""Hostile tar inputs the old tarfile r| path refused, which TarStream (the fast reader) must
refuse too: negative sizes, offsets that go backwards, sparse maps longer than the member."""

from __future__ import annotations

import io
import tarfile

import pytest
from ociimage.errors import CorruptLayer, LimitExceeded
from ociimage.flatten import FlattenLimits, flatten


def _fix(b):
    b[148:156] = b" " * 8
    b[148:155] = b"%06o\0" % sum(b)
    return bytes(b)


def _hdr(name, size_field, typ=b"0"):
    ti = tarfile.TarInfo(name); ti.type = typ
    b = bytearray(ti.tobuf(tarfile.USTAR_FORMAT)); b[124:136] = size_field
    return _fix(b)


def _reg(name, data):
    ti = tarfile.TarInfo(name); ti.size = len(data)
    return ti.tobuf(tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512)


def _run(*layers, limits=None):
    return flatten([io.BytesIO(l) for l in layers], io.BytesIO(), limits=limits)


@pytest.mark.parametrize("field", [b"-0001000\0\0\0\0",                       # octal with a sign
                                   b"\xff" + ((-(1 << 40)) % 256 ** 11).to_bytes(11, "big")])
def test_negative_member_size_is_corrupt(field):
    layer = _reg("a", b"1") + _hdr("neg", field) + b"\0" * 1024
    with pytest.raises(CorruptLayer):
        _run(layer)


def test_negative_size_cannot_reset_the_content_limit():
    top = _reg("x", b"1") + _hdr("neg", b"\xff" + ((-(1 << 40)) % 256 ** 11).to_bytes(11, "big")) \
        + b"\0" * 1024
    low = _reg("big", b"B" * (2 << 20)) + b"\0" * 1024
    with pytest.raises(CorruptLayer):  # refused before it can lower the count
        _run(top, low, limits=FlattenLimits(max_bytes=1 << 20))


def test_negative_pax_header_size_is_corrupt_not_valueerror():
    layer = _hdr("././@PaxHeader", b"-0001000\0\0\0\0", typ=b"x") + _reg("y", b"2") + b"\0" * 1024
    with pytest.raises(CorruptLayer):
        _run(layer)


def test_sparse_map_reading_past_the_member_is_corrupt():
    ti = tarfile.TarInfo("s"); ti.type = tarfile.GNUTYPE_SPARSE; ti.size = 0
    b = bytearray(ti.tobuf(tarfile.GNU_FORMAT))
    for k in range(4):   # 4 x 256 bytes "stored", the header says 0
        b[386 + 24 * k:398 + 24 * k] = b"%011o\0" % (256 * k)
        b[398 + 24 * k:410 + 24 * k] = b"%011o\0" % 256
    b[482] = 0; b[483:495] = b"%011o\0" % 1024
    layer = _fix(b) + _reg("hidden", b"H" * 10) + _reg("after", b"A") + b"\0" * 1024
    with pytest.raises(CorruptLayer):
        _run(layer)
