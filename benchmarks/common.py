"""Shared helpers of the retraining, hot-swap and API-load benchmarks.

Random-weight models and LoRA adapters built here (nothing is downloaded; speed does not
depend on the weights' values), percentiles, peak-memory measurement, a plain-text table
and the ``--json FILE`` writer. Importing this module puts the repository root and
``tests/`` on ``sys.path`` so the benchmarks can use the project and its test helpers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


# ----------------------------------------------------------------------------- arguments


def add_common_args(parser: argparse.ArgumentParser, *, model_help: str) -> None:
    """``--model``, ``--device``, ``--threads`` and ``--json``, the same in every benchmark."""
    parser.add_argument("--model", help=model_help)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: on a shared, busy CPU more threads wait on each other)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")


def check_common_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Report a bad ``--device`` or ``--threads`` through ``parser.error`` (exit status 2).

    ``cuda`` is accepted only when this machine has CUDA, so a run on a CPU-only machine
    stops at once with one clear line instead of failing after the model is built.
    """
    problems = []
    kind, _, index = str(args.device).partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        problems.append(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    elif kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            problems.append(f"--device {args.device} asked for, but CUDA is not available here")
    if args.threads < 1:
        problems.append("--threads must be >= 1")
    if problems:
        parser.error("; ".join(problems))


def add_candidate_args(parser: argparse.ArgumentParser, *, run_help: str) -> None:
    """``--work-dir``, ``--run``, ``--version`` and ``--model``: one candidate of a
    ``bench_alignment.py --work-dir`` run, trained again in process."""
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--run", required=True, help=run_help)
    parser.add_argument("--version", required=True, help="e.g. v0002")
    parser.add_argument("--model", help="the run's model folder (default: the demo model, "
                        "built into ./data when missing)")


def check_candidate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Report through ``parser.error`` a control run without ``--judge`` (when the parser
    has one) or a ``--version`` the run does not have."""
    if getattr(args, "judge", "") is None and "-" not in args.run:
        parser.error(f"--judge is needed for the run {args.run!r}")
    if not (args.work_dir / args.run / "adapters" / args.version / "manifest.json").is_file():
        parser.error(f"no candidate {args.version} in {args.work_dir / args.run}")


def candidate_rows(args: argparse.Namespace) -> Any:
    """The rows the retraining worker built for candidate ``--version`` of ``--run``
    (:func:`retrain.rows.round_rows`: the feedback up to the version's last event, split
    by prompt with ``--eval-fraction``)."""
    from feedback_store.store import FeedbackStore
    from retrain.rows import round_rows

    data = args.work_dir / args.run
    manifest = json.loads((data / "adapters" / args.version / "manifest.json").read_text())
    store = FeedbackStore.open(f"sqlite:///{data / 'feedback.db'}")
    try:
        return round_rows(store, manifest["last_event_id"], args.eval_fraction)
    finally:
        store.close()


# ------------------------------------------------------------------------- models, adapters


def tokenizer_texts() -> list[str]:
    """English text to train a benchmark tokenizer on: standard-library docstrings."""
    import collections
    import email
    import http.server
    import logging
    import pathlib
    import re
    import subprocess
    import tempfile

    texts = []
    for module in (collections, email, http.server, json, logging, os, pathlib, re,
                   subprocess, threading, argparse, statistics, tempfile):
        for obj in vars(module).values():
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc) > 40:
                texts.append(doc)
    return texts


def build_random_llama(
    path: Path,
    *,
    hidden_size: int = 512,
    num_layers: int = 8,
    vocab_size: int = 4096,
    never_end: bool = False,
    seed: int = 0,
) -> Path:
    """Write a random-weight Llama and a locally trained ChatML tokenizer to ``path``.

    Parameters: ``2 * V * H`` (embeddings and head) ``+ L * (4 * H^2 + 3 * H * I)`` with
    ``I = 2.6875 * H``; the default 8 x 512 with V = 4096 is about 29M. The tokenizer learns
    as many tokens as its small corpus allows (at most ``vocab_size``); the model's
    vocabulary is ``vocab_size`` all the same, the extra ids simply never occur, so the
    output layer costs what a real one of that size costs. ``never_end`` zeroes the end
    token's output row so that replies run to their length limit.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from chat_app.demo_model.tokenizer import train_chat_tokenizer

    tokenizer = train_chat_tokenizer(tokenizer_texts(), vocab_size=vocab_size)
    config = LlamaConfig(
        vocab_size=max(len(tokenizer), vocab_size),
        hidden_size=hidden_size,
        intermediate_size=int(hidden_size * 2.6875),
        num_hidden_layers=num_layers,
        num_attention_heads=max(1, hidden_size // 64),
        num_key_value_heads=max(1, hidden_size // 64),
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if never_end:
        with torch.no_grad():
            model.lm_head.weight[tokenizer.eos_token_id] = 0.0
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_random_adapter(model_path: Path | str, out_dir: Path, *, seed: int, r: int = 16) -> Path:
    """Save a rank-``r`` LoRA on every linear layer of the model in ``model_path``, with
    random non-zero ``B`` matrices (so it changes the outputs), as a PEFT adapter folder."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    torch.manual_seed(seed)
    peft_model = get_peft_model(
        base, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.02)
    peft_model.save_pretrained(str(out_dir))
    return out_dir


def parameter_count(model_path: Path | str) -> int:
    """Parameters of the model in ``model_path``, from its config (no weights loaded)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_path)))
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least ``q``% of values <= it."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(len(ordered) * q / 100))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def ratio(a: float, b: float) -> float:
    """``a / b``; NaN when either is missing or ``b`` is 0."""
    if not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return math.nan
    return a / b


# -------------------------------------------------------------------------------- memory


class PeakMemory:
    """Peak memory growth over a stretch of code, in bytes.

    CPU: the process's peak resident set size (Linux ``VmHWM``) after ``start()`` minus the
    resident size at ``start()``. ``start()`` resets the peak by writing 5 to
    ``/proc/self/clear_refs``; where that is not allowed, a thread samples the RSS every
    2 ms instead (``method`` says which). CUDA: ``torch.cuda.max_memory_allocated`` after
    ``reset_peak_memory_stats`` minus the allocation at ``start()``.
    """

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.method = "cuda max_memory_allocated" if self.cuda else "VmHWM reset"
        self._base = 0
        self._sampled = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return
        self._base = _status_bytes("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.method = "RSS sampled every 2 ms"
            self._sampled = self._base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._sampled = max(self._sampled, _status_bytes("VmRSS"))

    def peak_delta(self) -> int:
        """Bytes of growth of the peak over the level at ``start()`` (never negative)."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return max(0, torch.cuda.max_memory_allocated() - self._base)
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = self._sampled
        else:
            peak = _status_bytes("VmHWM")
        return max(0, peak - self._base)


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} is not in /proc/self/status")


# --------------------------------------------------------------------------------- output


def model_or_demo(model: str | None) -> str:
    """``model``, or the demo model (built into ``./data`` when missing)."""
    if model is not None:
        return model
    from chat_app.demo_model.build import ensure_demo_model

    return str(ensure_demo_model(Path("data")))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *,
                title: str | None = None) -> None:
    """Print ``rows`` under ``headers``: the first column left-aligned, the rest right-aligned.

    Floats are shown with 3 significant decimals (``fmt``); None and NaN as ``-``.
    """
    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    if title:
        print(f"\n{title}")
    def join(values: Sequence[str]) -> str:
        return "  ".join(
            v.ljust(w) if i == 0 else v.rjust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        )

    line = join([str(h) for h in headers])
    print(line)
    print("-" * len(line))
    for row in cells:
        print(join(row))


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        if value != 0 and abs(value) < 0.01:
            return f"{value:.4f}"
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` as indented JSON (NaN becomes null); no-op without one."""
    if path is None:
        return
    path.write_text(json.dumps(_clean(payload), indent=2))


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def machine_note() -> str:
    """One line on what the figures were measured on."""
    try:
        load = f", load average {os.getloadavg()[0]:.1f}"
    except OSError:
        load = ""
    return f"{os.cpu_count()} CPUs{load}; measured {time.strftime('%Y-%m-%d %H:%M')}"


@contextmanager
def postgres_database(admin_url: str, prefix: str = "bench") -> Iterator[str]:
    """Create a fresh database on the server behind ``admin_url``; drop it afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = make_url(admin_url)
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()
