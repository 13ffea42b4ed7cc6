"""Large writes to files, cut into pieces of FILE_WRITE_PIECE_BYTES.

A `write()` of 2 MiB and more gets page-cache folios that large. Where a virtual
machine's balloon reports free 2 MiB blocks back to its host (virtio-balloon's free
page reporting, order 9), the first touch of each such folio faults on the host: 100
MB written at once cost 250-440 ms of CPU one time in two on this project's machines,
against 30-50 ms in 1 MiB writes (BENCHMARKS.md, "A checkpoint written in 1 MiB
pieces"). The server's checkpoints and the spool files of both daemons write
through here."""

from __future__ import annotations

import errno
import os

from fl_core.constants import FILE_WRITE_PIECE_BYTES


def pwrite_all(fd: int, data: memoryview, offset: int) -> int:
    """Writes all of `data` at `offset` in pieces, through short writes; returns the
    offset after it. A write that moves nothing is an error, not a retry."""
    piece = FILE_WRITE_PIECE_BYTES
    done = 0
    while done < len(data):
        written = os.pwrite(fd, data[done:done + piece], offset + done)
        if written <= 0:
            raise OSError(errno.EIO, f"a write of {min(piece, len(data) - done)} bytes at "
                                     f"offset {offset + done} wrote nothing")
        done += written
    return offset + done
