"""Content digests: of files, of JSON values, and of MINDIR graphs equal for equal graphs and weights although
MindSpore's bytes are not reproducible."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from qwenbuild.errors import UserError

# the only attribute known to change between processes: it embeds a per-process id
VOLATILE_ATTRIBUTES = ("compile_phase",)
_CHUNK = 1 << 20


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def content_digest(path: str | os.PathLike) -> str:
    """Digest of what a file means: MINDIR graphs are normalised (their raw bytes vary between processes); a
    damaged one that no longer parses is digested as bytes, so it differs from every recorded digest."""
    if not str(path).endswith(".mindir"):
        return file_digest(path)
    try:
        return mindir_digest(path)
    except UserError:
        if not Path(path).is_file():
            raise
        return "damaged:" + file_digest(path)


def bytes_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def json_digest(value) -> str:
    """Digest of a JSON-able value, independent of key order."""
    return bytes_digest(json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())


def load_model_proto(path):
    """Parse a MINDIR file with MindSpore's own mind_ir protobuf classes."""
    # mindspore loads in seconds: only a MINDIR digest needs its protobuf classes
    from google.protobuf.message import DecodeError
    from mindspore.train import mind_ir_pb2

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path} does not exist", hint="export the graphs first (qwenbuild export / doit export)")
    model = mind_ir_pb2.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError) as exc:  # a damaged string field fails UTF-8 decoding (a ValueError)
        raise UserError(f"{path} is not a MINDIR file ({exc})", hint="re-export it; the file may be truncated")
    if not model.graph.name and not model.graph.node:
        raise UserError(f"{path} holds no graph", hint="re-export it; the file may be truncated or not a MINDIR")
    return model


def _drop_volatile(graph) -> None:
    keep = [a for a in graph.attribute if a.name not in VOLATILE_ATTRIBUTES]
    del graph.attribute[:]
    graph.attribute.extend(keep)


# the source variable names MindSpore appends to a node's name ("CNode_443$x$gate:149"): when a node carries
# several, their order follows a hash set's and changes between processes; they are debug text, not the graph
_DEBUG_NAMES = re.compile(r"\$[^:$]*(?:\$[^:$]*)*(?=:)")


def _drop_debug_names(graph) -> None:
    strip = lambda text: _DEBUG_NAMES.sub("", text)  # noqa: E731
    for node in graph.node:
        node.name = strip(node.name)
        inputs, outputs = [strip(i) for i in node.input], [strip(o) for o in node.output]
        del node.input[:], node.output[:]
        node.input.extend(inputs)
        node.output.extend(outputs)
    for out in graph.output:
        out.name = strip(out.name)


def normalise(model):
    """Remove compile_phase and debug variable names and put the primitive table in a canonical order (in place;
    returns the model)."""
    for graph in [model.graph, *model.functions]:
        _drop_volatile(graph)
        _drop_debug_names(graph)
    primitives = sorted(model.primitives, key=lambda p: p.SerializeToString(deterministic=True))
    del model.primitives[:]
    model.primitives.extend(primitives)
    return model


def _external_files(model, base: Path) -> list[Path]:
    locations = {p.external_data.location for p in model.graph.parameter if p.external_data.location}
    return [base / loc for loc in sorted(locations)]


def mindir_digest(path) -> str:
    """sha256 of the normalised graph plus the external weight files it references (rank_N_variables/data_*)."""
    path = Path(path)
    model = normalise(load_model_proto(path))
    h = hashlib.sha256(model.SerializeToString(deterministic=True))
    for data_file in _external_files(model, path.parent):
        h.update(b"\0" + data_file.relative_to(path.parent).as_posix().encode() + b"\0")
        try:
            with open(data_file, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
        except FileNotFoundError:
            raise UserError(f"{path} refers to external weights {data_file}, which do not exist",
                            hint="copy the whole rank_N_variables/ directory along with the graph, or re-export")
    return "sha256:" + h.hexdigest()
