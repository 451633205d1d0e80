"""SampleTarWriter writes what webdataset's TarWriter writes, without importing torch."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile

from mmflow.data.ingest_tar import SampleTarWriter

SAMPLES = [
    {"__key__": "000000000", "jpg": b"\xff\xd8image", "txt": b"a cat", "json": b'{"k": 1}'},
    {"__key__": "000000001", "png": b"\x89PNG", "txt": "unicode caption \u00e9", "json": b"{}"},
]


def members(data: bytes) -> list[tuple]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return [(m.name, m.size, m.mode, m.uname, m.gname, tf.extractfile(m).read()) for m in tf]


def test_same_members_as_webdataset():
    import webdataset as wds

    ours, theirs = io.BytesIO(), io.BytesIO()
    w = SampleTarWriter(ours)
    for s in SAMPLES:
        w.write(s)
    w.close()
    tw = wds.TarWriter(theirs, encoder=False)
    for s in SAMPLES:
        tw.write(
            {k: v.encode() if isinstance(v, str) and k != "__key__" else v for k, v in s.items()}
        )
    tw.close()
    assert members(ours.getvalue()) == members(theirs.getvalue())
    assert members(ours.getvalue())[0][0] == "000000000.jpg"


def test_an_ingest_worker_imports_no_torch():
    code = (
        "import sys, mmflow.data.ingest_shard, mmflow.data.ingest_import;"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
