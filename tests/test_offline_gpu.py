"""tools/offline_gpu.py: the wheels cut into parts here, received one call at a time there.

The download (`stage`) and what runs on the GPU machine (pip install, the kernels' build, the
GPU spec) are not run here; these tests cover what lies between: the parts, their manifests,
receiving them in any order and refusing a damaged one, and joining them into the same wheels.
"""

from __future__ import annotations

import json
import os

import pytest

from tools.offline_gpu import MANIFEST, join, receive, run, write_parts

ABOUT = {"python": "3.12", "flavour": "cpu", "packages": ["a==1", "b==2", "c==3"]}


@pytest.fixture
def wheels(tmp_path):
    """Three small files named as wheels, of sizes that do not fall on a part's boundary."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    for name, size in (("a-1-py3-none-any.whl", 5000), ("b-2-py3-none-any.whl", 12345), ("c-3-py3-none-any.whl", 1)):
        (folder / name).write_bytes(os.urandom(size))
    return folder


def test_parts_hold_at_most_their_size_and_join_into_the_same_wheels(wheels, tmp_path, capsys):
    out, store = tmp_path / ".device", tmp_path / "store"
    n, size = write_parts(wheels, out, 4096, ABOUT)
    assert n == -(-size // 4096) and n > 2
    assert sorted(p.name for p in out.iterdir()) == sorted(f"p{k}" for k in range(1, n + 1))
    assert all((out / f"p{k}" / "part").stat().st_size <= 4096 for k in range(1, n + 1))
    assert sum((out / f"p{k}" / "part").stat().st_size for k in range(1, n + 1)) == size

    for k in reversed(range(2, n + 1)):  # any order, one call each; the last one missing
        assert run([out / f"p{k}"], store, []) == 0
    assert "parts still to send: p1 " in capsys.readouterr().out
    manifest = receive(out / "p1", store)
    assert {k: manifest[k] for k in ABOUT} == ABOUT
    kept = store / manifest["bundle_sha256"][:16]
    joined = join(kept, manifest)
    assert sorted(p.name for p in joined.iterdir()) == sorted(p.name for p in wheels.iterdir())
    assert all((joined / p.name).read_bytes() == p.read_bytes() for p in wheels.iterdir())
    assert not (kept / "bundle.tar").exists()  # only the wheels stay


def test_a_damaged_part_is_refused_and_not_kept(wheels, tmp_path):
    out, store = tmp_path / ".device", tmp_path / "store"
    write_parts(wheels, out, 4096, ABOUT)
    part = out / "p2" / "part"
    data = bytearray(part.read_bytes())
    data[100] ^= 1
    part.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match=r"p2/part is not the part its manifest describes \(SHA-256 differs\)"):
        receive(out / "p2", store)
    assert not list(store.rglob("p2"))


def test_a_folder_without_a_part_says_what_it_needs(tmp_path):
    with pytest.raises(SystemExit, match=rf"holds no part \(a folder that `stage` wrote has {MANIFEST} and part\)"):
        receive(tmp_path, tmp_path / "store")
    with pytest.raises(SystemExit, match="no parts in .* yet: run it with a part folder"):
        run([], tmp_path / "store", [])


def test_staging_again_replaces_the_parts_and_keeps_them_apart(wheels, tmp_path):
    out, store = tmp_path / ".device", tmp_path / "store"
    n_before, _ = write_parts(wheels, out, 4096, ABOUT)
    first = json.loads((out / "p1" / MANIFEST).read_text())
    receive(out / "p1", store)
    (wheels / "b-2-py3-none-any.whl").write_bytes(b"smaller")
    n_after, _ = write_parts(wheels, out, 4096, ABOUT)
    assert n_after < n_before and not (out / f"p{n_before}").exists()  # no part of the old staging left
    second = receive(out / "p1", store)
    assert second["bundle_sha256"] != first["bundle_sha256"]
    assert len([d for d in store.iterdir() if d.is_dir()]) == 2  # kept apart: never joined together
