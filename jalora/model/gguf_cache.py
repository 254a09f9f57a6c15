"""De-quantized GGUF models kept on disk as ordinary safetensors folders, keyed by the GGUF's sha256.

transformers de-quantizes a GGUF checkpoint on every load (70–80 s for gemma-3-270m on 2 cores)
and has no cache of its own. The first load saves what it produced (fp32 weights, the config
without its GGUF quantization mark, the tokenizer) as a model folder; later loads of the same
GGUF read that folder in seconds. An entry is built in a staging folder and published by one
rename, and it is used only when its manifest (written last) lists files that are all there at
their size, so a crash, a full disk or a concurrent writer never leaves a half-written entry in
use. The folder sits next to the tokenization cache: ~/.cache/jalora/dequantized, or
$JALORA_CACHE_DIR/dequantized; JALORA_CACHE_DIR=off turns both caches off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from jalora.outputs import write_atomic
from jalora.quiet import library_bars_hidden

log = logging.getLogger(__name__)

MANIFEST = "jalora-dequantized.json"
HASH_MEMO = "sha256-memo.json"
FORMAT = 1  # bump when what an entry holds changes; older entries are then rebuilt
STALE_S = 6 * 3600  # a staging folder this old belongs to a process that died (a build takes minutes)


def cache_root() -> Path | None:
    """The folder of de-quantized models, or None when caching is off."""
    configured = os.environ.get("JALORA_CACHE_DIR")
    if configured == "off":
        return None
    return (Path(configured) if configured else Path.home() / ".cache" / "jalora") / "dequantized"


def file_sha256(path: Path, root: Path) -> str:
    """sha256 of a file, remembered by its (size, mtime, inode) in `root`.

    Hashing the 250 MB gemma GGUF takes 1–2 s on 2 cores; an unchanged file is hashed once. A file
    rewritten in place gets a new mtime, so the memo never answers for changed bytes.
    """
    resolved = path.resolve()
    stat = resolved.stat()
    fingerprint = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    memo_path = root / HASH_MEMO
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    remembered = memo.get(str(resolved))
    if isinstance(remembered, dict) and remembered.get("stat") == fingerprint:
        return remembered["sha256"]
    digest = hashlib.sha256()
    with resolved.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    memo[str(resolved)] = {"stat": fingerprint, "sha256": digest.hexdigest()}
    write_atomic(memo_path, json.dumps(memo, indent=1).encode())
    return digest.hexdigest()


def is_complete(entry: Path, sha256: str) -> bool:
    """True when `entry` holds a finished build of the GGUF with this sha256."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("gguf_sha256") != sha256 or manifest.get("format") != FORMAT:
            return False
        return all((entry / name).stat().st_size == size for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return False


def forget_gguf_origin(model) -> None:
    """A GGUF checkpoint is dequantized to plain tensors on load, but transformers still marks the
    model as GGUF-quantized, which makes Trainer refuse it and save_pretrained fail. Drop the mark."""
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.quantization_config = None
    del model.config.quantization_config


def check_readable(folder: str, gguf_file: str) -> None:
    """Read the GGUF's config (metadata only, fast): transformers raises here for an architecture it
    cannot de-quantize, so the caller's one-line error is not preceded by a de-quantizing notice."""
    from transformers import AutoConfig

    AutoConfig.from_pretrained(folder, gguf_file=gguf_file)


def write_entry(folder: str, gguf_file: str, sha256: str, staging: Path) -> None:
    """De-quantize the GGUF into `staging`: fp32 safetensors, config, generation config, tokenizer, manifest last."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with library_bars_hidden():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    forget_gguf_origin(model)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    files = {p.name: p.stat().st_size for p in staging.iterdir() if p.is_file()}
    manifest = {"format": FORMAT, "gguf_file": gguf_file, "gguf_sha256": sha256, "files": files}
    write_atomic(staging / MANIFEST, json.dumps(manifest, indent=1).encode())


def publish(staging: Path, entry: Path) -> None:
    """Move a finished staging folder to `entry` with one rename. A broken entry is first moved
    aside; when another process published a complete entry first, ours is dropped."""
    try:
        os.rename(staging, entry)
        return
    except OSError:
        pass  # `entry` exists: someone else's finished build, or a broken one
    sha256 = json.loads((staging / MANIFEST).read_text(encoding="utf-8"))["gguf_sha256"]
    if not is_complete(entry, sha256):
        aside = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".broken-{entry.name[:12]}-"))
        try:
            os.rename(entry, aside / "entry")
        except OSError:
            pass  # another process moved it already
        shutil.rmtree(aside, ignore_errors=True)
        try:
            os.rename(staging, entry)
            return
        except OSError:
            pass  # another process published in between
    shutil.rmtree(staging, ignore_errors=True)


def remove_stale_staging(root: Path) -> None:
    """Free the space of builds that were killed half-way (each holds up to the model's fp32 size)."""
    for folder in [*root.glob(".staging-*"), *root.glob(".broken-*")]:
        try:
            if time.time() - folder.stat().st_mtime > STALE_S:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass  # removed by another process meanwhile


def dequantized_folder(folder: str, gguf_file: str) -> Path | None:
    """The cached model folder of `folder/gguf_file`, built on first use. None when caching is off or
    the cache cannot be written (read-only or full disk): the GGUF is then de-quantized on each load."""
    root = cache_root()
    if root is None:
        return None
    try:
        root.mkdir(parents=True, exist_ok=True)
        sha256 = file_sha256(Path(folder) / gguf_file, root)
        entry = root / sha256
        if is_complete(entry, sha256):
            return entry
        check_readable(folder, gguf_file)  # an architecture transformers cannot load fails here, before the notice
        print(f"de-quantizing {gguf_file} once; later loads read {entry}", file=sys.stderr)
        remove_stale_staging(root)
        staging = Path(tempfile.mkdtemp(dir=root, prefix=f".staging-{sha256[:12]}-"))
    except OSError as err:
        log.warning("the de-quantization cache in %s is unusable (%s); loading %s directly", root, err, gguf_file)
        return None
    try:
        write_entry(folder, gguf_file, sha256, staging)
        publish(staging, entry)
    except OSError as err:
        log.warning("could not write the de-quantization cache in %s (%s); loading %s directly", root, err, gguf_file)
        return None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return entry
