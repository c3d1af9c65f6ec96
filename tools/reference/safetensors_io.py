"""Read and write .safetensors files with the standard library and torch only.

The format: an 8-byte little-endian unsigned header length N, then N bytes of JSON, then the tensor data.
The JSON maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}, offsets counted from
the first byte after the header; an optional "__metadata__" entry maps strings to strings.
Tensor data is little-endian and row-major. Only the dtypes a LLaDA checkpoint uses are handled.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import sys

import torch

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

if sys.byteorder != "little":
    raise RuntimeError("safetensors_io assumes a little-endian machine")


def read_header(path: str) -> tuple[dict, int]:
    """Returns (header without __metadata__ folded in, byte offset where the data starts)."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path}: too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        size = os.fstat(f.fileno()).st_size
        if header_len > size - 8:
            raise ValueError(f"{path}: header length {header_len} exceeds the file size {size}")
        header = json.loads(f.read(header_len).decode("utf-8"))
    return header, 8 + header_len


def load(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Loads every tensor of one file in its stored dtype. Returns (tensors, metadata).

    The file is memory-mapped copy-on-write, so a tensor's pages are read only when it is used.
    """
    header, data_start = read_header(path)
    metadata = header.pop("__metadata__", None) or {}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        # ACCESS_COPY gives a writable view (torch.frombuffer wants one) without writing to the file.
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 0 else b""
    tensors: dict[str, torch.Tensor] = {}
    for name, entry in header.items():
        dtype_name = entry["dtype"]
        if dtype_name not in DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {dtype_name}")
        dtype = DTYPES[dtype_name]
        shape = [int(d) for d in entry["shape"]]
        begin, end = (int(o) for o in entry["data_offsets"])
        count = 1
        for d in shape:
            count *= d
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end - begin != count * itemsize or data_start + end > size or begin > end:
            raise ValueError(f"{path}: tensor {name} has offsets {begin}..{end} that do not fit shape {shape}")
        if count == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=data_start + begin)
        tensors[name] = flat.reshape(shape)
    return tensors, metadata


def save(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Writes tensors (F32, BF16 or F16) in the given order, data packed back to back."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs = []
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name}: unsupported dtype {tensor.dtype}")
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # Pad the header with spaces so the data starts 8-byte aligned (what the reference writer does too).
    header_bytes += b" " * (-(8 + len(header_bytes)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for blob in blobs:
            f.write(blob)


def load_dir(model_dir: str) -> dict[str, torch.Tensor]:
    """Loads model.safetensors, or every shard named by model.safetensors.index.json."""
    single = os.path.join(model_dir, "model.safetensors")
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_tensors, _ = load(os.path.join(model_dir, shard))
            for name, tensor in shard_tensors.items():
                if weight_map.get(name) != shard:
                    raise ValueError(f"{shard}: tensor {name} is not mapped to this shard by the index")
                tensors[name] = tensor
        missing = set(weight_map) - set(tensors)
        if missing:
            raise ValueError(f"{model_dir}: tensors named by the index but absent: {sorted(missing)[:5]}")
        return tensors
    if os.path.exists(single):
        return load(single)[0]
    raise FileNotFoundError(f"{model_dir}: neither model.safetensors nor model.safetensors.index.json")


def save_sharded(model_dir: str, shards: list[dict[str, torch.Tensor]], metadata: dict[str, str] | None = None) -> None:
    """Writes model-0000k-of-0000n.safetensors files and the index that maps each tensor to its shard."""
    count = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards, start=1):
        file_name = f"model-{k:05d}-of-{count:05d}.safetensors"
        save(os.path.join(model_dir, file_name), shard, metadata)
        for name, tensor in shard.items():
            weight_map[name] = file_name
            total += tensor.numel() * tensor.element_size()
    with open(os.path.join(model_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        f.write("\n")
