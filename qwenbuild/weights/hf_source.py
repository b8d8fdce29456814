"""The tensors of a Hugging Face model directory (safetensors, single or sharded, or pytorch_model*.bin), by name.

Nothing is loaded here: each tensor knows how to stream its bytes. Pickled .bin files are opened with
torch.load(weights_only=True), which refuses to run code, and memory-mapped.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from qwenbuild.dtypes import DTYPES
from qwenbuild.errors import UserError
from qwenbuild.jsonfile import read_json
from qwenbuild.weights import safetensors_file

TORCH_DTYPES = {f"torch.{name}": name for name in DTYPES}


@dataclass(frozen=True)
class SourceTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str
    file: Path
    chunks: Callable[[], Iterator[bytes]]


def _index_files(directory: Path, index_name: str) -> list[Path]:
    index = directory / index_name
    doc = read_json(index, "shard index", hint="the index transformers writes beside sharded weights")
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise UserError(f"{index} is not a valid shard index: it needs a \"weight_map\" of tensor name -> file name",
                        hint="the index transformers writes beside sharded weights")
    files = sorted(set(weight_map.values()))
    # a shard is a file beside the index: never a path out of the model directory
    outside = [f for f in files if not f or "/" in f or "\\" in f or "\0" in f or f in (".", "..")]
    if outside:
        raise UserError(f"{index}: weight_map names {outside[0]!r}, not a file name in {directory}",
                        hint="each shard is named by its file name alone (model-00001-of-00002.safetensors)")
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise UserError(f"{index} lists shard files that do not exist: {', '.join(missing)}",
                        hint="copy every shard of the model into the directory")
    return [directory / f for f in files]


def weight_files(directory: str | Path) -> tuple[str, list[Path]]:
    """('safetensors' | 'bin', files) of a model directory; safetensors win when both are present."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory", hint="--torch_ckpt_dir takes a Hugging Face model directory")
    if (directory / "model.safetensors.index.json").is_file():
        return "safetensors", _index_files(directory, "model.safetensors.index.json")
    if (directory / "model.safetensors").is_file():
        return "safetensors", [directory / "model.safetensors"]
    if (directory / "pytorch_model.bin.index.json").is_file():
        return "bin", _index_files(directory, "pytorch_model.bin.index.json")
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if bins:
        return "bin", bins
    raise UserError(f"{directory} holds no model.safetensors, model.safetensors.index.json or pytorch_model*.bin",
                    hint="point --torch_ckpt_dir at the downloaded Hugging Face model directory")


def _safetensors_tensors(path: Path) -> list[SourceTensor]:
    entries, _ = safetensors_file.read_header(path)
    return [SourceTensor(e.name, e.shape, e.dtype, path, e.chunks) for e in entries]


def load_bin(path: Path) -> dict:
    # torch takes seconds to load: imported only for pickled .bin checkpoints
    import torch

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy non-zip format
    except pickle.UnpicklingError as exc:
        raise UserError(f"{path} holds objects other than tensors; refusing to unpickle it: {exc}".splitlines()[0],
                        hint="convert it to safetensors with the tool that produced it")
    except (RuntimeError, EOFError, OSError) as exc:
        raise UserError(f"{path} is not a readable PyTorch checkpoint: {exc}".splitlines()[0],
                        hint="the file may be truncated; copy it again")


def _tensor_chunks(path: Path, name: str, chunk_bytes: int = safetensors_file.CHUNK_BYTES):
    def chunks():
        # torch takes seconds to load: imported only for pickled .bin checkpoints
        import torch

        tensor = load_bin(path)[name]
        raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        for start in range(0, raw.size, chunk_bytes):
            yield raw[start:start + chunk_bytes].tobytes()
    return chunks


def _bin_tensors(path: Path) -> list[SourceTensor]:
    tensors = []
    for name, t in load_bin(path).items():
        if not hasattr(t, "dtype"):
            raise UserError(f"{path}: entry {name} is not a tensor")
        dtype = TORCH_DTYPES.get(str(t.dtype))
        if dtype is None:
            raise UserError(f"{path}: tensor {name} has dtype {t.dtype}; only float32, bfloat16 and float16 convert")
        tensors.append(SourceTensor(name, tuple(t.shape), dtype, path, _tensor_chunks(path, name)))
    return tensors


def source_tensors(directory: str | Path) -> tuple[list[Path], dict[str, SourceTensor]]:
    """Weight files and every tensor in them, by HF name; a name in two files is an error."""
    kind, files = weight_files(directory)
    read = _safetensors_tensors if kind == "safetensors" else _bin_tensors
    tensors: dict[str, SourceTensor] = {}
    for path in files:
        for t in read(path):
            if t.name in tensors:
                raise UserError(f"tensor {t.name} is in both {tensors[t.name].file.name} and {path.name}")
            tensors[t.name] = t
    return files, tensors
