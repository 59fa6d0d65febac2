"""Reading and writing .safetensors files with numpy, one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header that maps
each name to its dtype, shape and byte range, then the raw data. Reading it
here (rather than through torch) lets loaders stream tensor by tensor, read
only some rows of a fused tensor, handle bfloat16 through ml_dtypes, and turn
a truncated or foreign file into one clear error before any data is read.
"""

import json
import os
import struct

import ml_dtypes
import numpy as np

from glance_jax import safe_io
from glance_jax.errors import GlanceError

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class TensorInfo:
    """Where one tensor lives in a file: dtype, shape and absolute byte offset."""

    def __init__(self, name, dtype, shape, offset):
        self.name, self.dtype, self.shape, self.offset = name, dtype, tuple(shape), offset

    @property
    def nbytes(self):
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def refuse_pickle(path, head):
    """Raises if the first bytes of `path` are those of a pickle (protocol 2+) or a torch.save zip archive
    (asked only of a file whose first 8 bytes are no possible safetensors header length)."""
    kind = ("a pickle" if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") else
            "a zip archive, torch.save's format with a pickle inside" if head[:4] == b"PK\x03\x04" else None)
    if kind:
        raise GlanceError(f"{path} is not a safetensors file but {kind} (.bin / .pt / .ckpt): a pickle can run any "
                          "code when it is loaded, so glance_jax never reads one; convert it to .safetensors with "
                          "a tool you trust")


def _int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(path, name, entry, data_size):
    """(dtype, shape, (begin, end)) of one header entry, every field type- and range-checked."""
    bad = lambda why: GlanceError(f"{path} is not a safetensors file: tensor {name!r} {why}")
    if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
        raise bad(f"has a bad or unsupported entry ({str(entry)[:80]})")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(_int(d) and d >= 0 for d in shape):
        raise bad(f"has the shape {str(shape)[:80]}: a list of integers >= 0 is needed")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_int(x) and 0 <= x for x in offsets):
        raise bad(f"has the data_offsets {str(offsets)[:80]}: two integers >= 0 are needed")
    count = 1
    for d in shape:
        count *= d
    if count * DTYPES[entry["dtype"]].itemsize > data_size:
        raise bad(f"of shape {tuple(shape)} is larger than the whole file")
    return DTYPES[entry["dtype"]], shape, tuple(offsets)


def _metadata(path, metadata):
    """The `__metadata__` mapping, which the format defines as strings to strings."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise GlanceError(f"{path} is not a safetensors file: its __metadata__ must map strings to strings")
    return metadata


class SafetensorsFile:
    """A validated view of one .safetensors file; tensors are read on demand."""

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise GlanceError(f"{self.path}: no such file")
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                refuse_pickle(self.path, head)
                raise GlanceError(f"{self.path} is not a safetensors file: only {size} bytes long")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(_MAX_HEADER, size - 8):
                refuse_pickle(self.path, head)  # a header length that cannot be: say what the file is
                raise GlanceError(
                    f"{self.path} is not a safetensors file (or is truncated): header length {header_len} "
                    f"does not fit a file of {size} bytes")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise GlanceError(f"{self.path} is not a safetensors file: unreadable header ({e})") from None
        if not isinstance(header, dict):
            raise GlanceError(f"{self.path} is not a safetensors file: header is not a JSON object")
        self.metadata = _metadata(self.path, header.pop("__metadata__", None))
        data_start, data_size = 8 + header_len, size - 8 - header_len
        self.tensors = {}
        for name, entry in header.items():
            dtype, shape, (begin, end) = _entry(self.path, name, entry, data_size)
            info = TensorInfo(name, dtype, shape, data_start + begin)
            if end - begin != info.nbytes or begin < 0:
                raise GlanceError(f"{self.path}: tensor {name!r} has {end - begin} bytes for shape {tuple(shape)}")
            if end > data_size:
                raise GlanceError(
                    f"{self.path} is truncated: tensor {name!r} ends at byte {data_start + end}, "
                    f"the file has {size}")
            self.tensors[name] = info

    def keys(self):
        return self.tensors.keys()

    def read(self, name, rows=None):
        """Reads tensor `name` (or rows [start, stop) of its first axis) into a new array."""
        info = self.tensors[name]
        shape = info.shape
        offset, count = info.offset, int(np.prod(shape, dtype=np.int64))
        if rows is not None:
            start, stop = rows
            row = int(np.prod(shape[1:], dtype=np.int64))
            offset += start * row * info.dtype.itemsize
            count = (stop - start) * row
            shape = (stop - start, *shape[1:])
        out = np.empty(count, info.dtype)
        with open(self.path, "rb") as f:
            f.seek(offset)
            n = f.readinto(memoryview(out.view(np.uint8)))
        if n != out.nbytes:
            raise GlanceError(f"{self.path} is truncated: could not read tensor {name!r}")
        return out.reshape(shape)


def save_file(tensors, path, metadata=None):
    """Writes a dict of numpy arrays as .safetensors; the file appears whole or not at all."""
    header, offset = {}, 0
    arrays = {}
    for name in sorted(tensors):
        a = np.asarray(tensors[name], order="C")  # (ascontiguousarray would turn a scalar into shape (1,))
        if a.dtype not in DTYPE_NAMES:
            raise GlanceError(f"cannot store {name!r}: dtype {a.dtype} has no safetensors name")
        header[name] = {"dtype": DTYPE_NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        arrays[name] = a
        offset += a.nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with safe_io.atomic_file(path) as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in header:
            if name != "__metadata__":
                f.write(memoryview(arrays[name].reshape(-1).view(np.uint8)))
