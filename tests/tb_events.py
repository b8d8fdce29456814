"""TensorBoard event files read back as TensorBoard reads them: TFRecord framing with masked CRC-32C checked, each
record an Event protobuf (tensorboardX's generated classes), scalars by tag and step."""

from __future__ import annotations

import struct
from pathlib import Path

from qwenbuild.train.events import summary_writer_class


def _masked_crc(data: bytes) -> int:
    summary_writer_class()  # tensorboardX loaded as the project loads it (mindspore still imports after it)
    from tensorboardX.crc32c import crc32c

    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def records(path: Path) -> list[bytes]:
    data, out, at = Path(path).read_bytes(), [], 0
    while at < len(data):
        header = data[at:at + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[at + 8:at + 12])
        assert header_crc == _masked_crc(header), f"{path}: bad length CRC at byte {at}"
        body = data[at + 12:at + 12 + length]
        (body_crc,) = struct.unpack("<I", data[at + 12 + length:at + 16 + length])
        assert len(body) == length and body_crc == _masked_crc(body), f"{path}: bad record at byte {at}"
        out.append(body)
        at += 16 + length
    return out


def scalars(directory: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} over every event file in `directory`, later files winning (as TensorBoard shows)."""
    summary_writer_class()  # tensorboardX loaded as the project loads it (mindspore still imports after it)
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, dict[int, float]] = {}
    files = sorted(Path(directory).glob("events.out.tfevents.*"))
    assert files, f"no event file in {directory}"
    for path in files:
        for i, body in enumerate(records(path)):
            event = Event.FromString(body)
            if i == 0:
                assert event.file_version == "brain.Event:2", path
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out
