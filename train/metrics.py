"""Run observability without extra dependencies: JSON Lines metrics, TensorBoard event files,
and a terminal progress bar.

TensorBoard reads TFRecord files of `Event` protocol buffers; we write the few fields a scalar
needs by hand (file_version, wall_time, step, summary.value{tag, simple_value}), framed as
TFRecord (length, masked CRC-32C of the length, payload, masked CRC-32C of the payload).
"""
from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint((number << 3) | wire) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def event_bytes(wall_time: float, step: int, *, file_version: str | None = None,
                scalars: dict[str, float] | None = None) -> bytes:
    """Serialise one tensorflow.Event with scalar summary values."""
    msg = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        msg += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", v)))
                          for tag, v in scalars.items())
        msg += _bytes_field(5, values)
    return msg


class EventWriter:
    """Appends scalar events to `<logdir>/events.out.tfevents.<time>.<host>`."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self.path = os.path.join(logdir, name)
        self._f = open(self.path, "ab")
        self._write(event_bytes(time.time(), 0, file_version="brain.Event:2"))

    def _write(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        self._f.write(header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data)))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        finite = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        self._write(event_bytes(time.time(), step, scalars=finite))
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_events(path: str) -> list[tuple[int, dict[str, float]]]:
    """Parse our own event files back (tests, plots): [(step, {tag: value})], CRCs checked."""
    out = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        (n,) = struct.unpack_from("<Q", data, pos)
        assert struct.unpack_from("<I", data, pos + 8)[0] == _masked_crc(data[pos:pos + 8])
        payload = data[pos + 12:pos + 12 + n]
        assert struct.unpack_from("<I", data, pos + 12 + n)[0] == _masked_crc(payload)
        pos += 16 + n
        out.append(_parse_event(payload))
    return out


def _read_varint(b: bytes, i: int) -> tuple[int, int]:
    shift = n = 0
    while True:
        n |= (b[i] & 0x7F) << shift
        shift += 7
        i += 1
        if not b[i - 1] & 0x80:
            return n, i


def _fields(b: bytes):
    i = 0
    while i < len(b):
        key, i = _read_varint(b, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _read_varint(b, i)
        elif wire == 1:
            v, i = b[i:i + 8], i + 8
        elif wire == 5:
            v, i = b[i:i + 4], i + 4
        else:
            ln, i = _read_varint(b, i)
            v, i = b[i:i + ln], i + ln
        yield num, v


def _parse_event(b: bytes) -> tuple[int, dict[str, float]]:
    step, scalars = 0, {}
    for num, v in _fields(b):
        if num == 2:
            step = v
        elif num == 5:
            for _, value in _fields(v):
                parts = dict(_fields(value))
                scalars[parts[1].decode()] = struct.unpack("<f", parts[2])[0]
    return step, scalars


class JsonlWriter:
    """One JSON object per line. `resume_step=None` starts the file afresh (a new run); a step
    number keeps the records up to that step (a run resumed from its checkpoint rewrites what
    came after, and a line torn by a crash is dropped)."""

    def __init__(self, path: str, resume_step: int | None = None):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        kept = []
        if resume_step is not None and os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if record.get("step", 0) <= resume_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
        self._f = open(path, "w")
        self._f.writelines(kept)
        self._f.flush()

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _duration(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """`step 120/300 [#####.....] loss 3.21 | 5.2k tok/s | ETA 1m23s` on one terminal line
    (a line per update when stderr is not a terminal)."""

    def __init__(self, total: int, start: int = 0, stream=sys.stderr, width: int = 24):
        self.total, self.start, self.stream, self.width = total, start, stream, width
        self.t0 = time.perf_counter()
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        done = (step - self.start) / max(self.total - self.start, 1)
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (1 - done) if done > 0 else 0.0
        fill = int(self.width * step / max(self.total, 1))
        line = (f"step {step}/{self.total} [{'#' * fill}{'.' * (self.width - fill)}] loss {loss:.4f} | "
                f"{tokens_per_s / 1000:.1f}k tok/s | ETA {_duration(eta)}")
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
