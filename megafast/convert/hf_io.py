"""Hugging Face checkpoint files: reading tensors lazily, writing sharded safetensors as they come.

Reading (:class:`HFCheckpoint`): ``config.json`` plus one of ``model.safetensors``,
``model.safetensors.index.json`` (sharded), ``pytorch_model.bin`` or
``pytorch_model.bin.index.json``. Tensors are read one at a time on demand (safetensors through
``safe_open``; ``.bin`` files memory-mapped), so only the tensors being converted are in memory.

Writing (:class:`SafetensorsShardWriter`): the full list of tensor names and shapes is known
from the config before any data, so the shards (``model-0000x-of-0000y.safetensors``, at most
``max_shard_size`` bytes each) and every tensor's byte range are planned up front; each shard's
header is written when it is opened and each tensor is written at its offset as soon as it is
converted, so memory stays at one tensor. A shard is fsynced and renamed into place when its
last tensor arrives; ``model.safetensors.index.json`` is written last.

safetensors layout: 8-byte little-endian header length N, N bytes of JSON header
(``{"__metadata__": {"format": "pt"}, name: {"dtype", "shape", "data_offsets": [begin, end]}}``,
padded with spaces to a multiple of 8), then the tensors' bytes, offsets relative to the data.
"""

from __future__ import annotations

import json
import os
import re
import struct
import uuid
import zipfile
from typing import Any, BinaryIO, Optional

import torch

from megafast.atomic_file import atomic_write, fsync_dir

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}): fix or replace the file") from None


def write_json(path: str, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (HF's style: sorted keys, trailing newline)."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def parse_size(size: str | int) -> int:
    """'5GB' -> 5 * 10**9, '500MiB' -> 500 * 2**20, '1000' -> 1000 (transformers' convention)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"--max-shard-size {size!r} is not a size such as 5GB, 500MB or 2GiB")
    value, unit = float(m.group(1)), (m.group(2) or "B").upper()
    powers = {"K": 1, "M": 2, "G": 3, "T": 4}
    if unit == "B":
        return int(value)
    base = 1024 if unit.endswith("IB") else 1000
    return int(value * base ** powers[unit[0]])


class HFCheckpoint:
    """A local Hugging Face model directory: its ``config.json`` and lazily read tensors."""

    def __init__(self, directory: str) -> None:
        if not os.path.isdir(directory):
            raise ValueError(f"Hugging Face model directory {directory} does not exist: check --load-dir")
        self.directory = directory
        config_path = os.path.join(directory, CONFIG_FILE)
        if not os.path.isfile(config_path):
            raise ValueError(f"{directory} has no {CONFIG_FILE}: not a Hugging Face model directory")
        self.config: dict[str, Any] = read_json(config_path)
        self.generation_config: Optional[dict[str, Any]] = None
        if os.path.isfile(os.path.join(directory, GENERATION_CONFIG_FILE)):
            self.generation_config = read_json(os.path.join(directory, GENERATION_CONFIG_FILE))
        self._handles: dict[str, Any] = {}
        self.weight_map = self._find_weights()

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def _find_weights(self) -> dict[str, str]:
        """Tensor name -> file name, checking that every shard an index lists exists."""
        for index_name in (SAFE_INDEX, BIN_INDEX):
            if os.path.isfile(self._path(index_name)):
                index = read_json(self._path(index_name))
                weight_map = index.get("weight_map") if isinstance(index, dict) else None
                if not isinstance(weight_map, dict) or not weight_map:
                    raise ValueError(f"{self._path(index_name)} has no 'weight_map': the index is damaged")
                missing = sorted({f for f in weight_map.values() if not os.path.isfile(self._path(f))})
                if missing:
                    raise ValueError(
                        f"{self.directory}: shard(s) {', '.join(missing)} listed in {index_name} are "
                        "missing: copy every shard of the checkpoint into the directory"
                    )
                return dict(weight_map)
        for single in (SAFE_SINGLE, BIN_SINGLE):
            if os.path.isfile(self._path(single)):
                return {name: single for name in self._open(single).keys()}
        shards = sorted(
            f for f in os.listdir(self.directory) if re.match(r".*-\d{5}-of-\d{5}\.(safetensors|bin)$", f)
        )
        if shards:
            raise ValueError(
                f"{self.directory} holds shards such as {shards[0]} but no {SAFE_INDEX} / {BIN_INDEX}: "
                "copy the index file too"
            )
        raise ValueError(
            f"{self.directory} holds no weights: expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} "
            f"or {BIN_INDEX}"
        )

    def _open(self, file_name: str) -> Any:
        """A cached handle with ``keys()`` and ``get_tensor(name)`` for one weights file."""
        handle = self._handles.get(file_name)
        if handle is not None:
            return handle
        path = self._path(file_name)
        if file_name.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                handle = safe_open(path, framework="pt")
            except Exception as exc:  # the Rust library raises its own error types
                raise ValueError(
                    f"cannot read {path} ({exc}): the file is truncated or not safetensors"
                ) from None
        else:
            try:
                state = _load_bin(path)
            except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged file
                raise ValueError(
                    f"cannot read {path} ({type(exc).__name__}): the file is truncated or damaged"
                ) from None
            handle = _DictHandle(state)
        self._handles[file_name] = handle
        return handle

    def names(self) -> set[str]:
        return set(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` (ValueError naming it when no file holds it)."""
        file_name = self.weight_map.get(name)
        if file_name is None:
            raise ValueError(f"{self.directory}: tensor {name} is missing from the checkpoint's weights")
        handle = self._open(file_name)
        if name not in handle.keys():
            raise ValueError(f"{self._path(file_name)} lacks tensor {name}, which the index places there")
        return handle.get_tensor(name)

    def dtype(self, names: list[str]) -> torch.dtype:
        """The dtype the weights are stored in: that of the first of ``names`` (the embedding)."""
        return self.get(names[0]).dtype


def _load_bin(path: str) -> dict[str, torch.Tensor]:
    """A ``pytorch_model.bin`` state dict, memory-mapped unless it is in the legacy (non-zip) format."""
    mmap = zipfile.is_zipfile(path)
    return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)


class _DictHandle:
    """``safe_open``'s interface over a loaded state dict (``pytorch_model.bin``)."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state

    def keys(self):
        return self.state.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.state[name]


class SafetensorsShardWriter:
    """Writes ``specs`` (HF name -> shape, in arrival order) as sharded safetensors in ``directory``."""

    def __init__(
        self,
        directory: str,
        specs: list[tuple[str, tuple[int, ...]]],
        dtype: torch.dtype,
        max_shard_bytes: int,
    ) -> None:
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"safetensors cannot store {dtype}")
        self.directory, self.dtype = directory, dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        shards: list[list[tuple[str, tuple[int, ...], int]]] = [[]]
        used = 0
        for name, shape in specs:
            nbytes = itemsize * _numel(shape)
            if shards[-1] and used + nbytes > max_shard_bytes:  # a tensor is never split across shards
                shards.append([])
                used = 0
            shards[-1].append((name, tuple(shape), nbytes))
            used += nbytes
        n = len(shards)
        self.file_names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.total_size = sum(b for shard in shards for _, _, b in shard)
        self.total_parameters = sum(_numel(s) for shard in shards for _, s, _ in shard)
        self._place: dict[str, tuple[int, tuple[int, ...], int]] = {}  # name -> (shard, shape, data begin)
        self._headers: list[bytes] = []
        self._remaining: list[int] = []
        for i, shard in enumerate(shards):
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            begin = 0
            for name, shape, nbytes in shard:
                header[name] = {
                    "dtype": SAFETENSORS_DTYPES[dtype],
                    "shape": list(shape),
                    "data_offsets": [begin, begin + nbytes],
                }
                self._place[name] = (i, shape, begin)
                begin += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            self._headers.append(struct.pack("<Q", len(raw)) + raw)
            self._remaining.append(len(shard))
        self._files: dict[int, tuple[BinaryIO, str]] = {}
        self._written: set[str] = set()

    def _file(self, shard: int) -> BinaryIO:
        if shard not in self._files:
            tmp = os.path.join(self.directory, f".{self.file_names[shard]}.tmp-{uuid.uuid4().hex[:8]}")
            f = open(tmp, "wb")
            f.write(self._headers[shard])
            self._files[shard] = (f, tmp)
        return self._files[shard][0]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor at its planned place; a shard is finished when its last tensor arrives."""
        if name not in self._place or name in self._written:
            raise ValueError(f"tensor {name} is not expected (or was already written) in the export")
        shard, shape, begin = self._place[name]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"export: tensor {name} has shape {list(tensor.shape)}, expected {list(shape)}")
        data = tensor.detach().to("cpu", self.dtype).contiguous()
        f = self._file(shard)
        f.seek(len(self._headers[shard]) + begin)
        if data.numel():
            f.write(memoryview(data.view(torch.uint8).numpy()))
        self._written.add(name)
        self._remaining[shard] -= 1
        if self._remaining[shard] == 0:
            f, tmp = self._files.pop(shard)
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(tmp, os.path.join(self.directory, self.file_names[shard]))

    def finish(self) -> None:
        """Check that every tensor was written, then write the index (the export's last weight file)."""
        missing = [name for name in self._place if name not in self._written]
        if missing:
            raise ValueError(f"export: tensor {missing[0]} was never produced ({len(missing)} missing)")
        fsync_dir(self.directory)
        weight_map = {name: self.file_names[place[0]] for name, place in self._place.items()}
        index = {
            "metadata": {"total_size": self.total_size, "total_parameters": self.total_parameters},
            "weight_map": dict(sorted(weight_map.items())),
        }
        write_json(os.path.join(self.directory, SAFE_INDEX), index)

    def abort(self) -> None:
        """Close and delete unfinished shards."""
        for f, tmp in self._files.values():
            f.close()
            if os.path.exists(tmp):
                os.remove(tmp)
        self._files = {}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
