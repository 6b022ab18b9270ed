"""Safetensors headers read and checked by hand, before any tensor data is touched.

The file layout is ``u64 little-endian header length N | N bytes of JSON | data``. A hostile or
truncated file is refused here with a one-line error naming the file and tensor, so that a merge
can be validated from headers alone (``mergelab plan``) and never fails half-way on a bad file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import torch

from mergelab.errors import MergelabError

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit (decimal megabytes)

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one stored tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class Header:
    specs: dict[str, TensorSpec]
    metadata: dict[str, str]
    data_start: int  # byte offset of the data section
    offsets: dict[str, int]  # absolute byte offset of each tensor's data in the file


def read_header(path: str) -> Header:
    """Parse and validate a safetensors header; raises MergelabError on anything malformed.

    What the safetensors library refuses is refused here too: a header over 100 MB, not UTF-8, not
    one JSON object (``NaN`` and ``Infinity`` are not JSON), ``__metadata__`` other than a mapping of
    strings to strings, and data offsets that do not cover the data section exactly (gaps, overlaps or
    bytes after the last tensor). A name listed twice is refused as well, even where both entries agree
    (the library keeps the last one without a word).
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise MergelabError("not a safetensors file (shorter than 8 bytes)", file=path)
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise MergelabError(
                    f"corrupt safetensors header (claims {length} bytes, over the format's limit of {MAX_HEADER_BYTES})",
                    file=path,
                )
            if length > size - 8:
                raise MergelabError(
                    f"corrupt or truncated safetensors header (claims {length} bytes, file has {size})", file=path
                )
            raw = handle.read(length)
    except OSError as err:
        raise MergelabError(f"cannot read: {err.strerror}", file=path) from None
    header = _parse_json(path, raw)
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise MergelabError("corrupt safetensors header (__metadata__ must map strings to strings)", file=path)
    data_size = size - 8 - length
    specs: dict[str, TensorSpec] = {}
    spans = []
    for name, entry in header.items():
        spec, begin, end = _check_entry(path, name, entry)
        if end > data_size:
            raise MergelabError(
                f"file is truncated: data ends at byte {data_size}, tensor needs {end}", file=path, tensor=name
            )
        specs[name] = spec
        spans.append((begin, end, name))
    _check_coverage(path, sorted(spans), data_size)
    offsets = {name: 8 + length + begin for begin, _, name in spans}
    return Header(specs=specs, metadata=metadata, data_start=8 + length, offsets=offsets)


def _parse_json(path: str, raw: bytes) -> dict[str, object]:
    """The header as a JSON object: UTF-8 only (``json.loads`` would also guess UTF-16 or -32), each key
    once in every object, no ``NaN``/``Infinity``."""
    twice: list[tuple[str, dict[str, object]]] = []  # (key, the object listing it twice)

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in items:
            if key in out:
                twice.append((key, out))
            out[key] = value
        return out

    def constant(name: str) -> object:
        raise ValueError(f"{name} is not JSON")

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MergelabError(f"corrupt safetensors header (not UTF-8: invalid byte at offset {err.start})", file=path) from None
    try:
        header = json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except ValueError:  # json.JSONDecodeError included
        raise MergelabError("corrupt safetensors header (not JSON)", file=path) from None
    if not isinstance(header, dict):
        raise MergelabError("corrupt safetensors header (not a JSON object)", file=path)
    for key, owner in twice:
        if owner is header:
            raise MergelabError("corrupt safetensors header (tensor listed twice)", file=path, tensor=key)
        inside = next((name for name, value in header.items() if value is owner), None)
        if inside is None or inside == "__metadata__":
            where = " in __metadata__" if inside else ""
            raise MergelabError(f"corrupt safetensors header (key {key!r} listed twice{where})", file=path)
        raise MergelabError(f"corrupt safetensors header ({key!r} listed twice in the entry)", file=path, tensor=inside)
    return header


def _check_coverage(path: str, spans: list[tuple[int, int, str]], data_size: int) -> None:
    """Sorted by offset, the tensors must tile the data section: no overlap, no gap, nothing after."""
    done, prev_name = 0, ""
    for begin, end, name in spans:
        if begin < done:
            raise MergelabError(f"corrupt file: data overlaps tensor '{prev_name}'", file=path, tensor=name)
        if begin > done:
            after = f"after tensor '{prev_name}'" if prev_name else "at the start of the data"
            raise MergelabError(f"corrupt file: {begin - done} bytes {after} belong to no tensor", file=path, tensor=name)
        done, prev_name = end, name
    if done != data_size:
        raise MergelabError(f"corrupt file: {data_size - done} bytes after the last tensor belong to no tensor", file=path)


def _check_entry(path: str, name: str, entry: object) -> tuple[TensorSpec, int, int]:
    if not isinstance(entry, dict):
        raise MergelabError("corrupt header entry", file=path, tensor=name)
    dtype_name = entry.get("dtype")
    dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None  # a list would be unhashable
    if dtype is None:
        raise MergelabError(f"unsupported dtype {dtype_name!r}", file=path, tensor=name)
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise MergelabError(f"corrupt shape {shape!r}", file=path, tensor=name)
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise MergelabError(f"corrupt data_offsets {offsets!r}", file=path, tensor=name)
    spec = TensorSpec(tuple(shape), dtype)
    if offsets[1] - offsets[0] != spec.nbytes:
        raise MergelabError(
            f"corrupt file: {offsets[1] - offsets[0]} bytes stored for shape {tuple(shape)} of {entry['dtype']}",
            file=path,
            tensor=name,
        )
    return spec, offsets[0], offsets[1]


def _is_count(value: object) -> bool:
    """A JSON non-negative integer (``true``/``false`` are ints to Python, not to the format)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
