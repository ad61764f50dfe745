"""hardware/offline_gpu.py: the wheels cut into parts here, received one call at a time there.

The download (`stage`) and what runs on the GPU machine (pip install, the probe on the GPU, the
kernels' build, the GPU spec) are not run here: they are replaced by recorders. These tests
cover what lies between: the parts and their manifests, receiving them in order and refusing
a damaged or missing one, joining them into the same wheels, and the order of the steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import hardware.offline_gpu as og

HERE = f"{sys.version_info.major}.{sys.version_info.minor}"
ABOUT = {"python": HERE, "flavour": "cpu", "packages": ["a==1", "b==2", "c==3"]}


@pytest.fixture
def wheels(tmp_path):
    """Three small files named as wheels, of sizes that do not fall on a part's boundary."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    for name, size in (("a-1-py3-none-any.whl", 5000), ("b-2-py3-none-any.whl", 12345), ("c-3-py3-none-any.whl", 1)):
        (folder / name).write_bytes(os.urandom(size))
    return folder


@pytest.fixture
def staged(wheels, tmp_path):
    """(out, n): the wheels staged as n parts of at most 4096 bytes in out/p1..pn."""
    out = tmp_path / ".device"
    n, size = og.write_parts(wheels, out, 4096, ABOUT)
    assert n == -(-size // 4096) and n >= 4
    return out, n


@pytest.fixture
def steps(monkeypatch):
    """The steps after the last part, recorded instead of run; run_spec returns 5."""
    done = []
    monkeypatch.setattr(og, "install", lambda kept, manifest: done.append("install"))
    monkeypatch.setattr(og, "check_mlx", lambda flavour: done.append(f"check_mlx {flavour}"))
    monkeypatch.setattr(og, "build_kernels", lambda: done.append("build_kernels"))
    monkeypatch.setattr(og, "run_spec", lambda args: done.append(f"run_spec {args}") or 5)
    return done


def test_parts_hold_at_most_their_size_and_join_into_the_same_wheels(wheels, staged, tmp_path):
    out, n = staged
    sizes = [(out / f"p{k}" / "part").stat().st_size for k in range(1, n + 1)]
    assert sorted(p.name for p in out.iterdir()) == [f"p{k}" for k in sorted(range(1, n + 1), key=str)]
    assert max(sizes) <= 4096 and sizes[:-1] == [4096] * (n - 1)
    store = tmp_path / "store"
    for k in range(1, n + 1):
        manifest = og.receive(out / f"p{k}", store)
    assert {key: manifest[key] for key in ABOUT} == ABOUT
    kept = store / manifest["bundle_sha256"][:16]
    joined = og.join(kept, manifest)
    assert sorted(p.name for p in joined.iterdir()) == sorted(p.name for p in wheels.iterdir())
    assert all((joined / p.name).read_bytes() == p.read_bytes() for p in wheels.iterdir())
    assert not (kept / "bundle.tar").exists()  # only the wheels stay


def test_one_part_a_call_then_install_check_build_and_the_spec(staged, tmp_path, steps, capsys):
    out, n = staged
    store = tmp_path / "store"
    for k in range(1, n):
        assert og.run([out / f"p{k}"], store, ["-k", "flash"]) == 0
        assert f"next: p{k + 1}, in the next call" in capsys.readouterr().out
    assert steps == []  # nothing is installed before every part is here
    assert og.run([out / f"p{n}"], store, ["-k", "flash"]) == 5  # pytest's exit code
    assert steps == ["install", "check_mlx cpu", "build_kernels", "run_spec ['-k', 'flash']"]


def test_a_gap_in_the_parts_says_the_machine_may_be_new(staged, tmp_path, steps):
    out, n = staged
    store = tmp_path / "store"
    og.run([out / "p1"], store, [])
    with pytest.raises(SystemExit, match=rf"kept p1, p3 of {n}, but not p2: this machine may be a new one .*"
                                         r"Send the parts again from p1, in order, back to back"):
        og.run([out / "p3"], store, [])
    assert steps == []


def test_a_damaged_part_is_refused_and_not_kept(staged, tmp_path):
    out, _ = staged
    store = tmp_path / "store"
    og.receive(out / "p1", store)
    part = out / "p2" / "part"
    data = bytearray(part.read_bytes())
    data[100] ^= 1
    part.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match=r"p2/part is not the part its manifest describes \(SHA-256 differs\)"):
        og.receive(out / "p2", store)
    assert [p.name for p in store.rglob("p*")] == ["p1"]


def test_a_kept_part_damaged_later_fails_the_join(staged, tmp_path):
    out, n = staged
    store = tmp_path / "store"
    for k in range(1, n + 1):
        manifest = og.receive(out / f"p{k}", store)
    kept = store / manifest["bundle_sha256"][:16]
    data = bytearray((kept / "p2").read_bytes())
    data[0] ^= 1  # flip a bit: writing a fixed byte left the part whole when it already held it
    (kept / "p2").write_bytes(bytes(data))
    with pytest.raises(SystemExit, match=r"the joined parts are not the staged bundle \(SHA-256 differs\)"):
        og.join(kept, manifest)
    assert not (kept / "bundle.tar").exists() and not (kept / "wheels").exists()


def test_what_is_not_a_part_gets_one_line(staged, tmp_path):
    out, _ = staged
    store = tmp_path / "store"
    with pytest.raises(SystemExit, match=rf"holds no part \(a folder that `stage` wrote has {og.MANIFEST} and part\)"):
        og.receive(tmp_path, store)
    with pytest.raises(SystemExit, match=r"no parts in .*: run it with the first part's folder \(.device/p1\)"):
        og.run([], store, [])
    manifest = out / "p1" / og.MANIFEST
    manifest.write_text("[1, 2]")
    with pytest.raises(SystemExit, match=r"p1/manifest.json is not a manifest `stage` wrote \(it lacks a JSON object\)"):
        og.receive(out / "p1", store)
    manifest.write_text(json.dumps({"part": 1}))
    with pytest.raises(SystemExit, match=r"\(it lacks parts, bundle_sha256, python, flavour, packages\): stage again"):
        og.receive(out / "p1", store)


def test_wheels_for_another_python_are_refused_at_the_first_part(wheels, tmp_path, steps):
    out = tmp_path / ".device"
    og.write_parts(wheels, out, 4096, dict(ABOUT, python="3.9"))
    with pytest.raises(SystemExit, match=rf"staged for Python 3.9, this is {HERE} .*: stage --python {HERE}$"):
        og.run([out / "p1"], tmp_path / "store", [])


def test_mlx_cuda_needs_cuda_libraries_beside_it(wheels, tmp_path, monkeypatch):
    out = tmp_path / ".device"
    og.write_parts(wheels, out, 4096, dict(ABOUT, flavour="cuda13"))
    site = tmp_path / "site"
    (site / "nvidia" / "cu13" / "lib").mkdir(parents=True)
    for lib in og.CUDA_LIBRARIES[:-1]:
        (site / "nvidia" / "cu13" / "lib" / lib).touch()
    monkeypatch.setattr(og.sysconfig, "get_paths", lambda: {"purelib": str(site)})
    with pytest.raises(SystemExit, match=r"mlx-cuda-13 loads libnccl.so.2 from .*/nvidia/\*/lib, and they are not there"):
        og.run([out / "p1"], tmp_path / "store", [])
    (site / "nvidia" / "nccl" / "lib").mkdir(parents=True)
    (site / "nvidia" / "nccl" / "lib" / "libnccl.so.2").touch()
    assert og.run([out / "p1"], tmp_path / "store", []) == 0


def test_staging_again_replaces_the_parts_and_keeps_them_apart(wheels, staged, tmp_path):
    out, n_before = staged
    store = tmp_path / "store"
    first = og.receive(out / "p1", store)
    (wheels / "b-2-py3-none-any.whl").write_bytes(b"smaller")
    n_after, _ = og.write_parts(wheels, out, 4096, ABOUT)
    assert n_after < n_before and not (out / f"p{n_before}").exists()  # no part of the old staging left
    assert not list(tmp_path.glob(".device-staging.*"))  # nor its work folder
    second = og.receive(out / "p1", store)
    assert second["bundle_sha256"] != first["bundle_sha256"]
    assert len([d for d in store.iterdir() if d.is_dir()]) == 2  # kept apart: never joined together


@pytest.mark.parametrize("args, spec_added", [([], True), (["-k", "flash"], True),
                                               (["spec/day_2_3_quantized_matmul_gpu.py::test_gpu_kernels_are_built"], False)])
def test_the_spec_folder_unless_paths_are_given(args, spec_added, tmp_path):
    cmd = og.pytest_command(args, tmp_path / "gpu-spec.xml")
    assert cmd[:3] == [sys.executable, "-m", "pytest"] and "gpu" in cmd
    assert cmd[-len(args) - 1:] == [*args, "spec"] if spec_added else cmd[-1] == args[-1]


def test_a_part_and_the_repository_fit_one_transfer():
    """The lent machines take at most 64 MiB a call: the default part and this repository's files,
    with half a MiB to spare (for untracked files, which travel too)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=og.REPO, capture_output=True, check=True).stdout
    tree = sum((og.REPO / f).stat().st_size for f in files.decode().split("\0") if f and (og.REPO / f).is_file())
    assert og.PART_MIB * 2**20 + tree < 64 * 2**20 - 2**19, f"a {og.PART_MIB} MiB part and {tree / 2**20:.1f} MiB of files"
