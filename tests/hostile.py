"""Builders of hostile checkpoints, as safetensors' ``attacks/`` folder: each writes one bad input.

``build(folder, state)`` starts from a valid state dict (so the tensor names match a base and only
the damage is at fault) and returns ``Bad(path, named, tensor)``: the input to pass, the file the
error must name, and the tensor it must name (``None`` where no tensor is at fault). Shared by
``tests/io/test_sources.py`` and ``tests/cli/test_merge_cli.py``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save

from tests.helpers import write_sharded

TENSOR = "layer.0.mlp.weight"  # a (8, 6) float32 tensor of tests.helpers.tiny_state
MARKER = "code-was-executed"  # created by the exploit pickle if it is ever unpickled


@dataclass(frozen=True)
class Bad:
    path: Path  # what to open / pass as a model
    named: Path  # the file the error must name
    tensor: str | None = None  # the tensor the error must name


@dataclass(frozen=True)
class Case:
    build: Callable[[Path, dict[str, torch.Tensor]], Bad]
    message: str  # a fragment of the expected error


def split(state: dict[str, torch.Tensor]) -> tuple[dict, bytes]:
    """A valid safetensors file as (header dict, data section)."""
    raw = save(state)
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write_raw(path: Path, header: dict | bytes, data: bytes, length: int | None = None) -> Path:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


def _edit_entry(**changes: object) -> Callable[[Path, dict], Bad]:
    def build(folder: Path, state: dict) -> Bad:
        header, data = split(state)
        header[TENSOR].update(changes)
        return Bad(write_raw(folder / "bad.safetensors", header, data), folder / "bad.safetensors", TENSOR)

    return build


def _header_too_long(folder: Path, state: dict) -> Bad:
    header, data = split(state)
    path = write_raw(folder / "bad.safetensors", header, data, length=10**6)
    return Bad(path, path)


def _truncated_data(folder: Path, state: dict) -> Bad:
    header, data = split(state)
    last = max((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][1])
    path = write_raw(folder / "bad.safetensors", header, data[:-10])
    return Bad(path, path, last)


def _overlapping(folder: Path, state: dict) -> Bad:
    header, data = split(state)  # two (6,) float32 tensors made to share the same bytes
    header["layer.0.norm.weight"]["data_offsets"] = header["layer.0.attn.bias"]["data_offsets"]
    path = write_raw(folder / "bad.safetensors", header, data)
    return Bad(path, path, "layer.0.norm.weight")


def _index_missing_shard(folder: Path, state: dict) -> Bad:
    model = write_sharded(state, folder / "sharded", max_shard_bytes=150)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][TENSOR]
    (model / shard).unlink()
    first = next(n for n, s in index["weight_map"].items() if s == shard)  # the tensor the error names
    return Bad(model, model / "model.safetensors.index.json", first)


def _index_wrong_shard(folder: Path, state: dict) -> Bad:
    model = write_sharded(state, folder / "sharded", max_shard_bytes=150)
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map = index["weight_map"]  # swap two tensors' shards: every shard is still listed
    weight_map["embed.weight"], weight_map[TENSOR] = weight_map[TENSOR], weight_map["embed.weight"]
    index_path.write_text(json.dumps(index))
    return Bad(model, index_path, "embed.weight")  # the first of the two in the index


def _index_missing_key(folder: Path, state: dict) -> Bad:
    model = write_sharded(state, folder / "sharded", max_shard_bytes=150)
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"].pop("head.scale")  # its shard holds other listed tensors too
    index_path.write_text(json.dumps(index))
    return Bad(model, model / shard, "head.scale")


def _empty_index(folder: Path, state: dict) -> Bad:
    model = write_sharded(state, folder / "sharded", max_shard_bytes=150)
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    return Bad(model, model / "model.safetensors.index.json")


def _listed_twice(folder: Path, state: dict) -> Bad:
    # the tensor listed again at the end, pointing at bytes appended to the data: json.loads keeps the
    # last entry, the safetensors library refuses the file (the first entry's bytes belong to no tensor)
    header, data = split(state)
    entry = dict(header[TENSOR], data_offsets=[len(data), len(data) + header[TENSOR]["data_offsets"][1]
                                               - header[TENSOR]["data_offsets"][0]])
    body = json.dumps(header)[:-1] + f', "{TENSOR}": {json.dumps(entry)}}}'
    appended = torch.full(state[TENSOR].shape, 7.0).numpy().tobytes()
    path = write_raw(folder / "bad.safetensors", body.encode(), data + appended)
    return Bad(path, path, TENSOR)


def _gap(folder: Path, state: dict) -> Bad:
    header, data = split(state)  # the last tensor moved 8 bytes on: 8 bytes before it belong to no tensor
    last = max((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][1])
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin + 8, end + 8]
    path = write_raw(folder / "bad.safetensors", header, data[:begin] + bytes(8) + data[begin:])
    return Bad(path, path, last)


def _header_over_limit(folder: Path, state: dict) -> Bad:
    path = folder / "bad.safetensors"  # sparse: the header claims 1 byte over 100 MB, and the file holds it
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", 100_000_001) + b"{")
        handle.truncate(8 + 100_000_001)
    return Bad(path, path)


class Exploit:
    """Unpickling this runs a shell command: the loader must refuse it without running it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pickle_exploit(folder: Path, state: dict) -> Bad:
    path = folder / "bad.bin"
    torch.save({**state, "evil": Exploit(folder / MARKER)}, path)
    return Bad(path, path)


def _truncated_zip(folder: Path, state: dict) -> Bad:
    path = folder / "bad.bin"
    torch.save(state, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return Bad(path, path)


def _bin_bytes(data: bytes) -> Callable[[Path, dict], Bad]:
    def build(folder: Path, state: dict) -> Bad:
        path = folder / "bad.bin"
        path.write_bytes(data)
        return Bad(path, path)

    return build


def _not_a_tensor(folder: Path, state: dict) -> Bad:
    path = folder / "bad.pt"
    torch.save({**state, TENSOR: {"nested": state[TENSOR]}}, path)
    return Bad(path, path, TENSOR)


STRICTER = {"key listed twice in __metadata__"}  # refused here, read by the safetensors library

CASES = {
    "header length beyond the file": Case(_header_too_long, "truncated safetensors header"),
    "header not JSON": Case(lambda f, s: _whole(f, b"{not json", b"x" * 8), "not JSON"),
    "header JSON not an object": Case(lambda f, s: _whole(f, b"[1, 2, 3]", b""), "not a JSON object"),
    "shorter than a header": Case(lambda f, s: _whole(f, b"", b"", raw=b"abc"), "shorter than 8 bytes"),
    "unknown dtype": Case(_edit_entry(dtype="F31"), "unsupported dtype 'F31'"),
    "dtype not a string": Case(_edit_entry(dtype=["F32"]), "unsupported dtype"),
    "shape does not match offsets": Case(_edit_entry(shape=[8, 7]), "bytes stored for shape (8, 7)"),
    "negative shape": Case(_edit_entry(shape=[-8, -6]), "corrupt shape"),
    "offsets not a pair": Case(_edit_entry(data_offsets=[0]), "corrupt data_offsets"),
    "truncated data section": Case(_truncated_data, "file is truncated"),
    "overlapping offsets": Case(_overlapping, "overlaps tensor 'layer.0.attn.bias'"),
    "tensor listed twice": Case(_listed_twice, "tensor listed twice"),
    "key listed twice in __metadata__": Case(
        lambda f, s: _whole(f, b'{"__metadata__": {"format": "pt", "format": "np"}}', b""), "'format' listed twice"),
    "__metadata__ value not a string": Case(
        lambda f, s: _whole(f, json.dumps({"__metadata__": {"epochs": 3}}).encode(), b""), "must map strings to strings"),
    "__metadata__ a list": Case(lambda f, s: _whole(f, b'{"__metadata__": []}', b""), "must map strings to strings"),
    "bytes between tensors": Case(_gap, "8 bytes after tensor"),
    "bytes after the last tensor": Case(lambda f, s: _whole(f, *_appended(s)), "8 bytes after the last tensor"),
    "header not UTF-8": Case(lambda f, s: _whole(f, b'{"__metadata__": {"k": "\xe9"}}', b""), "not UTF-8"),
    "header in UTF-16": Case(lambda f, s: _whole(f, json.dumps(split(s)[0]).encode("utf-16-le"), split(s)[1]),
                             "not JSON"),
    "NaN in the header": Case(lambda f, s: _whole(f, *_nan_field(s)), "not JSON"),
    "empty header": Case(lambda f, s: _whole(f, b"", b""), "not JSON"),
    "header over 100 MB": Case(_header_over_limit, "over the format's limit of 100000000"),
    "index names a missing shard": Case(_index_missing_shard, "missing shard"),
    "index names the wrong shard": Case(_index_wrong_shard, "index says"),
    "shard tensor missing from index": Case(_index_missing_key, "not in the index"),
    "index lists no tensors": Case(_empty_index, "lists no tensors"),
    "pickle needing code execution": Case(_pickle_exploit, "refusing to unpickle"),
    "random bytes as a .bin": Case(_bin_bytes(bytes((i * 167 + 13) % 256 for i in range(4096))),
                                   "not a valid torch checkpoint (neither a zip archive"),
    "text as a .bin": Case(_bin_bytes(b"hello, this is not a checkpoint\n" * 8), "not a valid torch checkpoint"),
    "empty .bin": Case(_bin_bytes(b""), "not a valid torch checkpoint (empty file)"),
    "pickle with an unknown opcode": Case(_bin_bytes(b"\x80\x02\xff\xff"), "corrupt torch checkpoint (unreadable pickle"),
    "truncated .bin zip": Case(_truncated_zip, "corrupt or truncated torch checkpoint"),
    "non-tensor value in a .pt": Case(_not_a_tensor, "not a tensor"),
}


def _nan_field(state: dict) -> tuple[bytes, bytes]:
    header, data = split(state)  # an extra field of an entry (ignored by both readers) holding NaN
    header[TENSOR]["scale"] = float("nan")
    return json.dumps(header).encode(), data


def _appended(state: dict) -> tuple[bytes, bytes]:
    header, data = split(state)
    return json.dumps(header).encode(), data + bytes(8)


def _whole(folder: Path, header: bytes, data: bytes, raw: bytes | None = None) -> Bad:
    path = folder / "bad.safetensors"
    if raw is not None:
        path.write_bytes(raw)
    else:
        write_raw(path, header, data)
    return Bad(path, path)
