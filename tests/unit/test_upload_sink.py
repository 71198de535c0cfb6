"""An upload's bytes reach the file whole and in order, with their sha256, however they were cut
(more pieces than one writev(2) takes included), and are handed to the disk as they come."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

from supervisor.api.uploads import IOV_MAX, FileSink


def test_pieces_are_written_whole_in_order_and_hashed(tmp_path: Path) -> None:
    rng = random.Random(7)
    pieces = [rng.randbytes(rng.randrange(0, 300)) for _ in range(IOV_MAX * 2 + 17)]
    pieces += [rng.randbytes(9 * 1024 * 1024)]  # past WRITEBACK_EVERY
    path = tmp_path / "upload"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        sink = FileSink(fd)
        for batch in (pieces[:5], pieces[5:]):
            sink.hash(batch)
            sink.write(batch)
    finally:
        os.close(fd)
    whole = b"".join(pieces)
    assert whole == path.read_bytes()
    assert hashlib.sha256(whole).hexdigest() == sink.hasher.hexdigest()
    assert (len(whole), len(whole)) == (sink.pos, sink.handed)
