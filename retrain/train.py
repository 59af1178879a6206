"""One training round: KTO over thumbs, then DPO over pairs, on ONE LoRA adapter.

Phases of :func:`train_round`: validate the config and rows, tokenise, load the base
and the adapter (the parent, trainable, or a fresh LoRA), train the KTO phase, train
the DPO phase, save the adapter. The reference model is the base with the adapter
disabled (``modeling.reference_mode``), never a second copy, so every round is
regularised toward the base and drift cannot pile up round after round.

Each phase is a stream of shuffled epochs cut into batches of ``min(batch_size,
rows)``; it runs ``min(max_steps, ceil(epochs * ceil(rows / batch_size)))`` optimiser
steps (AdamW, linear warm-up then a constant rate, gradient-norm clipping). Log
probabilities are sums over completion tokens (``losses.sequence_logps``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from retrain import modeling
from retrain.losses import (
    balanced_kto_weights,
    completion_token_counts,
    dpo_loss,
    kto_loss,
    mismatched_indices,
    sequence_logps,
)
from retrain.modeling import DPOExample, KTOExample

DPO_LOSS_TYPES = ("sigmoid", "ipo")
_NOT_AVERAGED = frozenset({"phase", "step", "total_steps", "lr", "reward_margin"})


class TrainingError(RuntimeError):
    """Training went wrong numerically (a non-finite loss); nothing is saved."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_pos(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one round.

    ``learning_rate`` defaults to 5e-5: LoRA moves only low-rank matrices (scaled by
    ``lora_alpha / lora_r``), so it needs one to two orders of magnitude more than the
    1e-6 of full fine-tuning; 5e-5 is the cautious end of the usual LoRA range because
    feedback sets are small and noisy and every round retrains on all of them.
    ``kto_steps``/``dpo_steps`` are upper bounds (0 skips a phase); with little data a
    phase stops after ``epochs`` passes. ``desirable_weight``/``undesirable_weight``
    ``None`` means balanced from the round's class counts (``balanced_kto_weights``).
    ``lora_*`` and ``target_modules`` shape a fresh adapter only; a parent adapter keeps
    its own shape. ``quantize_4bit``/``gradient_checkpointing`` ``None``: on exactly when
    the device is CUDA. ``device`` ``None``: CUDA when available, else CPU.
    """

    beta: float = 0.1
    dpo_loss_type: str = "sigmoid"
    learning_rate: float = 5e-5
    kto_steps: int = 50
    dpo_steps: int = 50
    epochs: float = 3.0
    batch_size: int = 4
    max_length: int = 512
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | str = "all-linear"
    desirable_weight: float | None = None
    undesirable_weight: float | None = None
    seed: int = 0
    quantize_4bit: bool | None = None
    device: str | None = None
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    log_every: int = 5
    gradient_checkpointing: bool | None = None

    def validate(self) -> None:
        """Raise one ValueError that lists every problem, or return None."""
        problems: list[str] = []
        for name in ("beta", "learning_rate", "epochs", "max_grad_norm", "lora_alpha"):
            if not _is_pos(getattr(self, name)):
                problems.append(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        if self.dpo_loss_type not in DPO_LOSS_TYPES:
            problems.append(
                f"dpo_loss_type must be one of {DPO_LOSS_TYPES}, got {self.dpo_loss_type!r}"
            )
        for name in ("kto_steps", "dpo_steps", "seed"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                problems.append(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        for name, low in (("batch_size", 1), ("max_length", 2), ("lora_r", 1), ("log_every", 1)):
            if not _is_int(getattr(self, name)) or getattr(self, name) < low:
                problems.append(f"{name} must be an int >= {low}, got {getattr(self, name)!r}")
        if not isinstance(self.lora_dropout, int | float) or not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.warmup_ratio, int | float) or not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        targets = self.target_modules
        if not (
            (isinstance(targets, str) and targets)
            or (
                isinstance(targets, tuple)
                and targets
                and all(isinstance(t, str) and t for t in targets)
            )
        ):
            problems.append(
                f"target_modules must be a non-empty str or tuple of str, got {targets!r}"
            )
        for name in ("desirable_weight", "undesirable_weight"):
            value = getattr(self, name)
            if value is not None and not _is_pos(value):
                problems.append(f"{name} must be None or a finite number > 0, got {value!r}")
        for name in ("quantize_4bit", "gradient_checkpointing"):
            if getattr(self, name) not in (None, True, False):
                problems.append(f"{name} must be None, True or False, got {getattr(self, name)!r}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                problems.append(f"device {self.device!r} is not a torch device")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))


@dataclass(frozen=True)
class RoundResult:
    """What a round did. ``metrics``: per phase ``{phase}/rows``, ``/steps``,
    ``/seconds``, ``/loss`` (mean over steps), ``/loss_final`` and the mean of every
    loss metric (``{phase}/rewards/margins``, ``kto/kl``, ...), plus ``seconds``.
    ``history``: one dict per logged step (the first, every ``log_every``-th, the last)."""

    metrics: dict[str, float]
    history: list[dict] = field(default_factory=list)


def phase_steps(n_rows: int, config: TrainConfig, max_steps: int) -> int:
    """Optimiser steps of a phase: ``min(max_steps, ceil(epochs * ceil(rows / batch)))``."""
    if n_rows == 0 or max_steps == 0:
        return 0
    per_epoch = math.ceil(n_rows / config.batch_size)
    return max(1, min(max_steps, math.ceil(config.epochs * per_epoch)))


def _batches(n_rows: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless batches of ``min(batch_size, n_rows)`` indices from shuffled epochs."""
    size = min(batch_size, n_rows)
    pending: list[int] = []
    while True:
        while len(pending) < size:
            pending += torch.randperm(n_rows, generator=generator).tolist()
        yield pending[:size]
        pending = pending[size:]


def _scalar(value: torch.Tensor | float) -> float:
    if isinstance(value, torch.Tensor):
        return value.detach().float().mean().item() if value.numel() else math.nan
    return float(value)


def _logps(model: torch.nn.Module, batch: modeling.Batch) -> torch.Tensor:
    return sequence_logps(modeling.forward_logits(model, batch), batch.labels)


class _Phase:
    """Shared plumbing of a phase: optimiser, schedule, logging, averaging."""

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        total: int,
        config: TrainConfig,
        progress: Callable[[dict], None] | None,
    ) -> None:
        self.name, self.model, self.total, self.config = name, model, total, config
        self.progress = progress
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=0.0)
        warmup = round(config.warmup_ratio * total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1))
        )
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.history: list[dict] = []
        self.last_loss = math.nan
        self.bar = tqdm(total=total, desc=f"{name} phase", unit="step", dynamic_ncols=True)

    def step(self, step: int, loss: torch.Tensor, metrics: dict[str, torch.Tensor | float]) -> None:
        """Back-propagate ``loss``, take one optimiser step and record ``metrics``."""
        if not torch.isfinite(loss):
            self.bar.close()
            raise TrainingError(f"{self.name} loss is {loss.item()} at step {step}; nothing saved")
        lr = self.scheduler.get_last_lr()[0]
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        record: dict[str, Any] = {"phase": self.name, "step": step, "total_steps": self.total}
        record["loss"] = self.last_loss = loss.item()
        values = {key: _scalar(value) for key, value in metrics.items()}
        record["reward_margin"] = values.get("rewards/margins", math.nan)
        record.update(values, lr=lr, grad_norm=_scalar(grad_norm))
        for key, value in record.items():
            if key not in _NOT_AVERAGED and math.isfinite(value):
                self.sums[key] = self.sums.get(key, 0.0) + value
                self.counts[key] = self.counts.get(key, 0) + 1
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", margin=f"{record['reward_margin']:.3f}")
        if step == 1 or step % self.config.log_every == 0 or step == self.total:
            self.history.append(record)
            if self.progress is not None:
                self.progress(dict(record))

    def summary(self, rows: int, seconds: float) -> dict[str, float]:
        self.bar.close()
        out = {f"{self.name}/{key}": self.sums[key] / self.counts[key] for key in self.sums}
        out.update(
            {
                f"{self.name}/rows": float(rows),
                f"{self.name}/steps": float(self.total),
                f"{self.name}/seconds": seconds,
                f"{self.name}/loss_final": self.last_loss,
            }
        )
        return out


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _train_kto(
    model: Any,
    tokenizer: Any,
    examples: list[KTOExample],
    config: TrainConfig,
    progress: Callable[[dict], None] | None,
    generator: torch.Generator,
) -> tuple[dict[str, float], list[dict]]:
    """KTO phase. The KL reference point of each batch comes from mismatched pairs
    (prompt i with completion j != i, ``mismatched_indices``), scored without gradient."""
    start = time.perf_counter()
    n_desirable = sum(e.desirable for e in examples)
    balanced = balanced_kto_weights(n_desirable, len(examples) - n_desirable)
    w_desirable = config.desirable_weight if config.desirable_weight is not None else balanced[0]
    w_undesirable = (
        config.undesirable_weight if config.undesirable_weight is not None else balanced[1]
    )
    total = phase_steps(len(examples), config, config.kto_steps)
    phase = _Phase("kto", model, total, config, progress)
    device = next(p.device for p in phase.params)
    batches = _batches(len(examples), config.batch_size, generator)

    def collate(pairs: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> modeling.Batch:
        return modeling.collate(
            pairs, pad_id=_pad_id(tokenizer), max_length=config.max_length, device=device
        )

    for step in range(1, total + 1):
        batch = [examples[i] for i in next(batches)]
        matched = collate([(e.turn.prompt_ids, e.turn.completion_ids) for e in batch])
        kl_pairs = collate(
            [
                (e.turn.prompt_ids, batch[j].turn.completion_ids)
                for e, j in zip(batch, mismatched_indices(len(batch)), strict=True)
            ]
        )
        desirable = torch.tensor([e.desirable for e in batch], dtype=torch.bool, device=device)
        policy = _logps(model, matched)
        with torch.no_grad():
            policy_kl = _logps(model, kl_pairs)
        with modeling.reference_mode(model):
            ref, ref_kl = _logps(model, matched), _logps(model, kl_pairs)
        loss, metrics = kto_loss(
            policy,
            ref,
            policy_kl,
            ref_kl,
            desirable,
            beta=config.beta,
            desirable_weight=w_desirable,
            undesirable_weight=w_undesirable,
        )
        phase.step(step, loss, {**metrics, "logps/policy": policy})
    summary = phase.summary(len(examples), time.perf_counter() - start)
    summary.update(
        {"kto/desirable_weight": float(w_desirable), "kto/undesirable_weight": float(w_undesirable)}
    )
    return summary, phase.history


def _train_dpo(
    model: Any,
    tokenizer: Any,
    examples: list[DPOExample],
    config: TrainConfig,
    progress: Callable[[dict], None] | None,
    generator: torch.Generator,
) -> tuple[dict[str, float], list[dict]]:
    """DPO phase: chosen and rejected of a batch go through the model in one forward."""
    start = time.perf_counter()
    total = phase_steps(len(examples), config, config.dpo_steps)
    phase = _Phase("dpo", model, total, config, progress)
    device = next(p.device for p in phase.params)
    batches = _batches(len(examples), config.batch_size, generator)
    for step in range(1, total + 1):
        batch = [examples[i] for i in next(batches)]
        pairs = [(e.chosen.prompt_ids, e.chosen.completion_ids) for e in batch]
        pairs += [(e.rejected.prompt_ids, e.rejected.completion_ids) for e in batch]
        both = modeling.collate(
            pairs, pad_id=_pad_id(tokenizer), max_length=config.max_length, device=device
        )
        policy = _logps(model, both)
        with modeling.reference_mode(model):
            ref = _logps(model, both)
        n = len(batch)
        lengths = {}
        if config.dpo_loss_type == "ipo":  # IPO compares per-token log-ratios, as TRL does
            counts = completion_token_counts(both.labels)
            lengths = {"chosen_lengths": counts[:n], "rejected_lengths": counts[n:]}
        loss, metrics = dpo_loss(
            policy[:n],
            policy[n:],
            ref[:n],
            ref[n:],
            beta=config.beta,
            loss_type=config.dpo_loss_type,
            **lengths,
        )
        phase.step(
            step, loss, {**metrics, "logps/chosen": policy[:n], "logps/rejected": policy[n:]}
        )
    return phase.summary(len(examples), time.perf_counter() - start), phase.history


def run_round(
    model: Any,
    tokenizer: Any,
    *,
    kto_rows: list[dict],
    dpo_rows: list[dict],
    config: TrainConfig = TrainConfig(),
    progress: Callable[[dict], None] | None = None,
) -> RoundResult:
    """Train ``model`` (a PEFT model whose only trainable weights are the LoRA ones) in
    place: the KTO phase over ``kto_rows``, then the DPO phase over ``dpo_rows``.
    Nothing is saved. Raises ValueError when there is nothing to train."""
    config.validate()
    _check_work(kto_rows, dpo_rows, config)
    kto = modeling.encode_kto_rows(tokenizer, kto_rows)
    dpo = modeling.encode_dpo_rows(tokenizer, dpo_rows)
    return _run_phases(model, tokenizer, kto, dpo, config, progress)


def _run_phases(
    model: Any,
    tokenizer: Any,
    kto: list[KTOExample],
    dpo: list[DPOExample],
    config: TrainConfig,
    progress: Callable[[dict], None] | None,
) -> RoundResult:
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable (LoRA) parameters")
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    model.train()
    metrics: dict[str, float] = {}
    history: list[dict] = []
    if phase_steps(len(kto), config, config.kto_steps):
        phase_metrics, phase_history = _train_kto(
            model, tokenizer, kto, config, progress, generator
        )
        metrics.update(phase_metrics)
        history += phase_history
    if phase_steps(len(dpo), config, config.dpo_steps):
        phase_metrics, phase_history = _train_dpo(
            model, tokenizer, dpo, config, progress, generator
        )
        metrics.update(phase_metrics)
        history += phase_history
    metrics["seconds"] = time.perf_counter() - start
    return RoundResult(metrics=metrics, history=history)


def _check_work(kto: list[dict], dpo: list[dict], config: TrainConfig) -> None:
    if not isinstance(kto, list) or not isinstance(dpo, list):
        raise TypeError("kto_rows and dpo_rows must be lists of dicts")
    if not kto and not dpo:
        raise ValueError("a training round needs at least one KTO row or one DPO row")
    if not (
        phase_steps(len(kto), config, config.kto_steps)
        or phase_steps(len(dpo), config, config.dpo_steps)
    ):
        raise ValueError("nothing to train: the phases with rows have 0 steps configured")


def train_round(
    *,
    base_model: str,
    parent_adapter: Path | None,
    kto_rows: list[dict],
    dpo_rows: list[dict],
    out_dir: Path,
    config: TrainConfig = TrainConfig(),
    progress: Callable[[dict], None] | None = None,
) -> RoundResult:
    """Train one adapter version and save it with ``save_pretrained`` to ``out_dir``.

    Starts from ``parent_adapter`` (loaded trainable) or a fresh LoRA; the reference is
    the base with the adapter disabled. KTO phase over ``kto_rows`` (TRL unpaired rows
    ``{prompt, completion, label}``), then DPO phase over ``dpo_rows`` (``{prompt,
    chosen, rejected}``); a round with one kind runs one phase; with neither, ValueError.
    ``progress(record)`` gets the logged step records (see :class:`RoundResult`). On
    CUDA the base is 4-bit NF4 (QLoRA), on the CPU float32. The caller renames
    ``out_dir`` into place and registers it.
    """
    config.validate()
    _check_work(kto_rows, dpo_rows, config)
    device = modeling.resolve_device(config.device)
    quantize = modeling.resolve_quantize(config.quantize_4bit, device)
    checkpointing = (
        config.gradient_checkpointing
        if config.gradient_checkpointing is not None
        else device.type == "cuda"
    )
    start = time.perf_counter()
    tokenizer = modeling.load_tokenizer(base_model)
    kto = modeling.encode_kto_rows(tokenizer, kto_rows)
    dpo = modeling.encode_dpo_rows(tokenizer, dpo_rows)
    torch.manual_seed(config.seed)  # the fresh LoRA's A matrices are drawn here
    lora = modeling.fresh_lora_config(
        r=config.lora_r,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        target_modules=config.target_modules,
    )
    model = modeling.load_trainable_model(
        base_model,
        parent_adapter=parent_adapter,
        lora=lora,
        device=device,
        quantize_4bit=quantize,
        gradient_checkpointing=checkpointing,
    )
    result = _run_phases(model, tokenizer, kto, dpo, config, progress)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    metrics = dict(result.metrics, seconds=time.perf_counter() - start)
    metrics["quantized_4bit"] = float(quantize)
    return RoundResult(metrics=metrics, history=result.history)
