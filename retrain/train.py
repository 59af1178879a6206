"""One training round: KTO over thumbs, then DPO over pairs, on ONE LoRA adapter.

Phases of :func:`train_round`: validate the config and rows, tokenise, load the base
and the adapter (the parent, trainable, or a fresh LoRA), train the KTO phase, train
the DPO phase, save the adapter. The reference model is the base with the adapter
disabled (``modeling.reference_mode``), never a second copy, so every round is
regularised toward the base and drift cannot pile up round after round.

Each phase is a stream of shuffled epochs cut into batches of ``min(batch_size,
rows)``; it runs ``min(max_steps, max(min_steps, ceil(epochs * ceil(rows /
batch_size))))`` optimiser
steps (AdamW, linear warm-up then a cosine decay to a tenth, gradient-norm clipping). Log
probabilities are sums over completion tokens (``losses.sequence_logps``); a batch's rows
go through the model in groups of similar length (:mod:`retrain.grouping`), which
changes the values only by float rounding.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from retrain import modeling
from retrain.budget import KLProbe, probe_prompts
from retrain.grouping import grouped_logps
from retrain.losses import (
    balanced_kto_weights,
    dpo_loss,
    kto_loss,
    mismatched_indices,
    nll_per_token,
)
from retrain.modeling import DPOExample, KTOExample
from retrain.train_config import TrainConfig

_NOT_AVERAGED = frozenset({"phase", "step", "total_steps", "lr", "reward_margin"})
# While the last KL check read at most this share of the budget (none over it in a row),
# the next check comes after this many times kl_check_every steps.
_FAR_SHARE = 0.5
_FAR_SPACING = 2


class TrainingError(RuntimeError):
    """Training went wrong numerically (a non-finite loss); nothing is saved."""


@dataclass(frozen=True)
class RoundResult:
    """What a round did. ``metrics``: per phase ``{phase}/rows``, ``/steps``,
    ``/seconds``, ``/loss`` (mean over steps), ``/loss_final`` and the mean of every
    loss metric (``{phase}/rewards/margins``, ``kto/kl``, ...), plus ``seconds``.
    ``history``: one dict per logged step (the first, every ``log_every``-th, the last)."""

    metrics: dict[str, float]
    history: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class World:
    """The processes a round is trained on, data-parallel: ``size`` of them, this one
    ``rank``. Every process draws the same batches (same seed); each takes the rows at
    positions ``rank, rank + size, ...`` of a batch, scales its loss to its share of the
    batch's mean, and the gradients are summed across processes before the (identical)
    clipping and optimiser step, so the weights stay the same everywhere and equal a
    single process's up to the order of float additions. KTO's reference point is
    averaged over the whole batch. ``size == 1`` is one process, with no communication."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> list[int]:
        """Positions of a batch of ``n`` rows that this process computes."""
        return list(range(self.rank, n, self.size))

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the processes, in place; returns it."""
        if self.size > 1:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def broadcast(self, value: Any) -> Any:
        """The main process's ``value`` (any picklable object), in every process."""
        if self.size == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        if self.size == 1:
            return
        for p in params:
            if p.grad is None:  # this process's share was empty
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        self.sum_(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset: offset + n].view_as(p))
            offset += n


ONE_PROCESS = World()


def phase_steps(n_rows: int, config: TrainConfig, max_steps: int) -> int:
    """Optimiser steps of a phase: ``min(max_steps, max(min_steps, ceil(epochs *
    ceil(rows / batch))))``, 0 without rows."""
    if n_rows == 0 or max_steps == 0:
        return 0
    per_epoch = math.ceil(n_rows / config.batch_size)
    return max(1, min(max_steps, max(config.min_steps, math.ceil(config.epochs * per_epoch))))


def _batches(n_rows: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless batches of ``min(batch_size, n_rows)`` indices from shuffled epochs.

    The stream is the concatenation of epochs, each a permutation of the rows. A batch
    that straddles two epochs takes its rows from the new epoch among those not already
    in it (the rest of that epoch follows in its shuffled order), so no batch holds a
    row twice. Deterministic for a given generator state."""
    size = min(batch_size, n_rows)
    pending: list[int] = []
    while True:
        while len(pending) < size:
            epoch = torch.randperm(n_rows, generator=generator).tolist()
            if pending:
                carried = set(pending)
                head = [i for i in epoch if i not in carried][: size - len(pending)]
                taken = set(head)
                epoch = head + [i for i in epoch if i not in taken]
            pending += epoch
        yield pending[:size]
        pending = pending[size:]


def _scalar(value: torch.Tensor | float) -> float:
    if isinstance(value, torch.Tensor):
        return value.detach().float().mean().item() if value.numel() else math.nan
    return float(value)


def _logps(model: torch.nn.Module, collate: Callable[..., Any],
           turns: list[tuple[tuple[int, ...], tuple[int, ...]]]
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logps, scored token counts)`` of ``turns``, through the model in groups of
    similar length (:func:`retrain.grouping.grouped_logps`)."""
    return grouped_logps(model, collate, turns, max_length=collate.keywords["max_length"])


def _collater(tokenizer: Any, config: TrainConfig, device: Any) -> Callable[..., Any]:
    """Batch collation for a phase's rows (and its reference cache): padded with the
    tokenizer's pad id, cut to ``config.max_length``, on the phase's device."""
    return functools.partial(modeling.collate, pad_id=modeling.pad_id(tokenizer),
                             max_length=config.max_length, device=device)


class _ReferenceCache:
    """Reference log-probabilities of a phase's completions, each computed once: the
    reference (the base, adapter off) does not change during a round, so a row's value
    in its first batch holds for every later epoch. Saves one of the step's forwards
    over the model from the second epoch on."""

    def __init__(self, model: torch.nn.Module,
                 collate: Callable[[list[tuple[tuple[int, ...], tuple[int, ...]]]], Any]) -> None:
        self.model, self.collate = model, collate
        self.values: dict[Any, torch.Tensor] = {}

    def logps(self, keys: list[Any], pairs: list[tuple[tuple[int, ...], tuple[int, ...]]]
              ) -> torch.Tensor:
        missing = {key: pair for key, pair in zip(keys, pairs, strict=True)
                   if key not in self.values}
        if missing:
            with modeling.reference_mode(self.model):
                values, _ = _logps(self.model, self.collate, list(missing.values()))
            self.values.update(zip(missing, values, strict=True))
        return torch.stack([self.values[key] for key in keys])


class _Phase:
    """Shared plumbing of a phase: optimiser, schedule, KL budget, logging, averaging.

    The learning rate (``learning_rate``, else ``config.learning_rate``; KTO passes its
    own) warms up linearly over ``warmup_ratio`` of the steps, then decays
    along a cosine to a tenth of its peak at the last step. Every ``kl_check_every``
    steps (and after the last) the :class:`KLProbe` measures how far the adapter has
    moved replies from the base; the LoRA weights of the last check within
    ``kl_budget`` are kept. After ``kl_patience`` checks in a row over the budget the
    phase backs off: it puts those weights back, halves the learning rate, forgets the
    optimiser's moments and goes on (at most ``kl_backoffs`` times); after that, such a
    run of checks ends the phase (``budget_reached``). A rate too high for the data thus
    costs a few steps instead of the round (without the back-off, KTO at 4e-3 overshot
    the budget by step 10 and the round ended as a no-op), and the adapter a round saves
    is always within its budget.

    While the last check read no more than half the budget (and none is over it in a
    row), the next comes after twice ``kl_check_every`` steps: a phase far inside its
    budget spends fewer seconds sampling, and one near it is checked as often as before.
    """

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        total: int,
        config: TrainConfig,
        progress: Callable[[dict], None] | None,
        world: World = ONE_PROCESS,
        learning_rate: float | None = None,
    ) -> None:
        self.name, self.model, self.total, self.config = name, model, total, config
        self.progress = progress if world.main else None
        self.world = world
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = self.params[0].device
        rate = config.learning_rate if learning_rate is None else learning_rate
        self.optimizer = torch.optim.AdamW(self.params, lr=rate, weight_decay=0.0)
        warmup = round(config.warmup_ratio * total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            t = (step - warmup) / max(1, total - 1 - warmup)
            return 0.1 + 0.9 * (1 + math.cos(math.pi * min(1.0, t))) / 2

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.history: list[dict] = []
        self.probe: KLProbe | None = None
        self.probe_kl = math.nan
        self.next_check = config.kl_check_every
        self.over_budget = 0
        self.budget_reached = False
        self.backoffs = 0
        self.steps_done = 0
        self.last_loss = math.nan
        self.bar = tqdm(total=total, desc=f"{name} phase", unit="step", dynamic_ncols=True,
                        disable=not world.main)

    def step(self, step: int, loss: torch.Tensor, metrics: dict[str, torch.Tensor | float]) -> None:
        """Back-propagate ``loss``, take one optimiser step and record ``metrics``."""
        bad = self.world.sum_(torch.tensor([0.0 if torch.isfinite(loss) else 1.0]))
        if bad.item():  # on any process: all of them stop here together
            self.bar.close()
            raise TrainingError(f"{self.name} loss is {loss.item()} at step {step} "
                                f"(on {int(bad.item())} of {self.world.size} processes); "
                                "nothing saved")
        lr = self.scheduler.get_last_lr()[0]
        if loss.requires_grad:
            loss.backward()
        self.world.sum_grads(self.params)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done = step
        record: dict[str, Any] = {"phase": self.name, "step": step, "total_steps": self.total}
        # the whole batch's loss (the processes' shares summed); other figures are this
        # process's share of the batch
        whole = self.world.sum_(loss.detach().reshape(1).clone()) if self.world.size > 1 else loss
        record["loss"] = self.last_loss = whole.item()
        values = {key: _scalar(value) for key, value in metrics.items()}
        record["reward_margin"] = values.get("rewards/margins", math.nan)
        record.update(values, lr=lr, grad_norm=_scalar(grad_norm))
        for key, value in record.items():
            if key not in _NOT_AVERAGED and math.isfinite(value):
                self.sums[key] = self.sums.get(key, 0.0) + value
                self.counts[key] = self.counts.get(key, 0) + 1
        if self.probe is not None and (step >= self.next_check or step == self.total):
            self.probe_kl, over = self.probe.check(self.model)
            record["kl/sampled"] = self.probe_kl
            self.over_budget = self.over_budget + 1 if over else 0
            self.next_check = step + self._check_interval()
            if self.over_budget >= self.config.kl_patience:
                if self.backoffs < self.config.kl_backoffs and step < self.total:
                    self._back_off()
                    record["kl/backoff"] = float(self.backoffs)
                else:
                    self.budget_reached = True
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", margin=f"{record['reward_margin']:.3f}")
        last = step == self.total or self.budget_reached
        if step == 1 or step % self.config.log_every == 0 or last or "kl/backoff" in record:
            self.history.append(record)
            if self.progress is not None:
                self.progress(dict(record))

    def _check_interval(self) -> int:
        """Steps to the next KL check: twice ``kl_check_every`` while the last reading
        was far inside the budget, else ``kl_check_every``."""
        budget = self.config.kl_budget
        far = (budget is not None and self.over_budget == 0
               and math.isfinite(self.probe_kl) and self.probe_kl <= _FAR_SHARE * budget)
        return self.config.kl_check_every * (_FAR_SPACING if far else 1)

    def _back_off(self) -> None:
        """Weights of the last check within budget, half the learning rate, fresh
        moments."""
        self.probe.restore()
        self.backoffs += 1
        self.over_budget = 0
        self.scheduler.base_lrs = [lr / 2 for lr in self.scheduler.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(),
                             strict=True):
            group["lr"] = lr / 2
        self.optimizer.state.clear()

    def summary(self, rows: int, seconds: float) -> dict[str, float]:
        self.bar.close()
        out = {f"{self.name}/{key}": self.sums[key] / self.counts[key] for key in self.sums}
        out.update(
            {
                f"{self.name}/rows": float(rows),
                f"{self.name}/steps": float(self.steps_done),
                f"{self.name}/planned_steps": float(self.total),
                f"{self.name}/seconds": seconds,
                f"{self.name}/loss_final": self.last_loss,
                f"{self.name}/kl_sampled": self.probe_kl,
                f"{self.name}/stopped_by_kl_budget": float(self.budget_reached),
                f"{self.name}/kl_backoffs": float(self.backoffs),
                f"{self.name}/peak_lr": self.scheduler.base_lrs[0],
            }
        )
        return out


def _train_kto(
    model: Any,
    tokenizer: Any,
    examples: list[KTOExample],
    config: TrainConfig,
    progress: Callable[[dict], None] | None,
    generator: torch.Generator,
    probe: KLProbe | None = None,
    world: World = ONE_PROCESS,
) -> tuple[dict[str, float], list[dict]]:
    """KTO phase. The KL reference point of each batch comes from mismatched pairs
    (prompt i with completion j != i, ``mismatched_indices``), scored without gradient.
    The loss adds ``sft_weight`` times the mean per-token NLL of the batch's desirable
    completions (none in the batch: no NLL term)."""
    start = time.perf_counter()
    n_desirable = sum(e.desirable for e in examples)
    balanced = balanced_kto_weights(n_desirable, len(examples) - n_desirable)
    w_desirable = config.desirable_weight if config.desirable_weight is not None else balanced[0]
    w_undesirable = (
        config.undesirable_weight if config.undesirable_weight is not None else balanced[1]
    )
    total = phase_steps(len(examples), config, config.kto_steps)
    phase = _Phase("kto", model, total, config, progress, world,
                   learning_rate=config.kto_learning_rate)
    phase.probe = probe
    device = phase.device
    batches = _batches(len(examples), config.batch_size, generator)
    collate = _collater(tokenizer, config, device)
    reference = _ReferenceCache(model, collate)
    for step in range(1, total + 1):
        rows = next(batches)
        whole = [examples[i] for i in rows]
        mismatched = mismatched_indices(len(whole))
        mine = world.share(len(whole))
        if not mine:  # fewer rows in the batch than processes: this one has none
            phase.step(step, torch.zeros(()), {})
            if phase.budget_reached:
                break
            continue
        batch = [whole[i] for i in mine]
        turns = [(e.turn.prompt_ids, e.turn.completion_ids) for e in batch]
        kl_pairs = [(whole[i].turn.prompt_ids, whole[mismatched[i]].turn.completion_ids)
                    for i in mine]
        desirable = torch.tensor([e.desirable for e in batch], dtype=torch.bool, device=device)
        policy, counts = _logps(model, collate, turns)
        ref = reference.logps([rows[i] for i in mine], turns)
        with torch.no_grad():
            policy_kl, _ = _logps(model, collate, kl_pairs)
            with modeling.reference_mode(model):
                ref_kl, _ = _logps(model, collate, kl_pairs)
            # z0 = the mean over the whole batch, whichever process scored which pair
            z0 = world.sum_((policy_kl - ref_kl).sum().reshape(1)) / len(whole)
        loss, metrics = kto_loss(
            policy,
            ref,
            policy_kl,
            ref_kl,
            desirable,
            beta=config.beta,
            desirable_weight=w_desirable,
            undesirable_weight=w_undesirable,
            reference_point=z0,
        )
        loss = loss * (len(batch) / len(whole))  # this share of the whole batch's mean
        nll = nll_per_token(policy, counts)
        whole_desirable = sum(e.desirable for e in whole)
        if config.sft_weight and bool(desirable.any()):
            loss = loss + config.sft_weight * nll[desirable].sum() / whole_desirable
        logged = {**metrics, "logps/policy": policy}
        if bool(desirable.any()):
            logged["nll/desirable"] = nll[desirable]
        phase.step(step, loss, logged)
        if phase.budget_reached:
            break
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
    probe: KLProbe | None = None,
    world: World = ONE_PROCESS,
) -> tuple[dict[str, float], list[dict]]:
    """DPO phase: chosen and rejected of a batch go through the model in one forward.
    The loss adds ``sft_weight`` times the mean per-token NLL of the chosen replies
    (RPO)."""
    start = time.perf_counter()
    total = phase_steps(len(examples), config, config.dpo_steps)
    phase = _Phase("dpo", model, total, config, progress, world)
    phase.probe = probe
    batches = _batches(len(examples), config.batch_size, generator)
    collate = _collater(tokenizer, config, phase.device)
    reference = _ReferenceCache(model, collate)
    for step in range(1, total + 1):
        rows = next(batches)
        whole = [examples[i] for i in rows]
        mine = world.share(len(whole))
        batch = [whole[i] for i in mine]
        if not batch:  # fewer pairs in the batch than processes: this one has none
            phase.step(step, torch.zeros(()), {})
            if phase.budget_reached:
                break
            continue
        pairs = [(e.chosen.prompt_ids, e.chosen.completion_ids) for e in batch]
        pairs += [(e.rejected.prompt_ids, e.rejected.completion_ids) for e in batch]
        policy, counts = _logps(model, collate, pairs)
        keys = [(rows[i], "chosen") for i in mine] + [(rows[i], "rejected") for i in mine]
        ref = reference.logps(keys, pairs)
        n = len(batch)
        lengths = {}
        if config.dpo_loss_type == "ipo":  # IPO compares per-token log-ratios, as TRL does
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
        loss = loss * (n / len(whole))  # this share of the whole batch's mean
        nll = nll_per_token(policy[:n], counts[:n])
        if config.sft_weight:
            loss = loss + config.sft_weight * nll.sum() / len(whole)
        phase.step(
            step,
            loss,
            {**metrics, "logps/chosen": policy[:n], "logps/rejected": policy[n:],
             "nll/chosen": nll},
        )
        if phase.budget_reached:
            break
    return phase.summary(len(examples), time.perf_counter() - start), phase.history


def run_round(
    model: Any,
    tokenizer: Any,
    *,
    kto_rows: list[dict],
    dpo_rows: list[dict],
    config: TrainConfig = TrainConfig(),
    progress: Callable[[dict], None] | None = None,
    probe_messages: list[list[dict]] | None = None,
    asked_prompts: list[list[dict]] | None = None,
) -> RoundResult:
    """Train ``model`` (a PEFT model whose only trainable weights are the LoRA ones) in
    place: the KTO phase over ``kto_rows``, then the DPO phase over ``dpo_rows``.
    Nothing is saved. Raises ValueError when there is nothing to train.
    ``probe_messages``: where the KL budget is measured; ``asked_prompts``: more prompts
    for pairs of the model's own replies (see :func:`train_round`)."""
    config.validate()
    _check_work(kto_rows, dpo_rows, config)
    probes = (probe_messages or probe_prompts(kto_rows + dpo_rows, config.kl_probe_prompts,
                                              config.seed))[: config.kl_probe_prompts]
    kto = modeling.encode_kto_rows(tokenizer, kto_rows)
    dpo = modeling.encode_dpo_rows(tokenizer, dpo_rows, max_length=config.max_length)
    dpo, pair_metrics = _round_pairs(model, tokenizer, kto_rows, dpo_rows, dpo, config,
                                     asked=asked_prompts or [])
    result = _run_phases(model, tokenizer, kto, dpo, config, progress, probes)
    result.metrics.update(pair_metrics)
    return result


def _round_pairs(model: Any, tokenizer: Any, kto_rows: list[dict], dpo_rows: list[dict],
                 given: list[DPOExample], config: TrainConfig, world: World = ONE_PROCESS,
                 asked: list[list[dict]] | None = None
                 ) -> tuple[list[DPOExample], dict[str, float]]:
    """The DPO examples the round trains on (:func:`retrain.onpolicy.refresh_pairs`),
    the same in every process (the main process's); ``given`` (the users' pairs,
    ``dpo_rows`` encoded) when the refresh is off or leaves nothing. A round of thumbs
    alone gets own-reply pairs too, and with none it is the KTO phase alone."""
    from retrain.onpolicy import refresh_pairs

    if not config.refresh_pairs:
        return given, {}
    mine = (refresh_pairs(model, tokenizer, kto_rows, dpo_rows, config, asked or [])
            if world.main or world.size == 1 else None)
    rows, metrics = world.broadcast(mine)
    if not rows:
        return given, {**metrics, "pairs/as_given": 1.0} if dpo_rows else metrics
    return modeling.encode_dpo_rows(tokenizer, rows, max_length=config.max_length), metrics


def _run_phases(
    model: Any,
    tokenizer: Any,
    kto: list[KTOExample],
    dpo: list[DPOExample],
    config: TrainConfig,
    progress: Callable[[dict], None] | None,
    probes: list[list[dict]],
    world: World = ONE_PROCESS,
) -> RoundResult:
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable (LoRA) parameters")
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    probe = None
    if config.kl_budget is not None and probes:
        probe = KLProbe(
            model,
            tokenizer,
            probes,
            budget=config.kl_budget,
            samples=config.kl_probe_samples,
            max_new_tokens=config.kl_probe_tokens,
            max_prompt_tokens=max(1, config.max_length - config.kl_probe_tokens),
            seed=config.seed,
        )
    model.train()
    metrics: dict[str, float] = {}
    history: list[dict] = []
    # Down-votes alone beside pairs (users who only edit: each edited reply counts as its
    # author's down-vote) made a KTO phase that overshot the KL budget at once, backed
    # off and ended within 0.002 nats/token of the base in every such round of the
    # alignment benchmark, 40 s of each round for nothing; DPO learns from the same edits.
    only_down = bool(kto) and bool(dpo) and not any(e.desirable for e in kto)
    if only_down:
        metrics["kto/skipped_only_down_votes"] = float(len(kto))
    elif phase_steps(len(kto), config, config.kto_steps):
        phase_metrics, phase_history = _train_kto(
            model, tokenizer, kto, config, progress, generator, probe, world
        )
        metrics.update(phase_metrics)
        history += phase_history
    if phase_steps(len(dpo), config, config.dpo_steps):
        if probe is not None:
            probe.restore()  # the DPO phase starts within budget, however KTO's ended
        phase_metrics, phase_history = _train_dpo(
            model, tokenizer, dpo, config, progress, generator, probe, world
        )
        metrics.update(phase_metrics)
        history += phase_history
    if probe is not None:
        metrics["restored_to_budget"] = float(probe.restore())
        metrics["kl_sampled"] = next(
            (kl for kl in reversed(probe.history) if kl <= config.kl_budget), 0.0
        )
        metrics["kl_checks"] = float(len(probe.history))
        metrics["stopped_by_kl_budget"] = float(
            any(metrics.get(f"{name}/stopped_by_kl_budget") for name in ("kto", "dpo"))
        )
        metrics["kl_backoffs"] = sum(metrics.get(f"{name}/kl_backoffs", 0.0)
                                     for name in ("kto", "dpo"))
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
    probe_messages: list[list[dict]] | None = None,
    world: World = ONE_PROCESS,
    asked_prompts: list[list[dict]] | None = None,
) -> RoundResult:
    """Train one adapter version and save it with ``save_pretrained`` to ``out_dir``.

    Starts from ``parent_adapter`` (loaded trainable) or a fresh LoRA; the reference is
    the base with the adapter disabled. KTO phase over ``kto_rows`` (TRL unpaired rows
    ``{prompt, completion, label}``), then DPO phase over ``dpo_rows`` (``{prompt,
    chosen, rejected}``); a round with one kind runs one phase; with neither, ValueError.
    ``progress(record)`` gets the logged step records (see :class:`RoundResult`). On
    CUDA the base is 4-bit NF4 (QLoRA), on the CPU float32. The caller renames
    ``out_dir`` into place and registers it.

    ``config.start_from`` ``"base"`` (the default) ignores ``parent_adapter`` and trains
    a fresh LoRA on all the rows given, so a round's result depends on the feedback,
    not on the path of earlier rounds, and each round has the whole KL budget against
    the base; ``"parent"`` continues the parent adapter. ``probe_messages`` (chat
    prompts, best not trained on, e.g. the held-out split's) are where the KL budget is
    measured on sampled replies (:mod:`retrain.budget`); by default the rows' own
    prompts. ``world``: this process's place when the round runs data-parallel
    (:class:`World`, :mod:`retrain.distributed`); only the main process saves.
    ``asked_prompts``: prompts of the training split answered, rated or not, whose
    replies may also make pairs of the model's own replies
    (:func:`retrain.onpolicy.pair_prompts`).
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
    dpo = modeling.encode_dpo_rows(tokenizer, dpo_rows, max_length=config.max_length)
    torch.manual_seed(config.seed)  # the fresh LoRA's A matrices are drawn here
    lora = modeling.fresh_lora_config(
        r=config.lora_r,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        target_modules=config.target_modules,
    )
    if config.start_from == "base":
        parent_adapter = None
    model = modeling.load_trainable_model(
        base_model,
        parent_adapter=parent_adapter,
        lora=lora,
        device=device,
        quantize_4bit=quantize,
        gradient_checkpointing=checkpointing,
    )
    probes = (probe_messages or probe_prompts(kto_rows + dpo_rows, config.kl_probe_prompts,
                                              config.seed))[: config.kl_probe_prompts]
    dpo, pair_metrics = _round_pairs(model, tokenizer, kto_rows, dpo_rows, dpo, config, world,
                                     asked_prompts)
    result = _run_phases(model, tokenizer, kto, dpo, config, progress, probes, world)
    result.metrics.update(pair_metrics)
    if world.main:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir))
    metrics = dict(result.metrics, seconds=time.perf_counter() - start)
    metrics["quantized_4bit"] = float(quantize)
    return RoundResult(metrics=metrics, history=result.history)
