"""Image arrays that stay on disk: memory-mapped .npy / uncompressed .npz members, a checked conversion cache
for compressed .npz and for the official downsampled-ImageNet pickled batches (imagenet.py), and a pickle reader
that only rebuilds numpy arrays (user files are data, never code).

Several processes that map the same file share its pages, so DDP does not multiply the data in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

CHUNK_BYTES = 1 << 26  # conversion copies 64 MB at a time
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}  # fmt: skip


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, numbers and numpy arrays only; anything else (code) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are read from data files")


def load_pickle(path: str | Path) -> Any:
    """A pickled data file (CIFAR-10 / downsampled-ImageNet batches) read as data: numpy arrays, lists, dicts."""
    with open(path, "rb") as f:
        try:
            return _ArrayUnpickler(f, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as e:
            raise ValueError(f"{str(path)!r} is not a pickled batch of arrays ({e}); download the file again") from None


def map_npy(path: str | Path) -> np.ndarray:
    """A read-only memory map of an .npy file (pages are read when touched and shared between processes)."""
    return np.load(path, mmap_mode="r")


def map_npz_member(path: str | Path, key: str) -> np.ndarray | None:
    """A memory map of one member of an uncompressed .npz (None if the member is compressed)."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{key}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        f.seek(info.header_offset + 30 + name_len + extra_len)
        shape, fortran, dtype = _npy_header(f)
        offset = f.tell()
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy header at the file's position; the position moves to the data."""
    major, _ = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return read(f)


def npz_keys(path: str | Path) -> list[str]:
    with zipfile.ZipFile(path) as zf:
        return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]


def signature(paths: Iterable[Path], samples: int = 16, block: int = 1 << 16) -> dict[str, Any]:
    """Name, size and a sampled sha256 (``samples`` blocks spread over the file) of each source file: cheap to
    recompute on every open, and it changes when a file is replaced, truncated or rewritten."""
    out = {}
    for path in paths:
        size = path.stat().st_size
        h = hashlib.sha256(str(size).encode())
        with open(path, "rb") as f:
            for k in range(samples):
                f.seek(max(0, (size - block) * k // max(samples - 1, 1)))
                h.update(f.read(block))
        out[path.name] = {"size": size, "sampled_sha256": h.hexdigest()}
    return out


def cached_array(
    cache: Path, sources: list[Path], shape: tuple[int, ...], dtype: np.dtype, fill: Callable[[np.ndarray], None]
) -> np.ndarray:
    """The memory-mapped cache ``cache`` (.npy) of an array converted from ``sources``: written once by
    ``fill(out)`` into a temporary file and renamed (never half-written), then checked against its sources
    on every open (their sizes and sampled checksums, and the cache's own size)."""
    found = _open_cache(cache, sources, dtype, list(shape))
    if found is not None:
        return found
    want = signature(sources)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        fill(out)
        out.flush()
        del out
        os.replace(tmp, cache)
    finally:
        tmp.unlink(missing_ok=True)
    return _publish(cache, want, list(shape), dtype)


def cached_rows(
    cache: Path,
    sources: list[Path],
    row_shape: tuple[int, ...],
    dtype: np.dtype,
    rows: Callable[[], Iterable[np.ndarray]],
) -> np.ndarray:
    """`cached_array` for an array whose number of rows is known only once its sources are read: the blocks of
    ``rows()`` are written one after the other (each source read once), and the .npy header, written first with
    room to spare, gets the final row count at the end."""
    found = _open_cache(cache, sources, dtype, None, list(row_shape))
    if found is not None:
        return found
    want = signature(sources)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    n = 0
    try:
        with open(tmp, "wb") as f:
            f.write(_npy_header_bytes(dtype, (0, *row_shape)))
            for block in rows():
                block = np.ascontiguousarray(block, dtype=dtype).reshape(-1, *row_shape)
                f.write(memoryview(block).cast("B"))
                n += len(block)
            f.seek(0)
            f.write(_npy_header_bytes(dtype, (n, *row_shape)))
        os.replace(tmp, cache)
    finally:
        tmp.unlink(missing_ok=True)
    return _publish(cache, want, [n, *row_shape], dtype)


def _npy_header_bytes(dtype: np.dtype, shape: tuple[int, ...], length: int = 128) -> bytes:
    """A version 1.0 .npy header of exactly ``length`` bytes (so that it can be rewritten in place)."""
    text = f"{{'descr': {np.dtype(dtype).str!r}, 'fortran_order': False, 'shape': {tuple(shape)!r}, }}"
    body = text.ljust(length - 11) + "\n"
    if len(body) + 10 != length:
        raise ValueError(f"an .npy header for shape {shape} does not fit in {length} bytes")
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode("latin1")


def _open_cache(
    cache: Path, sources: list[Path], dtype: np.dtype, shape: list[int] | None, row_shape: list[int] | None = None
) -> np.ndarray | None:
    """The cache mapped, after checking it against its sources and itself; None when there is none yet."""
    meta = cache.with_suffix(".json")
    if not (cache.exists() and meta.exists()):
        return None
    have = json.loads(meta.read_text())
    shape_ok = have.get("shape") == shape if shape is not None else (have.get("shape") or [None])[1:] == row_shape
    if have.get("sources") != signature(sources) or not shape_ok or have.get("dtype") != np.dtype(dtype).str:
        raise ValueError(
            f"cache {str(cache)!r} does not match its source files {[p.name for p in sources]} (size or checksum); "
            "delete it (and its .json) to convert again"
        )
    array = map_npy(cache)
    if list(array.shape) != have["shape"] or cache.stat().st_size != have.get("bytes"):
        raise ValueError(
            f"cache {str(cache)!r} has {cache.stat().st_size} bytes, not the {have.get('bytes')} written; delete it to "
            "convert again"
        )
    return array


def _publish(cache: Path, sources: dict[str, Any], shape: list[int], dtype: np.dtype) -> np.ndarray:
    """Write the cache's .json (its sources' signature, shape, dtype and size) and map the cache."""
    meta = cache.with_suffix(".json")
    meta_tmp = meta.with_name(f".{meta.name}.tmp")
    meta_tmp.write_text(
        json.dumps({"sources": sources, "shape": shape, "dtype": np.dtype(dtype).str, "bytes": cache.stat().st_size})
    )
    os.replace(meta_tmp, meta)
    return map_npy(cache)


def decompress_npz_member(path: Path, key: str) -> np.ndarray:
    """A compressed .npz member as a memory-mapped .npy cache next to it (``<name>.<key>.npy``), converted once by
    streaming (never the whole array in memory)."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        shape, fortran, dtype = _npy_header(f)
    if fortran:
        raise ValueError(
            f"{str(path)!r} stores {key!r} in Fortran order; save it in C order (np.savez with a C-contiguous array)"
        )

    def fill(out: np.ndarray) -> None:
        flat = out.reshape(-1).view(np.uint8)
        with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
            _npy_header(f)
            done = 0
            while done < flat.size:
                chunk = f.read(min(CHUNK_BYTES, flat.size - done))
                if not chunk:
                    raise ValueError(f"{str(path)!r} ends inside {key!r}; the file is truncated: download it again")
                flat[done : done + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
                done += len(chunk)

    return cached_array(path.with_name(f"{path.stem}.{key}.npy"), [path], tuple(shape), dtype, fill)
