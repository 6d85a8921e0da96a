"""Reading an offline wandb run's ``run-<id>.wandb`` file: its logged history rows.

The file is a LevelDB-style log (what wandb's own ``datastore`` module read before wandb moved
it to its Go core): a 7-byte header, then 32 KiB blocks of records, each a 7-byte header
(checksum, little-endian length, type: full, first, middle or last) and a piece of a
protobuf ``Record``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[bytes]:
    """The serialised records of a ``.wandb`` file, in order."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    found: list[bytes] = []
    pending = b""
    offset = HEADER
    while offset + HEADER <= len(data):
        left = BLOCK - offset % BLOCK
        if left < HEADER:  # the block's tail is padding
            offset += left
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + HEADER])
        if kind == 0 and length == 0:  # zero padding
            offset += left
            continue
        piece = data[offset + HEADER : offset + HEADER + length]
        offset += HEADER + length
        if kind == FULL:
            found.append(piece)
        elif kind == FIRST:
            pending = piece
        elif kind == MIDDLE:
            pending += piece
        elif kind == LAST:
            found.append(pending + piece)
            pending = b""
    return found


def history(run_dir: Path) -> list[dict[str, Any]]:
    """The history rows (``run.log`` calls) of an offline run folder ``offline-run-*``."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    rows = []
    for raw in records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows
