"""The three flash readers (engine/flash/reader.py, aio_reader.py, native_reader.py) and their choice
(open_reader.py): identical bytes for the same requests, and faults that fail one request while the
next one works: an I/O error, a short read, and (native threads) a reader that exits holding a request."""

from __future__ import annotations

import os

import numpy as np
import pytest

from engine.errors import ConfigError, FlashReadError
from engine.flash import aio_reader, native_reader
from engine.flash.bundles import ALIGN
from engine.flash.open_reader import ENV, open_reader
from engine.flash.reader import FlashReader, aligned_buffer

def aio_works() -> bool:
    """Kernel AIO is allowed here and works on the temporary directory the tests write to (qemu-user,
    for one, may refuse io_setup; tmpfs refuses O_DIRECT)."""
    if not aio_reader.available():
        return False
    import tempfile

    with tempfile.NamedTemporaryFile() as f:
        f.write(b"\0" * ALIGN)
        f.flush()
        try:
            aio_reader.AioReader(f.name).close()
        except OSError:
            return False
    return True


KINDS = ["python"] + (["aio"] if aio_works() else []) + (["native"] if native_reader.available() else [])
PAGES = 64


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "f.bin"
    raw = np.random.default_rng(0).integers(0, 256, PAGES * ALIGN, dtype=np.uint8)
    path.write_bytes(raw.tobytes())
    return path, raw


@pytest.fixture(params=KINDS)
def reader(request, data):
    r = open_reader(data[0], direct=True, threads=4, kind=request.param)
    yield r
    r.close()


def test_kind_is_what_was_asked(reader, request):
    kind = request.node.callspec.params["reader"]
    want = {"python": FlashReader, "aio": getattr(aio_reader, "AioReader"),
            "native": getattr(native_reader, "NativeReader")}[kind]
    assert type(reader) is want


def test_same_bytes_in_flight_and_in_any_order(reader, data):
    _, raw = data
    rng = np.random.default_rng(1)
    _, pool = aligned_buffer(40 * 4 * ALIGN)
    bufs, want, tickets = [], [], []
    for i in range(40):                                       # 40 reads of 1-4 pages in flight at once
        pages = int(rng.integers(1, 5))
        page = int(rng.integers(0, PAGES - pages + 1))
        buf = pool[i * 4 * ALIGN: i * 4 * ALIGN + pages * ALIGN]
        buf[:] = 0
        tickets.append(reader.submit(buf, page * ALIGN))
        bufs.append(buf)
        want.append(raw[page * ALIGN:(page + pages) * ALIGN])
    for i in rng.permutation(40):                              # consumed out of submission order
        assert tickets[i].result() >= 0.0
        np.testing.assert_array_equal(bufs[i], want[i])
    for _ in range(3):                                         # and a ring's worth of reuse after that
        for i in range(40):
            tickets[i] = reader.submit(bufs[i], 0)
        for t in tickets:
            t.result()


def test_short_read_fails_that_request_only(reader, data):
    _, raw = data
    _, buf = aligned_buffer(2 * ALIGN)
    with pytest.raises(FlashReadError, match="short read"):
        reader.submit(buf, (PAGES - 1) * ALIGN).result()      # one page left in the file, two asked
    reader.submit(buf[:ALIGN], 5 * ALIGN).result()
    np.testing.assert_array_equal(buf[:ALIGN], raw[5 * ALIGN:6 * ALIGN])


def test_io_error_fails_that_request_only(reader, data):
    _, raw = data
    _, buf = aligned_buffer(ALIGN)
    good = reader.fd
    bad = os.open(os.devnull, os.O_WRONLY)                    # reads from it fail with EBADF
    try:
        reader._use_fd(bad)
        t = reader.submit(buf, 0)
        with pytest.raises(FlashReadError, match="aborted"):
            t.result()
    finally:
        reader._use_fd(good)
        os.close(bad)
    reader.submit(buf, 3 * ALIGN).result()
    np.testing.assert_array_equal(buf, raw[3 * ALIGN:4 * ALIGN])


@pytest.mark.skipif(not native_reader.available(), reason="native reader threads need numba and eventfd")
def test_native_reader_that_exits_fails_one_request_and_is_replaced(data):
    path, raw = data
    r = native_reader.NativeReader(path, direct=True, threads=2)
    try:
        _, buf = aligned_buffer(4 * ALIGN)
        r._inject_exit(r._next + 1)
        first = r.submit(buf[:ALIGN], 0)
        lost = r.submit(buf[ALIGN:2 * ALIGN], ALIGN)
        after = r.submit(buf[2 * ALIGN:], 2 * ALIGN)
        first.result()
        with pytest.raises(FlashReadError, match="exited"):
            lost.result()
        after.result()                                          # the survivor served it
        np.testing.assert_array_equal(buf[2 * ALIGN:], raw[2 * ALIGN:4 * ALIGN])
        assert int(r._ctl[native_reader.ALIVE]) == 2            # the lost reader was replaced
        for i in range(8):
            r.submit(buf[:ALIGN], i * ALIGN).result()
            np.testing.assert_array_equal(buf[:ALIGN], raw[i * ALIGN:(i + 1) * ALIGN])
    finally:
        r.close()


def test_close_with_reads_in_flight_returns(data):
    for kind in KINDS:
        r = open_reader(data[0], direct=True, threads=4, kind=kind)
        _, pool = aligned_buffer(32 * ALIGN)
        for i in range(32):
            r.submit(pool[i * ALIGN:(i + 1) * ALIGN], i * ALIGN)
        r.close()                                               # waits for them; must not hang


def test_choice(data, monkeypatch):
    with pytest.raises(ConfigError, match="not one of"):
        open_reader(data[0], kind="uring")
    monkeypatch.setenv(ENV, "python")
    r = open_reader(data[0])
    assert type(r) is FlashReader
    r.close()
    monkeypatch.delenv(ENV)
    r = open_reader(data[0], direct=False)                      # buffered reads: never kernel AIO
    assert not isinstance(r, getattr(aio_reader, "AioReader"))
    r.close()
