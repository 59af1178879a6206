"""Build the offline demo chat model, and keep one built copy in the data folder.

`build_demo_model` trains a byte-level BPE tokenizer and a small Llama-style model on
the corpus from `corpus.py`, then writes an ordinary Hugging Face folder:
``AutoModelForCausalLM.from_pretrained(path)``, ``AutoTokenizer.from_pretrained(path)``
and ``apply_chat_template`` work on it, and generation stops at ``<|im_end|>``.

`ensure_demo_model` returns ``data_dir/"demo-model"``, building it the first time.
The build runs in a temporary folder beside it and is renamed into place only when
complete, with a ``demo-model.json`` manifest (recipe version, corpus hash, seed,
steps, final loss) written last. A folder without a matching manifest is never used:
a changed recipe or corpus, or a half-built folder, means a rebuild. An exclusive
``fcntl.flock`` on ``data_dir/.demo-model.lock`` makes concurrent callers (threads or
processes) wait for one build instead of racing.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from chat_app.demo_model.corpus import build_corpus, corpus_sha256
from chat_app.demo_model.tokenizer import train_chat_tokenizer
from chat_app.demo_model.training import encode_conversation, train_causal_lm

logger = logging.getLogger(__name__)

DEMO_MODEL_DIRNAME = "demo-model"
MANIFEST_NAME = "demo-model.json"
LOCK_NAME = ".demo-model.lock"
_TMP_PREFIX = ".demo-model.tmp-"
_OLD_PREFIX = ".demo-model.old-"

# Bump when anything changes what a build produces (the recipe below, training.py,
# tokenizer.py); a changed corpus is caught by its hash without a bump.
RECIPE_VERSION = 2


@dataclass(frozen=True)
class DemoRecipe:
    """Sizes and training settings of the demo model (about 3.9M parameters).

    The corpus answers each question in several variants (see `corpus.py`), and the
    model should sample that spread rather than collapse onto one reply per prompt;
    ``ema_decay`` (an average of the weights over the last part of training) keeps the
    last batches from tilting each prompt towards the variant they happened to show.
    """

    vocab_size: int = 1536
    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    context_length: int = 512
    train_max_length: int = 384
    steps: int = 700
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.1
    ema_decay: float = 0.995
    max_new_tokens: int = 160


RECIPE = DemoRecipe()


def build_demo_model(
    out_dir: Path, *, steps: int | None = None, seed: int = 0, progress: bool = True
) -> Path:
    """Train the demo model and write it to ``out_dir`` (created; must be absent or empty).

    ``steps`` defaults to the recipe's (``RECIPE.steps``); fewer steps give a faster,
    worse model with the same files. The same ``seed`` and ``steps`` on the same torch
    build and thread count give the same weights. Returns ``out_dir``.

    Raises ``ValueError`` for a non-positive ``steps`` and ``FileExistsError`` when
    ``out_dir`` holds files already.
    """
    steps = _check_steps(steps)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"demo model output folder is not empty: {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    started, started_cpu = time.perf_counter(), time.process_time()

    conversations = build_corpus(seed)
    texts = [m["content"] for conv in conversations for m in conv] + ["system user assistant"]
    tokenizer = train_chat_tokenizer(texts, vocab_size=RECIPE.vocab_size)
    tokenizer.model_max_length = RECIPE.context_length
    examples = [
        encode_conversation(tokenizer, conv, RECIPE.train_max_length) for conv in conversations
    ]

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=RECIPE.hidden_size,
        intermediate_size=RECIPE.intermediate_size,
        num_hidden_layers=RECIPE.num_layers,
        num_attention_heads=RECIPE.num_heads,
        num_key_value_heads=RECIPE.num_kv_heads,
        max_position_embeddings=RECIPE.context_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):  # seed here without touching the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        result = train_causal_lm(
            model,
            examples,
            steps=steps,
            batch_size=RECIPE.batch_size,
            lr=RECIPE.lr,
            weight_decay=RECIPE.weight_decay,
            seed=seed,
            pad_id=tokenizer.pad_token_id,
            progress=progress,
            ema_decay=RECIPE.ema_decay,
        )

    gen = model.generation_config
    gen.bos_token_id = tokenizer.bos_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    gen.max_new_tokens = RECIPE.max_new_tokens
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    manifest = {
        **_identity(conversations, seed, steps),
        "final_loss": round(result.final_loss, 4),
        "assistant_tokens_trained": result.assistant_tokens,
        "parameters": sum(p.numel() for p in model.parameters()),
        "build_seconds": round(time.perf_counter() - started, 1),
        "build_cpu_seconds": round(time.process_time() - started_cpu, 1),
        "torch_threads": torch.get_num_threads(),
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "recipe": asdict(RECIPE),
    }
    _write_json_durably(out_dir / MANIFEST_NAME, manifest)
    return out_dir


def ensure_demo_model(
    data_dir: Path,
    *,
    rebuild: bool = False,
    progress: bool = True,
    steps: int | None = None,
    seed: int = 0,
) -> Path:
    """Return ``data_dir/"demo-model"``, building it first when it is missing or stale.

    Stale means: no manifest, or a manifest whose recipe version, corpus hash, seed or
    steps differ from this call's. ``rebuild=True`` builds even when it is current.
    Leftover temporary folders from interrupted builds are deleted, never used.
    """
    steps = _check_steps(steps)
    data_dir = Path(data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise NotADirectoryError(f"data folder is not a directory: {data_dir}")
    data_dir.mkdir(parents=True, exist_ok=True)
    target = data_dir / DEMO_MODEL_DIRNAME
    with _exclusive_lock(data_dir / LOCK_NAME):
        _remove_leftovers(data_dir)
        wanted = _identity(build_corpus(seed), seed, steps)
        current = read_manifest(target)
        if not rebuild and current is not None and _same_identity(current, wanted):
            return target
        reason = "rebuild asked" if rebuild else "missing" if current is None else "stale"
        logger.info("building the demo model into %s (%s, %d steps)", target, reason, steps)
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=data_dir))
        try:
            build_demo_model(tmp, steps=steps, seed=seed, progress=progress)
            _finish_folder(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _swap_into_place(tmp, target)
        logger.info("demo model ready in %s", target)
    return target


def read_manifest(model_dir: Path) -> dict[str, Any] | None:
    """The build manifest of ``model_dir``, or None if it has none or it is unreadable."""
    try:
        manifest = json.loads((Path(model_dir) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _identity(conversations: list[list[dict[str, str]]], seed: int, steps: int) -> dict[str, Any]:
    """The manifest fields that decide whether a built model is the one wanted."""
    return {
        "recipe_version": RECIPE_VERSION,
        "corpus_sha256": corpus_sha256(conversations),
        "seed": seed,
        "steps": steps,
    }


def _same_identity(manifest: dict[str, Any], wanted: dict[str, Any]) -> bool:
    return all(manifest.get(key) == value for key, value in wanted.items())


def _check_steps(steps: int | None) -> int:
    if steps is None:
        return RECIPE.steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return steps


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if needed) for the block."""
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(data_dir: Path) -> None:
    """Delete temporary and replaced folders that an interrupted build left behind."""
    for leftover in data_dir.iterdir():
        if leftover.name.startswith((_TMP_PREFIX, _OLD_PREFIX)) and leftover.is_dir():
            logger.info("removing an unfinished demo model build: %s", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def _swap_into_place(built: Path, target: Path) -> None:
    """Rename ``built`` to ``target``; an existing ``target`` is moved aside, then deleted."""
    old = None
    if target.exists():
        old = target.with_name(f"{_OLD_PREFIX}{os.getpid()}-{time.time_ns()}")
        os.replace(target, old)
    os.replace(built, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _finish_folder(folder: Path) -> None:
    """Make a built folder durable and readable before it is renamed into place.

    Every file is fsynced (so after a crash the manifest never vouches for weights that
    did not reach the disk) and given ordinary permissions (mkdtemp makes the folder
    private to its owner; a server running as another user may share the data folder).
    """
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def _write_json_durably(path: Path, payload: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
