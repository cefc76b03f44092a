import gzip
import io
import os

import pytest
import zstandard

from ocibuild import Entry, compress, layer_tar
from ociimage.errors import CorruptLayer, LimitExceeded, UnsupportedMediaType
from ociimage.layers import LAYER_MEDIA_TYPES, open_layer

OCI = "application/vnd.oci.image.layer.v1.tar"
PAYLOAD = os.urandom(300_000) + b"z" * 3_000_000


class Raw(io.BytesIO):
    """A blob stream that remembers whether it was read to EOF."""

    def __init__(self, data):
        super().__init__(data)
        self.hit_eof = False

    def read(self, n=-1):
        data = super().read(n)
        if not data:
            self.hit_eof = True
        return data


def read_all(reader, size=70_000):
    out = []
    while True:
        chunk = reader.read(size)
        if not chunk:
            return b"".join(out)
        out.append(chunk)


@pytest.mark.parametrize("media_type", sorted(LAYER_MEDIA_TYPES))
def test_every_media_type_round_trips(media_type):
    tar = layer_tar([Entry("a", data=PAYLOAD)])
    blob = compress(tar, media_type)
    raw = Raw(blob)
    r = open_layer(raw, media_type + ("; foo=bar" if "gzip" in media_type else ""))
    assert read_all(r) == tar
    r.drain()
    assert raw.hit_eof and raw.tell() == len(blob)
    assert r.bytes_in == len(blob) and r.bytes_out == len(tar)


def test_unsupported_media_type():
    for mt in ("application/vnd.oci.image.layer.v1.tar+bzip2", "application/json",
               "application/vnd.sylabs.image.layer.v1.squashfs", ""):
        with pytest.raises(UnsupportedMediaType):
            open_layer(io.BytesIO(b""), mt)


def test_drain_reads_past_the_tar_end():
    tar = layer_tar([Entry("a", data=b"x")]) + b"\0" * 50_000
    blob = gzip.compress(tar) + b"\0" * 100  # zero padding after the member is tolerated
    raw = Raw(blob)
    r = open_layer(raw, OCI + "+gzip")
    r.read(1024)
    assert not raw.hit_eof
    assert r.drain() == len(tar) - 1024
    assert raw.hit_eof


def test_multi_member_gzip_and_multi_frame_zstd():
    a, b = PAYLOAD[:1000], PAYLOAD[1000:]
    assert read_all(open_layer(io.BytesIO(gzip.compress(a) + gzip.compress(b)),
                               OCI + "+gzip")) == PAYLOAD
    z = zstandard.ZstdCompressor(write_checksum=True).compress(a) + \
        zstandard.ZstdCompressor(write_content_size=False).compress(b)
    assert read_all(open_layer(io.BytesIO(z), OCI + "+zstd")) == PAYLOAD


@pytest.mark.parametrize("blob", [
    gzip.compress(PAYLOAD)[:-6],                    # truncated trailer
    gzip.compress(PAYLOAD)[:5000],                  # truncated body
    b"",                                            # nothing at all
    gzip.compress(PAYLOAD) + b"garbage",            # trailing garbage
    (lambda g: g[:200] + bytes(b ^ 0xFF for b in g[200:300]) + g[300:])(gzip.compress(PAYLOAD)),
    b"this is not gzip",
], ids=["trailer", "body", "empty", "garbage", "flipped", "notgzip"])
def test_corrupt_gzip(blob):
    with pytest.raises(CorruptLayer):
        r = open_layer(io.BytesIO(blob), OCI + "+gzip")
        read_all(r)
        r.drain()


@pytest.mark.parametrize("cut", [-1, -4, 100, 5])
def test_truncated_zstd(cut):
    z = zstandard.ZstdCompressor(write_checksum=True).compress(PAYLOAD)
    with pytest.raises(CorruptLayer, match="truncated"):
        r = open_layer(io.BytesIO(z[:cut]), OCI + "+zstd")
        r.drain()


def test_corrupt_zstd():
    z = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(PAYLOAD))
    z[len(z) // 2] ^= 0xFF
    with pytest.raises(CorruptLayer):
        open_layer(io.BytesIO(bytes(z)), OCI + "+zstd").drain()
    with pytest.raises(CorruptLayer):
        open_layer(io.BytesIO(b"\x28\xb5\x2f\xfd" + b"\xff" * 20), OCI + "+zstd").drain()


@pytest.mark.parametrize("media_type", [OCI + "+gzip", OCI + "+zstd", OCI])
def test_decompression_bomb(media_type):
    bomb = compress(b"\0" * (64 << 20), media_type)
    r = open_layer(io.BytesIO(bomb), media_type, max_bytes=8 << 20, name="layer sha256:abc")
    with pytest.raises(LimitExceeded, match="sha256:abc expands to more than 8388608"):
        r.drain()
    # Memory stays bounded: output is produced in chunks, not all at once.
    assert r.bytes_out <= (8 << 20) + (1 << 20)


def test_reader_is_usable_by_tarfile_stream_mode():
    import tarfile
    tar = layer_tar([Entry("d", kind="dir"), Entry("d/f", data=PAYLOAD)])
    r = open_layer(io.BytesIO(zstandard.ZstdCompressor().compress(tar)), OCI + "+zstd")
    with tarfile.open(fileobj=r, mode="r|") as tf:
        got = {m.name: (tf.extractfile(m).read() if m.isfile() else None) for m in tf}
    assert got == {"d": None, "d/f": PAYLOAD}
