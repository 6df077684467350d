"""A fast GGUF header reader: metadata values and tensor views over a memory map.

gguf-py's ``GGUFReader`` builds a numpy view for every part of every metadata item,
which takes seconds for a 49k-token vocabulary and 49k merges (3 s for the default
SmolLM2 file, paid by each process that opens it: the API server and its engine
process both do). This reads the same header with ``struct`` and steps over arrays of
strings without building them (they are decoded only if asked for), and gives the
tensors the same views gguf-py does (``name``, ``tensor_type``, ``shape`` in GGUF order,
``data`` shaped like gguf-py's). Little-endian files only: anything else it can't read
raises ``UnsupportedGGUF`` and the caller falls back to gguf-py.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

_MAGIC = b"GGUF"
# GGUF value type -> struct format of one scalar
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}  # fmt: skip
_STRING, _ARRAY = 8, 9
_NP_TYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8,
             "I16": np.int16, "I32": np.int32, "I64": np.int64}  # fmt: skip


class UnsupportedGGUF(Exception):
    """This reader can't read the file (big-endian, an unknown version or type)."""


class _Strings:
    """An array of strings left in the file until someone reads it."""

    def __init__(self, buf: memoryview, offset: int, count: int) -> None:
        self.buf, self.offset, self.count = buf, offset, count

    def decode(self) -> list[str]:
        out, offs = [], self.offset
        for _ in range(self.count):
            (n,) = struct.unpack_from("<Q", self.buf, offs)
            out.append(bytes(self.buf[offs + 8 : offs + 8 + n]).decode("utf-8", "replace"))
            offs += 8 + n
        return out


class Field:
    """One metadata item: ``contents()`` is its value (like gguf-py's ReaderField);
    ``data`` has one entry per array item, so ``len(field.data)`` counts them."""

    def __init__(self, value: Any, count: int = 1) -> None:
        self._value = value
        self.data = range(count)

    def contents(self) -> Any:
        if isinstance(self._value, _Strings):
            self._value = self._value.decode()
        return self._value


@dataclass
class Tensor:
    name: str
    tensor_type: Any
    """gguf.GGMLQuantizationType"""
    shape: np.ndarray
    """Dimensions in GGUF order (innermost first), as gguf-py gives them."""
    n_elements: int
    n_bytes: int
    data_offset: int
    data: np.ndarray


class GGUFIndex:
    def __init__(self, path: str) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        self.data = np.memmap(path, mode="r")
        buf = memoryview(self.data)  # type: ignore[arg-type]
        if bytes(buf[:4]) != _MAGIC:
            raise UnsupportedGGUF("GGUF magic invalid")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):  # 0 in the low bytes: a big-endian file
            raise UnsupportedGGUF(f"GGUF version {version}")
        offs = 24
        self.fields: dict[str, Field] = {}

        def string(o: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", buf, o)
            return bytes(buf[o + 8 : o + 8 + n]).decode("utf-8"), o + 8 + n

        def value(kind: int, o: int) -> tuple[Any, int, int]:
            if kind in _SCALARS:
                fmt = "<" + _SCALARS[kind]
                return struct.unpack_from(fmt, buf, o)[0], o + struct.calcsize(fmt), 1
            if kind == _STRING:
                s, o = string(o)
                return s, o, 1
            if kind != _ARRAY:
                raise UnsupportedGGUF(f"GGUF value type {kind}")
            item, count = struct.unpack_from("<IQ", buf, o)
            o += 12
            if item in _SCALARS:
                dtype = np.dtype("<" + _SCALARS[item])
                arr = np.frombuffer(buf, dtype, count, o)
                return arr.tolist(), o + dtype.itemsize * count, count
            if item == _STRING:
                start = o
                for _ in range(count):  # step over them: lengths only
                    (n,) = struct.unpack_from("<Q", buf, o)
                    o += 8 + n
                return _Strings(buf, start, count), o, count
            raise UnsupportedGGUF(f"GGUF array of type {item}")

        for _ in range(n_kv):
            key, offs = string(offs)
            (kind,) = struct.unpack_from("<I", buf, offs)
            v, offs, count = value(kind, offs + 4)
            self.fields[key] = Field(v, count)

        infos = []
        for _ in range(n_tensors):
            name, offs = string(offs)
            (n_dims,) = struct.unpack_from("<I", buf, offs)
            dims = np.frombuffer(buf, "<u8", n_dims, offs + 4).copy()
            offs += 4 + 8 * n_dims
            kind, rel = struct.unpack_from("<IQ", buf, offs)
            offs += 12
            infos.append((name, dims, kind, rel))
        align_field = self.fields.get("general.alignment")
        align = int(align_field.contents()) if align_field is not None else 32
        if align <= 0 or align & (align - 1):
            raise UnsupportedGGUF(f"GGUF alignment {align}")
        start = (offs + align - 1) // align * align
        self.data_offset = start

        self.tensors: list[Tensor] = []
        for name, dims, kind, rel in infos:
            qtype = GGMLQuantizationType(kind)
            n_elems = int(np.prod(dims))
            block, size = GGML_QUANT_SIZES[qtype]
            n_bytes = n_elems * size // block
            np_dims = tuple(reversed(dims.tolist()))
            item = _NP_TYPES.get(qtype.name, np.uint8)
            if item is np.uint8:
                np_dims = quant_shape_to_byte_shape(np_dims, qtype)
            at = start + int(rel)
            if at + n_bytes > len(self.data):
                raise ValueError(f"GGUF tensor {name} runs past the end of the file")
            view = self.data[at : at + n_bytes].view(item).reshape(np_dims)
            self.tensors.append(Tensor(name, qtype, dims, n_elems, n_bytes, at, view))
