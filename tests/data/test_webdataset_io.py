"""iter_shard on hostile tars, all written here byte by byte: memory and inflation stay bounded,
every bad member is a sample error naming its kind, the member and the tar."""

from __future__ import annotations

import gzip
import io
import tarfile
import tracemalloc
import zlib

import pytest
from PIL import Image

from mmflow.data.webdataset_io import iter_shard
from mmflow.storage import Storage

BLOCK = 512


def jpg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), (i * 30 % 256, 90, 200)).save(buf, "JPEG")
    return buf.getvalue()


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % BLOCK)


def header(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> bytes:
    """A GNU tar header (plus long-name blocks when needed); names may hold surrogate-escaped
    bytes, written raw (that is how a non-UTF-8 name is made)."""
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname, info.mode, info.mtime = size, kind, linkname, 0o644, 0
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


def member(name: str, data: bytes) -> bytes:
    return header(name, len(data)) + _pad(data)


def sample(key: str, i: int) -> bytes:
    return member(f"{key}.jpg", jpg(i)) + member(
        f"{key}.txt", f"caption {key}".encode("utf-8", "replace")
    )


def sparse_member(name: str, real_size: int) -> bytes:
    """An old-GNU sparse member ('S'): 512 stored bytes that expand to ``real_size``."""
    buf = bytearray(header(name, BLOCK))
    buf[156:157] = tarfile.GNUTYPE_SPARSE

    def octal(v: int) -> bytes:  # base-256 above 8 GiB, as GNU tar writes it
        return f"{v:011o}\0".encode() if v < 8**11 else b"\x80" + v.to_bytes(11, "big")

    buf[386:398], buf[398:410] = octal(real_size - BLOCK), octal(BLOCK)  # one chunk, at the end
    buf[483:495] = octal(real_size)  # the expanded size
    buf[148:156] = b" " * 8
    buf[148:155] = f"{sum(buf):06o}\0".encode()
    return bytes(buf) + b"x" * BLOCK


def end() -> bytes:
    return b"\0" * (2 * BLOCK)


def write(path, *parts: bytes) -> str:
    path.write_bytes(b"".join(parts) + end())
    return str(path)


def read(path, **kw) -> dict[str, str | None]:
    """key -> error of every sample (None: whole)."""
    return {s.key: s.error for s in iter_shard(Storage(), str(path), **kw)}


def kind(error: str | None) -> str | None:
    return error.split(":")[0] if error else None


def test_sparse_member_is_refused_unread(tmp_path):
    """A 10 KB sparse tar claims a 200 MB member: counted, never expanded into memory."""
    path = write(
        tmp_path / "sparse.tar",
        sample("000000000", 0),
        sparse_member("000000001.jpg", 200 << 20),
        member("000000001.txt", b"c"),
        sample("000000002", 2),
    )
    tracemalloc.start()
    errors = read(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert kind(errors["000000001"]) == "sparse_member"
    assert "000000001.jpg" in errors["000000001"] and path in errors["000000001"]
    assert errors["000000000"] is None and errors["000000002"] is None
    assert peak < 20 << 20, peak


def test_links_devices_and_oversized_members(tmp_path):
    path = write(
        tmp_path / "kinds.tar",
        sample("000000000", 0),
        header("000000001.jpg", kind=tarfile.SYMTYPE, linkname="/etc/passwd"),
        member("000000001.txt", b"c"),
        header("000000002.jpg", kind=tarfile.LNKTYPE, linkname="000000000.jpg"),
        header("000000003.jpg", kind=tarfile.FIFOTYPE),
        member("000000004.jpg", b"\xff" * 5000),
        member("000000004.txt", b"c"),
        sample("000000005", 5),
    )
    errors = read(path, max_member_bytes=4096)
    assert {k: kind(e) for k, e in errors.items()} == {
        "000000000": None,
        "000000001": "link_member",
        "000000002": "link_member",
        "000000003": "special_member",
        "000000004": "member_too_large",
        "000000005": None,
    }
    assert "symbolic link" in errors["000000001"] and "hard link" in errors["000000002"]
    assert "5000 bytes, over max_member_bytes=4096" in errors["000000004"]


def test_unsafe_and_non_utf8_names(tmp_path):
    path = write(
        tmp_path / "names.tar",
        sample("000000000", 0),
        sample("../../etc/000000001", 1),
        sample("/abs/000000002", 2),
        sample("sub/000000003", 3),
        sample("caf\udce9", 4),  # the byte 0xe9: latin-1, not UTF-8
        sample("./000000005", 5),  # `tar -C dir .` writes this: the key is 000000005
        sample("000000006", 6),
    )
    samples = list(iter_shard(Storage(), path))
    errors = {s.key: s.error for s in samples}
    assert {k: kind(e) for k, e in errors.items()} == {
        "000000000": None,
        "../../etc/000000001": "unsafe_key",
        "/abs/000000002": "unsafe_key",
        "sub/000000003": "unsafe_key",
        "caf\\xe9": "non_utf8_name",
        "000000005": None,
        "000000006": None,
    }
    for error in errors.values():
        if error:  # names the member and the tar
            assert path in error and ".jpg" in error, error
    assert "'caf\\\\xe9.jpg'" in errors["caf\\xe9"]
    for s in samples:
        s.key.encode("utf-8")  # every key can be written to Parquet and JSON
    assert [s.index for s in samples] == list(range(7))


def gzip_bomb(path, before: list[str], bomb: str, zeros: int, after: list[str]) -> str:
    """A gzipped tar: whole samples ``before``, then ``{bomb}.jpg`` of ``zeros`` zero bytes
    (packed about 1000:1), then samples ``after``; compressed as it is written."""
    z = zlib.compressobj(1, zlib.DEFLATED, 31)  # 31: gzip container
    with open(path, "wb") as f:
        for i, key in enumerate(before):
            f.write(z.compress(sample(key, i)))
        f.write(z.compress(header(f"{bomb}.jpg", zeros)))
        chunk = b"\0" * (1 << 20)
        for _ in range(zeros >> 20):
            f.write(z.compress(chunk))
        f.write(z.compress(b"".join(sample(key, i) for i, key in enumerate(after)) + end()))
        f.write(z.flush())
    return str(path)


def test_compression_bomb_ends_the_shard(tmp_path):
    """64 MiB of zeros in a 70 KB gzip: inflation stops near max_member_bytes + ratio x packed."""
    before = [f"00000000{i}" for i in range(3)]
    path = gzip_bomb(tmp_path / "bomb.tar", before, "000000009", 64 << 20, ["000000010"])
    tracemalloc.start()
    samples = list(iter_shard(Storage(), path, max_member_bytes=1 << 20))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    errors = {s.key: s.error for s in samples}
    assert [errors[f"00000000{i}"] for i in range(3)] == [None, None, None]
    assert kind(errors["000000009"]) == "compression_bomb", errors
    assert "000000010" not in errors  # past the bomb: not read
    assert peak < 8 << 20, peak


def test_compressed_tar_of_good_samples_reads_whole(tmp_path):
    data = b"".join(sample(f"{i:09d}", i) for i in range(20)) + end()
    path = tmp_path / "good.tar"
    path.write_bytes(gzip.compress(data))
    errors = read(path, max_member_bytes=1 << 20)
    assert list(errors) == [f"{i:09d}" for i in range(20)] and set(errors.values()) == {None}
    images = [s.image for s in iter_shard(Storage(), str(path))]
    assert images == [jpg(i) for i in range(20)]


def test_a_header_claiming_gigabytes_ends_the_shard_unread(tmp_path):
    """A GNU long-name record of 1 GiB would be read whole by tarfile: refused as corrupt."""
    buf = bytearray(header("././@LongLink", 1 << 30))
    buf[156:157] = tarfile.GNUTYPE_LONGNAME
    buf[148:156] = b" " * 8
    buf[148:155] = f"{sum(buf):06o}\0".encode()
    path = write(tmp_path / "longname.tar", sample("000000000", 0), bytes(buf), b"\0" * 4096)
    errors = read(path, max_member_bytes=1 << 20)
    assert errors["000000000"] is None or kind(errors["000000000"]) == "corrupt_tar"
    assert any(kind(e) == "corrupt_tar" for e in errors.values()), errors


@pytest.mark.parametrize("content", [b"", b"not a tar at all" * 100, b"\x1f\x8b\x08junk"])
def test_non_tar_files_are_one_corrupt_sample(tmp_path, content):
    path = tmp_path / "x.tar"
    path.write_bytes(content)
    samples = list(iter_shard(Storage(), str(path)))
    assert len(samples) == 1 and kind(samples[0].error) == "corrupt_tar"
