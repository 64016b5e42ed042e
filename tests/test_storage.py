"""storage.py: atomic writes leave the old file or the new one, checksums catch damage, fingerprints are stable."""

import hashlib
import io
import json
import os

import pytest
import torch
from conftest import quantized_data, tiny_model

from ddpm_schedules.storage import files as storage
from ddpm_schedules.storage.files import (
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    cache_key,
    data_fingerprint,
    file_digest,
    hash_parts,
    load_checked,
    model_fingerprint,
    save_checked,
)


def leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_atomic_writes_create_folders_and_leave_no_temporary_file(tmp_path):
    atomic_write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "a" / "t.txt", "héllo")
    atomic_write_json(tmp_path / "a" / "d.json", {"x": [1, 2]})
    atomic_torch_save({"w": torch.arange(3)}, tmp_path / "a" / "w.pt")
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "a" / "t.txt").read_text(encoding="utf-8") == "héllo"
    assert (tmp_path / "a" / "d.json").read_text() == json.dumps({"x": [1, 2]}, indent=2)
    assert torch.equal(torch.load(tmp_path / "a" / "w.pt", weights_only=True)["w"], torch.arange(3))
    assert leftovers(tmp_path / "a") == []


def test_a_failed_rename_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "doc.json"
    atomic_write_json(target, {"version": 1})

    def fail(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(storage.os, "replace", fail)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_json(target, {"version": 2})
    assert json.loads(target.read_text()) == {"version": 1}
    assert leftovers(tmp_path) == []


def test_an_object_that_cannot_be_saved_keeps_the_old_file(tmp_path):
    target = tmp_path / "cm.pt"
    save_checked({"a": torch.ones(2)}, target)
    before = target.read_bytes()
    with pytest.raises(Exception):
        atomic_torch_save({"f": lambda: 0}, target)  # a lambda does not pickle
    with pytest.raises(Exception):
        save_checked({"f": lambda: 0}, target)
    assert target.read_bytes() == before and leftovers(tmp_path) == []
    assert torch.equal(load_checked(target)["a"], torch.ones(2))


def test_the_temporary_file_lives_beside_the_target(tmp_path, monkeypatch):
    seen = []
    real = os.replace
    monkeypatch.setattr(storage.os, "replace", lambda src, dst: (seen.append((str(src), str(dst))), real(src, dst)))
    atomic_write_text(tmp_path / "x.txt", "x")
    assert seen == [(str(tmp_path / f".x.txt.{os.getpid()}.tmp"), str(tmp_path / "x.txt"))]


def test_checked_files_keep_their_format_and_catch_damage(tmp_path):
    path = tmp_path / "c.pt"
    obj = {"mean": torch.linspace(0, 1, 5, dtype=torch.float64), "count": 3}
    save_checked(obj, path)
    back = load_checked(path)
    assert torch.equal(back["mean"], obj["mean"]) and back["count"] == 3
    # the envelope every existing cache uses: a uint8 payload (torch.save bytes) and its sha256
    blob = torch.load(path, weights_only=True)
    assert set(blob) == {"payload", "sha256"} and blob["payload"].dtype == torch.uint8
    payload = blob["payload"].numpy().tobytes()
    assert hashlib.sha256(payload).hexdigest() == blob["sha256"]
    assert torch.load(io.BytesIO(payload), weights_only=True)["count"] == 3
    # one flipped byte in the payload
    blob["payload"][len(blob["payload"]) // 2] ^= 1
    torch.save(blob, tmp_path / "flipped.pt")
    with pytest.raises(ValueError, match="checksum"):
        load_checked(tmp_path / "flipped.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pt"):
        load_checked(tmp_path / "garbage.pt")
    with pytest.raises(ValueError, match="does not exist"):
        load_checked(tmp_path / "missing.pt")


def test_hash_parts_ignores_order_and_is_plain_sorted_json():
    assert hash_parts(a=1, b=[1, 2], c="x") == hash_parts(c="x", b=[1, 2], a=1)
    assert hash_parts(a=1, b=[1, 2]) != hash_parts(a=1, b=[2, 1])
    assert hash_parts(b=2, a=1) == hashlib.sha256(b'{"a": 1, "b": 2}').hexdigest()  # cache keys must never change


def test_file_digest(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"weights")
    assert file_digest(tmp_path / "w.bin") == hashlib.sha256(b"weights").hexdigest()
    assert file_digest(None) is None and file_digest(tmp_path / "nope.bin") is None


def test_fingerprints_follow_every_weight_and_example():
    model, other = tiny_model("fixed_small", T=6), tiny_model("fixed_small", T=6)
    assert model_fingerprint(model) == model_fingerprint(other)
    with torch.no_grad():
        next(other.net.parameters()).view(-1)[0] += 1e-6
    assert model_fingerprint(model) != model_fingerprint(other)
    assert cache_key(model, grid=[0, 6], seed=0) == hash_parts(model=model_fingerprint(model), grid=[0, 6], seed=0)
    assert cache_key(model, grid=[0, 6], seed=0) != cache_key(other, grid=[0, 6], seed=0)
    x = quantized_data(4)
    base = data_fingerprint([(0, x[:2]), (2, x[2:])])
    assert base == data_fingerprint([(0, x[:2].clone()), (2, x[2:].clone())])
    assert base != data_fingerprint([(1, x[:2]), (3, x[2:])])  # other global indices
    changed = x.clone()
    changed[3, 0, 0, 0] = -changed[3, 0, 0, 0] + 0.125
    assert base != data_fingerprint([(0, changed[:2]), (2, changed[2:])])
