"""A GGUF v3 file read with numpy (topic 1.5): header, metadata, tensor infos, tensor bytes memory-mapped.

The layout (ggml's docs/gguf.md), all little-endian:
  magic "GGUF", version u32, tensor count u64, metadata count u64,
  metadata: key (string), value type u32, value; a string is a u64 length and UTF-8 bytes,
  an array an element type u32, a u64 count and the elements;
  tensor infos: name, n_dims u32, dims u64 each (innermost first), ggml type u32, offset u64;
  padding to `general.alignment` (32), then the data, each tensor at its offset from there.
mx.load reads only F32/F16/BF16/Q4_0/Q4_1/Q8_0; this reader reads any file whose tensor
types impl.gguf_quants decodes, k-quants included.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from impl.errors import TinyLLMError

# ggml type id -> (name, values per block, bytes per block)
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 30: ("BF16", 1, 2),
}
# Types a GGUF may hold that this reader does not decode, named in the error.
OTHER_TYPES = {9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
               19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16",
               26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}

# metadata value type -> numpy dtype (8: string, 9: array are read apart)
_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
            10: "<u8", 11: "<i8", 12: "<f8"}
_BOOL, _STRING, _ARRAY = 7, 8, 9


@dataclass
class GGUFTensor:
    """One tensor: its ggml type name, shape (outermost first, as numpy) and raw bytes (memory-mapped)."""

    name: str
    type: str
    shape: tuple[int, ...]
    data: np.ndarray  # uint8, (rows, bytes per row) where rows = prod(shape[:-1])


class _Cursor:
    """Reads little-endian values from a byte buffer; running past its end means a truncated file."""

    def __init__(self, buf: np.ndarray, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> np.ndarray:
        if n < 0 or self.pos + n > len(self.buf):
            raise TinyLLMError(f"{self.path} is truncated or corrupt: the header runs past the end of the file")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, kind: int):
        dtype = np.dtype(_SCALARS[kind])
        v = self.take(dtype.itemsize).view(dtype)[0].item()
        return bool(v) if kind == _BOOL else v

    def u32(self) -> int:
        return self.scalar(4)

    def u64(self) -> int:
        return self.scalar(10)

    def string(self) -> str:
        raw = self.take(self.u64()).tobytes()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise TinyLLMError(f"{self.path} is corrupt: a string at byte {self.pos} is not UTF-8") from None

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, n = self.u32(), self.u64()
            if item == _STRING:
                return [self.string() for _ in range(n)]
            if item in _SCALARS:  # numbers: one numpy array, no per-element loop
                dtype = np.dtype(_SCALARS[item])
                arr = self.take(n * dtype.itemsize).view(dtype)
                return arr.astype(bool) if item == _BOOL else arr
            if item == _ARRAY:
                return [self.value(_ARRAY) for _ in range(n)]
            kind = item  # an unknown element type: reported below
        if kind not in _SCALARS:
            raise TinyLLMError(f"{self.path} is corrupt: unknown metadata value type {kind} at byte {self.pos}")
        return self.scalar(kind)


def read_gguf_file(path: str | Path) -> tuple[dict[str, GGUFTensor], dict]:
    """(tensors by GGUF name, metadata key -> value): scalars as Python values, numeric arrays
    as numpy arrays, string arrays as lists. Tensor bytes stay on disk (np.memmap) until used."""
    path = Path(path)
    if not path.is_file():
        raise TinyLLMError(f"model file not found: {path}")
    buf = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    c = _Cursor(buf, path)
    if buf[:4].tobytes() != b"GGUF":
        raise TinyLLMError(f"{path} is not a GGUF file (no GGUF magic at its start)")
    c.take(4)
    version = c.u32()
    if version not in (2, 3):
        raise TinyLLMError(f"{path}: unsupported GGUF version {version}; supported: 2, 3")
    n_tensors, n_meta = c.u64(), c.u64()
    meta = {"GGUF.version": version}
    for _ in range(n_meta):
        key = c.string()
        meta[key] = c.value(c.u32())
    infos = [_tensor_info(c) for _ in range(n_tensors)]
    align = int(meta.get("general.alignment", 32))
    start = -(-c.pos // align) * align  # the data section, aligned
    return {name: _tensor(buf, path, name, dims, t, start + off) for name, dims, t, off in infos}, meta


def _tensor_info(c: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    name = c.string()
    n_dims = c.u32()
    if n_dims > 4:
        raise TinyLLMError(f"{c.path} is corrupt: tensor {name} has {n_dims} dimensions (at most 4)")
    dims = tuple(c.u64() for _ in range(n_dims))
    return name, dims[::-1], c.u32(), c.u64()  # numpy order: outermost first


def _tensor(buf: np.ndarray, path: Path, name: str, shape: tuple[int, ...], type_id: int, at: int) -> GGUFTensor:
    if type_id not in GGML_TYPES:
        what = OTHER_TYPES.get(type_id, f"ggml type {type_id}")
        supported = ", ".join(t[0] for t in GGML_TYPES.values())
        raise TinyLLMError(f"{path}: tensor {name} has type {what}, which impl does not read; supported: {supported}")
    type_name, block, block_bytes = GGML_TYPES[type_id]
    inner = shape[-1] if shape else 1
    if inner % block:
        raise TinyLLMError(f"{path} is corrupt: tensor {name} {type_name} has rows of {inner} values,"
                           f" not a multiple of its block size {block}")
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    row_bytes = inner // block * block_bytes
    if at + rows * row_bytes > len(buf):
        raise TinyLLMError(f"{path} is truncated: tensor {name} runs past the end of the file"
                           f" (to byte {at + rows * row_bytes} of {len(buf)})")
    return GGUFTensor(name, type_name, shape, buf[at:at + rows * row_bytes].reshape(rows, row_bytes))

