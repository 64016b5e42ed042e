"""Read an offline W&B run back: its .wandb file is a LevelDB-style log of protobuf Records (a 7-byte ':W&B' header,
then 32 KiB blocks of chunks, each with a 7-byte header: crc32, length, kind FULL/FIRST/MIDDLE/LAST)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list[pb.Record]:
    """Every Record of one .wandb file, in order."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, records, pending = HEADER, [], b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0:
            break
        chunk, pos = data[pos + HEADER : pos + HEADER + length], pos + HEADER + length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
    out = []
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        out.append(record)
    return out


class OfflineRun:
    """What an offline run logged: config, run fields, history rows, summary, artifacts and exit code."""

    def __init__(self, run_dir: Path) -> None:
        (log,) = Path(run_dir).glob("*.wandb")
        self.dir = Path(run_dir)
        self.config: dict = {}
        self.history: list[dict] = []
        self.summary: dict = {}
        self.artifacts: list[dict] = []
        self.exit_code: int | None = None
        self.run = None
        for r in wandb_records(log):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                self.run = r.run
                self._config(r.run.config.update)
            elif kind == "config":
                self._config(r.config.update)
            elif kind == "history":
                self.history.append({_key(i): json.loads(i.value_json) for i in r.history.item})
            elif kind == "summary":
                self.summary |= {_key(i): json.loads(i.value_json) for i in r.summary.update}
            elif kind == "artifact":
                self.artifacts.append(
                    {
                        "name": r.artifact.name,
                        "type": r.artifact.type,
                        "files": [m.path for m in r.artifact.manifest.contents],
                    }
                )
            elif kind == "exit":
                self.exit_code = r.exit.exit_code

    def _config(self, items) -> None:
        for i in items:
            value = json.loads(i.value_json)
            self.config[_key(i)] = value.get("value", value) if isinstance(value, dict) else value

    def logged(self, key: str) -> list:
        """Every value logged under ``key`` in the history, in order."""
        return [row[key] for row in self.history if key in row]


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)
