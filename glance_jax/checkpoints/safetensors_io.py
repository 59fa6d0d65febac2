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
import threading

import ml_dtypes
import numpy as np

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
                raise GlanceError(f"{self.path} is not a safetensors file: only {size} bytes long")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(_MAX_HEADER, size - 8):
                raise GlanceError(
                    f"{self.path} is not a safetensors file (or is truncated): header length {header_len} "
                    f"does not fit a file of {size} bytes")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise GlanceError(f"{self.path} is not a safetensors file: unreadable header ({e})") from None
        if not isinstance(header, dict):
            raise GlanceError(f"{self.path} is not a safetensors file: header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        data_start, data_size = 8 + header_len, size - 8 - header_len
        self.tensors = {}
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = [int(d) for d in entry["shape"]]
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise GlanceError(
                    f"{self.path} is not a safetensors file: bad or unsupported entry for {name!r}") from None
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
    path = os.fspath(path)
    tmp = f"{path}.partial-{os.getpid()}-{threading.get_ident()}"  # one writer per name: processes, threads
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name in header:
                if name != "__metadata__":
                    f.write(memoryview(arrays[name].reshape(-1).view(np.uint8)))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
