"""Files the app reads with ``torch.load`` never run code (a real malicious pickle is refused
unread), and checkpoints written by the app carry a checksum that finds flipped bytes."""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from lightning_layerkd.app import ConfigError
from lightning_layerkd.app.safe_files import (
    CHECKSUM_KEY,
    ChecksummedCheckpointIO,
    UnsafeFileError,
    content_digest,
    load_tensors,
    verify_checksum,
)
from lightning_layerkd.app.train import run
from tests.helpers.app import THREE, TINY, Killed, config


class CreatesAFile:
    """Unpickled, it runs ``touch <target>`` (what an attacker's checkpoint would do)."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def malicious(path: Path, target: Path, *, zipped: bool) -> Path:
    """A checkpoint-looking file whose unpickling creates ``target``: a raw pickle, or
    ``torch.save``'s zip format."""
    payload = {"state_dict": {}, "callbacks": {"StudentHistory": CreatesAFile(target)}}
    if zipped:
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    # the payload is live: plain unpickling runs it (so the tests below can fail)
    probe = target.with_name("probe")
    pickle.loads(pickle.dumps(CreatesAFile(probe)))
    assert probe.exists()
    probe.unlink()
    return path


@pytest.mark.parametrize("zipped", [False, True])
def test_a_malicious_pickle_is_refused_unread(tmp_path: Path, zipped: bool) -> None:
    target = tmp_path / "pwned"
    path = malicious(tmp_path / "evil.ckpt", target, zipped=zipped)
    with pytest.raises(UnsafeFileError, match="unpickling it could run code"):
        load_tensors(path)
    assert not target.exists()


@pytest.mark.slow
def test_a_malicious_ckpt_path_exits_2_and_runs_nothing(tmp_path: Path, cache: Path) -> None:
    """``layerkd-train ckpt_path=<evil file>``: status 2 naming the file, the payload never
    ran, and nothing else read it (no teacher trained, nothing cached)."""
    target = tmp_path / "pwned"
    path = malicious(tmp_path / "evil.ckpt", target, zipped=True)
    overrides = [o for o in TINY if not o.startswith("trainer.")]
    result = subprocess.run(
        [sys.executable, "-m", "lightning_layerkd.app.train", *overrides]
        + [f"hydra.run.dir={tmp_path / 'run'}", f"ckpt_path={path}"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "LAYERKD_CACHE": str(cache)},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"layerkd-train: error: ckpt_path: {path} holds Python objects" in result.stderr
    assert "Traceback" not in result.stderr
    assert not target.exists()
    assert list(cache.rglob("*.pt")) == []
    assert not (tmp_path / "run" / "teacher").exists()


def test_the_content_digest_is_sha256_of_the_documented_byte_stream() -> None:
    """An independent route: the bytes fed for ``{"a": [1.5, tensor([1., -2.])], "b": None}``
    written out by hand with ``struct``."""
    tree = {"a": [1.5, torch.tensor([1.0, -2.0], dtype=torch.float64)], "b": None}
    stream = (
        b"D2;"
        + b"Vstr:'a';"
        + b"L2;"
        + b"Vfloat:1.5;"
        + b"Ttorch.float64(2,);"
        + struct.pack("<dd", 1.0, -2.0)
        + b"Vstr:'b';"
        + b"VNoneType:None;"
    )
    assert content_digest(tree) == hashlib.sha256(stream).hexdigest()
    assert content_digest({**tree, CHECKSUM_KEY: "anything"}) == content_digest(tree)
    changed = {"a": [1.5, torch.tensor([1.0, -2.0000000000000004], dtype=torch.float64)]}
    assert content_digest({**changed, "b": None}) != content_digest(tree)


def flip_a_byte_inside_a_tensor(path: Path) -> None:
    """Flip one byte in the middle of the largest tensor's data in ``torch.save``'s zip file
    (stored uncompressed, so the zip stays readable)."""
    with zipfile.ZipFile(path) as archive:
        entry = max(
            (i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size
        )
        data = archive.read(entry)
    raw = bytearray(path.read_bytes())
    start = raw.find(data)
    assert start > 0 and raw.find(data, start + 1) == -1
    raw[start + len(data) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def test_a_checksummed_checkpoint_verifies_and_a_flipped_byte_is_found(tmp_path: Path) -> None:
    checkpoint = {"epoch": 3, "state_dict": {"w": torch.arange(64, dtype=torch.float32)}}
    path = tmp_path / "last.ckpt"
    ChecksummedCheckpointIO().save_checkpoint(checkpoint, path)
    loaded = load_tensors(path)
    assert loaded[CHECKSUM_KEY] == content_digest(checkpoint)
    assert verify_checksum(loaded) is True
    assert verify_checksum({"epoch": 3}) is None  # none recorded
    flip_a_byte_inside_a_tensor(path)
    damaged = load_tensors(path)  # unpickles without complaint
    assert not torch.equal(damaged["state_dict"]["w"], checkpoint["state_dict"]["w"])
    assert verify_checksum(damaged) is False


def test_a_resume_from_a_checkpoint_with_flipped_bytes_is_refused_naming_it(
    tmp_path: Path, cache: Path
) -> None:
    """A ``last.ckpt`` with a flipped byte inside a tensor (which resumed silently before) is
    refused with the file named and the way out; the intact epoch checkpoint resumes."""
    overrides = [*THREE, "epochs=2", "milestones=[1]"]
    run_dir = tmp_path / "run"
    kill = ["+callbacks.kill._target_=tests.helpers.app.KillAt", "+callbacks.kill.epoch=1"]
    with pytest.raises(Killed):
        run(config(*overrides, *kill), run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert verify_checksum(load_tensors(last)) is True  # the app wrote its checksum
    flip_a_byte_inside_a_tensor(last)
    with pytest.raises(ConfigError) as err:
        run(config(*overrides, "ckpt_path=last"), run_dir)
    message = str(err.value)
    assert message.startswith(f"ckpt_path: the checkpoint {last} is damaged: its content does")
    assert "copy the newest epoch checkpoint over it" in message
    last.write_bytes((run_dir / "checkpoints" / "epoch=0-step=3.ckpt").read_bytes())
    resumed = run(config(*overrides, "ckpt_path=last"), run_dir)
    assert [row["epoch"] for row in resumed["student"]["history"]] == [0, 1]


def test_a_malicious_teacher_cache_file_is_unusable_and_runs_nothing(tmp_path: Path) -> None:
    """The teacher cache reads its entries through the same loader: a pickle that would run
    code is an unusable entry (moved aside and retrained by its owner), and nothing runs."""
    from lightning_layerkd.app.teacher import _read_state, _Unusable

    target = tmp_path / "pwned"
    path = malicious(tmp_path / "key.pt", target, zipped=True)
    with pytest.raises(_Unusable, match="unpickling it could run code"):
        _read_state(path)
    assert not target.exists()
