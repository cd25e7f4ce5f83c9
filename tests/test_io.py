"""dti_fast.io: atomic writes, a real full disk, file modes, safe reads."""

from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path

import pytest
import torch
from _shared import small_tmpfs

from dti_fast.io import atomic_write, load_safetensors, load_torch, save_safetensors, save_torch, write_json


@pytest.mark.parametrize("writer", ["safetensors", "torch", "json"])
def test_a_real_full_disk_gives_enospc_with_the_fix_and_keeps_the_old_file(tmp_path, writer):
    with small_tmpfs(tmp_path) as disk:
        target = disk / f"out.{writer}"
        target.write_bytes(b"old")
        big = torch.ones(64, 1024)  # 256 KiB, four times the disk
        write = {
            "safetensors": lambda: save_safetensors({"x": big}, target),
            "torch": lambda: save_torch({"x": big}, target),
            "json": lambda: write_json({"x": "y" * (256 << 10)}, target),
        }[writer]
        with pytest.raises(OSError) as info:
            write()
        assert info.value.errno == errno.ENOSPC
        assert f"disk full while writing {target}" in str(info.value) and "--resume" in str(info.value)
        assert target.read_bytes() == b"old"
        assert sorted(p.name for p in disk.iterdir()) == [target.name]  # no temporary file left behind


def test_other_errors_pass_through_and_leave_no_temporary_file(tmp_path):
    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise KeyError("not a disk problem")

    with pytest.raises(KeyError):
        atomic_write(tmp_path / "f.txt", fail)
    assert list(tmp_path.iterdir()) == []


def test_written_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        for path in (
            save_safetensors({"x": torch.zeros(2)}, tmp_path / "a.safetensors"),
            save_torch({"x": torch.zeros(2)}, tmp_path / "b.pt"),
            write_json({}, tmp_path / "c.json"),
        ):
            assert (path.stat().st_mode & 0o777) == 0o644, path
    finally:
        os.umask(old)


def test_round_trips(tmp_path):
    t = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    got = load_safetensors(save_safetensors(t, tmp_path / "t.safetensors"))
    assert all(torch.equal(got[k], t[k]) for k in t)
    assert torch.equal(load_torch(save_torch({"v": t["a"]}, tmp_path / "t.pt"))["v"], t["a"])


def test_damaged_and_crafted_files_are_refused_by_name(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match="bad.safetensors is not a readable safetensors file"):
        load_safetensors(bad)

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    crafted = tmp_path / "crafted.pt"
    crafted.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ValueError, match="crafted.pt was not loaded: it holds Python objects") as info:
        load_torch(crafted)
    # torch's own text suggests weights_only=False, the unsafe way: not repeated to a user
    assert "weights_only" not in str(info.value) and "no code from it ran" in str(info.value)
    text = tmp_path / "notes.bin"
    text.write_text("hello world")
    with pytest.raises(ValueError, match="notes.bin is not a readable torch file"):
        load_torch(text)
