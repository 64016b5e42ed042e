"""Files on disk, one policy: never half-written, checksummed where they are read back, keyed by fingerprints.

Every write goes to ``.{name}.{pid}.tmp`` in the target's folder (parallel jobs may share a cache
folder), is fsynced, then renamed over the target with os.replace: a reader sees the old file or
the new one, never a mix, and a failure mid-write leaves the old file as it was.

Checksummed files (`save_checked` / `load_checked`) hold ``{"payload": uint8 tensor, "sha256": hex}``
where the payload is the bytes of ``torch.save(obj)``; both layers load with ``weights_only=True``.
Fingerprints (`model_fingerprint`, `data_fingerprint`, `hash_parts`, `cache_key`) name cached
results: they must not change between versions, or every cache goes stale.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

import torch

__all__ = [
    "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_torch_save", "save_checked", "load_checked",
    "hash_parts", "file_digest", "model_fingerprint", "data_fingerprint", "cache_key", "network_digest", "betas_digest",
]  # fmt: skip


def _atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, doc: Any) -> None:
    """Write ``doc`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(doc, indent=2))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save ``obj`` to ``path`` atomically."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_checked(obj: Any, path: str | Path) -> None:
    """torch.save ``obj`` with a sha256 of its bytes, atomically; read it back with `load_checked`."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    atomic_torch_save(
        {"payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8), "sha256": _sha256(payload)}, path
    )


def load_checked(path: str | Path) -> Any:
    """The object `save_checked` wrote (tensors on the CPU); ValueError if the file is missing, unreadable or
    altered."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{str(path)!r} does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        payload = bytes(blob["payload"].numpy().tobytes())
        expected = blob["sha256"]
    except Exception as e:
        raise ValueError(f"{str(path)!r} is not a checksummed file ({type(e).__name__})") from None
    if _sha256(payload) != expected:
        raise ValueError(f"{str(path)!r} fails its checksum (the file was altered or damaged)")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{str(path)!r} holds a payload that cannot be read ({type(e).__name__})") from None


def hash_parts(**parts: Any) -> str:
    """sha256 of the parts as sorted JSON (values JSON cannot hold are written with str)."""
    return _sha256(json.dumps(parts, sort_keys=True, default=str).encode())


def file_digest(path: str | Path | None) -> str | None:
    """sha256 of a file's bytes (None for no path or no file)."""
    if not path or not Path(path).is_file():
        return None
    return _sha256(Path(path).read_bytes())


def _hash_weights(h, model, shapes: bool) -> None:
    """Feed the network's state-dict tensors (in order, with their dtype and shape if ``shapes``) to ``h``."""
    for value in model.net.state_dict().values() if isinstance(model.net, torch.nn.Module) else []:
        if shapes:
            h.update(str((value.dtype, tuple(value.shape))).encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())


def weights_fingerprint(model) -> str:
    """sha256 of a DiffusionModel's network weights and betas only (not its conventions): what a Gamma file is for."""
    h = hashlib.sha256()
    _hash_weights(h, model, shapes=False)
    h.update(model.schedule.betas.numpy().tobytes())
    return h.hexdigest()


def network_digest(model) -> str | None:
    """sha256 of a DiffusionModel's network weights only (shapes and values in order, floats as float64): which
    weights a schedule file was made with. A lossless cast (float32 -> float64) keeps it; None for a network with no
    tensors to hash (a plain function)."""
    net = model.net
    state = net.state_dict() if isinstance(net, torch.nn.Module) else {}
    if not state:
        return None
    h = hashlib.sha256()
    for value in state.values():
        value = value.detach().cpu()
        h.update(str(tuple(value.shape)).encode())
        h.update((value.double() if value.is_floating_point() else value).contiguous().numpy().tobytes())
    return h.hexdigest()


def betas_digest(betas: torch.Tensor) -> str:
    """sha256 of the betas as float64 bytes: which noise schedule a schedule file was made for."""
    return _sha256(torch.as_tensor(betas).detach().cpu().double().contiguous().numpy().tobytes())


def model_fingerprint(model) -> str:
    """sha256 of a DiffusionModel's weights (in order, whatever wraps the network), conventions and betas."""
    h = hashlib.sha256()
    _hash_weights(h, model, shapes=True)
    h.update(model.extra_repr().encode())
    h.update(model.schedule.betas.numpy().tobytes())
    if getattr(model, "gamma", None) is not None:  # a given Gamma (analytic variance) changes every term
        h.update(model.gamma.numpy().tobytes())
    return h.hexdigest()


def data_fingerprint(batches: Iterable[tuple]) -> str:
    """sha256 of indexed batches (start, x0[, labels]): the examples, their values, labels and global indices."""
    h = hashlib.sha256()
    for start, x0, *labels in batches:
        h.update(str((start, tuple(x0.shape))).encode())
        h.update(x0.detach().cpu().contiguous().numpy().tobytes())
        if labels and labels[0] is not None:  # a conditional model's labels (unlabelled data keeps its old hash)
            h.update(labels[0].detach().cpu().long().contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_key(model, **parts: Any) -> str:
    """sha256 of the model's weights and conventions and of what the estimate depends on."""
    return hash_parts(model=model_fingerprint(model), **parts)
