"""The settings of one training round (:class:`TrainConfig`), with the measurements
that chose its defaults. Kept apart from :mod:`retrain.train`, which runs a round."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

START_FROM = ("parent", "base")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_pos(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one round. The defaults were chosen with ``benchmarks/bench_alignment.py``
    and the in-process rounds of ``tests/test_learning.py`` on the demo model (README,
    "Does the loop make the model better?"), where they were measured:

    - ``learning_rate`` (DPO's) 3e-3 with ``batch_size`` 8 for up to ``epochs`` 20 (at
      most ``kto_steps`` 150 and ``dpo_steps`` 300: the DPO phase has the own-reply
      pairs of up to 200 prompts, below); it was 5e-4 until the DPO rows became the
      pairs the model can reach (``refresh_pairs``, below). The old 5e-5 for at most 50
      steps of 4 left the
      sampled replies exactly as the base's (KL 0.0000 nats/token on held-out prompts),
      and without a budget 1e-3 reached the judge's ceiling but at KL 1.9 with replies
      cut mid-sentence.
    - ``kto_learning_rate`` 3e-3 for the KTO phase (``None``: ``learning_rate``). At
      5e-4 the KTO phases of the alignment benchmark ran into their 150-step cap with
      sampled replies moved by only 0.02-0.05 nats/token (budget 0.15), and thumbs on
      the content judge (``on_subject``) changed nothing in any round. In process, 976
      thumbs of that judge, 150 steps (held-out score, base 0.312, best-of-8 0.542):
      5e-4 gave 0.323 (KL 0.007); 3e-3 gave 0.401 (KL 0.077; 0.359 at KL 0.034 with
      another seed); 2e-3 needed 300 steps for 0.391. KTO at 4e-3 passed the budget
      within 10 steps; the budget's back-off (below) covers such overshoots.
    - ``refresh_pairs`` on, ``pair_cost_limit`` 1.5, ``pair_samples`` 4, ``pair_gap``
      0.5, ``pair_prompts`` 200, ``pair_min_accuracy`` 0.5 (:mod:`retrain.onpolicy`):
      DPO trains on the users' pairs that cost the base at most 1.5 nats/token and on
      pairs of the model's own replies, to up to 200 of the prompts users asked, ranked
      by a scorer fitted to the feedback, at 3e-3. A round of thumbs alone draws them
      too: thumbs-only candidates of the content judge (``on_subject``) rose -0.007 to
      +0.017 on 72 held-out prompts without them, +0.075 to +0.087 with them (the
      alignment benchmark's ``kto`` runs; :mod:`retrain.onpolicy`). With own-reply pairs
      on the prompts of the users' pairs alone (``pair_prompts`` 0), edits did not teach
      the content judge (``on_subject``, ``dpo``, round 2's rows, 72 held-out prompts: +0.007 and
      -0.062 over two seeds); on 200 prompts and up to 300 steps, +0.087 and +0.083 at
      KL 0.04-0.05 (``benchmarks/bench_round.py``; 200 steps: +0.075). The pairs are
      drawn only when the scorer's cross-validated accuracy on the round's rows is above
      ``pair_min_accuracy`` at 95%: a scorer fitted to random ratings ranks by what it
      happened to learn, and 89 such pairs moved a style rule by +0.10 in a round on
      random ratings (``tests/test_learning.py`` allows 0.1; with the check, +0.025).
      On the alignment benchmark's rounds the check's bound was 0.57-0.95 for every
      judge and 0.38-0.49 for the random-rating control. On the users' edits as given,
      DPO moved nothing where edits cost the base 4-6 nats/token (``detailed``, round 2 of the alignment
      benchmark: 0.548 against the base's 0.541 at 5e-4; 1e-3 or an NLL weight of 3
      did no better), because the KL budget is spent long before the replies change.
      The same round's rows refreshed: 0.716 at KL 0.033. At 5e-4 pairs of the
      model's own replies moved nothing (0.558, KL 0.004); at 3e-3 the users' edits
      alone overshot the budget within 10 steps (``concise``, 47 edit pairs). Over the
      benchmark's six judges, ``both`` (thumbs and edits) went from 4 to 6 judges half
      way or more to the best-of-8 ceiling after 3 rounds, ``dpo`` (edits and picks
      only) from 4 to 4 (``concise`` 0.829 -> 0.949; ``detailed`` 0.541 -> 0.572 is
      still short), with the random-rating control unmoved (README, "Pairs the model
      can reach").
    - ``beta`` 0.5: with 0.1 the same round moved the judge score 57% of the way to the
      best-of-8 ceiling at KL 0.08; with 0.5, 78% at KL 0.04. A larger beta makes KTO's
      and DPO's sigmoids saturate after a smaller log-ratio, so an example that is
      already learned stops pulling the model away from the base.
    - ``sft_weight`` 1.0: the per-token NLL of desirable/chosen replies added to the
      loss (RPO), against likelihood displacement.
    - ``kl_budget`` 0.15 nats/token of sampled-reply KL from the base on probe prompts
      (:mod:`retrain.budget`), checked every ``kl_check_every`` 15 steps; after
      ``kl_patience`` 2 checks in a row over it the phase backs off (the weights of the
      last check within budget, half the rate; at most ``kl_backoffs`` times, see
      :class:`retrain.train._Phase`) and then stops; the adapter saved is the one of the last check
      within budget. The gate's own limit is 0.3. While the last check read at most
      half the budget, the next comes after twice ``kl_check_every`` steps: on the
      rows of round 1 of a ``kto``/``calm`` benchmark run the round gave the same
      result (+0.177 on 72 held-out prompts, KL 0.157) in 94 s instead of 103 s
      (``benchmarks/bench_round.py``); its KTO phase ended at 0.036, its DPO phase
      ran into the budget and was checked as before. A check (64 replies sampled and
      scored) cost about 3 s on 2 CPU cores, as much as 6-7 training steps: checking
      every 10 steps, with 3 over in a row to back off (the same 30 steps), put the
      full alignment benchmark at 61 minutes. (Drawing each token from the nucleus of
      the 64 likeliest tokens instead of sorting the vocabulary brought a check from
      2.5 to 1.9 s, and a round of 210 steps from 80 to 67 s; letting each finished
      reply leave the batch brought a thumbs-only round of 260 steps and 18 checks from
      171 to 153 s, the checks from 2.7 to 2.1 s each: ``benchmarks/bench_sampling.py``.)
      The probe samples up to ``kl_probe_tokens`` 256 tokens, as many as the gate does:
      with 64 a round whose replies ran long read 0.127 in training and 0.35 at the gate
      (KL grows along a reply as it drifts), so it passed its budget and was rejected.
    - ``start_from`` "base": each round trains a fresh LoRA on all the feedback so far.
    - ``min_steps`` 60: a phase with few rows still runs 60 steps, and the KL budget, not
      the epoch count, says when to stop. Edits alone give few rows (about 35 pairs in
      200 rated replies), and 5 epochs of them were 15-30 steps, which left the sampled
      replies as the base's (``concise`` judge, 22 edit pairs: 0.693 against the base's
      0.716; 44 pairs: 0.749). With the edited replies also counted as down-votes (the
      worker's ``edits_as_votes``) and 60 steps per phase: 0.838 at KL 0.19 (22 pairs)
      and 0.842 at KL 0.07 (44 pairs), past half way to the best-of-8 ceiling (0.952).
      DPO alone for 60 steps did not get there (0.712 and 0.804): it moves toward the
      edits, which the model hardly ever says, and the KL cliff comes before the score.
    - ``epochs`` 10 and ``kl_probe_samples`` 4 (were 5 and 2): users who edit also
      regenerate and pick, and 40 picks added to those 44 edits held the round at 0.757
      (KL 0.015): with twice the rows, 5 epochs are 60 steps, each edit is seen half as
      often, and the round stopped far inside its budget. With 10 epochs the DPO phase
      ran on until the probe stopped it, at 0.832 (KL 0.092); with thumbs as well,
      0.862 (KL 0.067) became 0.871 (KL 0.093). Two samples per probe prompt had read
      0.105 for an adapter whose fresh replies moved by 0.282 (the gate's limit is
      0.3); four keep the budget an honest brake on the longer phases.
    - ``epochs`` 20 (was 10): the own-reply pairs' DPO phase ended far inside its budget
      (KL 0.04-0.05) with the content judge (``on_subject``) short of half way. In
      process on the thumbs of round 1 of the alignment benchmark's ``kto`` runs
      (``benchmarks/bench_round.py``, 72 held-out prompts, base 0.377, best-of-8
      0.590, half way +0.107), two training seeds: 10 epochs (230 DPO steps over 179
      pairs) rose +0.083 and +0.080, 20 epochs (the 300-step cap) +0.111 and +0.113
      at KL 0.058 and 0.048. ``concise`` +0.286 -> +0.273 (KL 0.177 -> 0.144) and
      ``calm`` +0.191 -> +0.188 (KL 0.199 -> 0.155) stayed where they were. Tried on
      the same rows and not taken: DPO at 5e-3 (+0.111, then +0.078 with the other
      seed), ``beta`` 0.2 (+0.097 at KL 0.097), 8 replies per prompt (+0.066), and the
      best reply against each other one (291 pairs, +0.068). The KTO phases of those
      rounds hit ``kto_steps`` either way; a DPO phase costs about 30 s more.
      Those rounds drew own-reply pairs on 200 prompts, some asked after round 1 (the
      asked prompts were read then without the round's event bound, which they have
      now). On the round's own rows (149 prompts, 128 pairs): +0.085 with 10 epochs,
      +0.109 with 20; on the rows of another run's round 1, +0.075 and +0.106.
    - The DPO phase runs after a KTO phase that ended on the KL budget (it used to be
      skipped), from the KTO phase's last weights within budget. Through the service,
      the round-1 candidate of ``on_subject`` had been the KTO phase alone: it ended at
      the probe's KL 0.153 after one back-off, and rose +0.028 on the 72 held-out prompts
      (KL 0.063 there). With the own-reply pairs' DPO phase after it, the same rows
      rose +0.106 (KL 0.076 there; the probe read 0.058).

    ``processes`` above 1 trains the round data-parallel on that many processes
    (:mod:`retrain.distributed`, through ``accelerate launch``; one GPU each on CUDA).

    ``kto_steps``/``dpo_steps`` are upper bounds (0 skips a phase); a phase runs
    ``epochs`` passes over its rows, but at least ``min_steps`` steps. ``desirable_weight``/``undesirable_weight``
    ``None`` means balanced from the round's class counts (``balanced_kto_weights``).
    ``lora_*`` and ``target_modules`` shape a fresh adapter only; a parent adapter keeps
    its own shape. ``quantize_4bit``/``gradient_checkpointing`` ``None``: on exactly when
    the device is CUDA. ``device`` ``None``: CUDA when available, else CPU.
    """

    beta: float = 0.5
    dpo_loss_type: str = "sigmoid"
    learning_rate: float = 3e-3
    kto_learning_rate: float | None = 3e-3
    kto_steps: int = 150
    dpo_steps: int = 300
    min_steps: int = 60
    epochs: float = 20.0
    batch_size: int = 8
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
    sft_weight: float = 1.0
    kl_budget: float | None = 0.15
    kl_check_every: int = 15
    kl_patience: int = 2
    kl_backoffs: int = 2
    kl_probe_prompts: int = 16
    kl_probe_samples: int = 4
    kl_probe_tokens: int = 256
    start_from: str = "base"
    processes: int = 1
    refresh_pairs: bool = True
    pair_cost_limit: float = 1.5
    pair_samples: int = 4
    pair_gap: float = 0.5
    pair_prompts: int = 200
    pair_min_accuracy: float = 0.5

    def validate(self) -> None:
        """Raise one ValueError that lists every problem, or return None."""
        problems: list[str] = []
        for name in ("beta", "learning_rate", "epochs", "max_grad_norm", "lora_alpha"):
            if not _is_pos(getattr(self, name)):
                problems.append(f"{name} must be a finite number > 0, got {getattr(self, name)!r}")
        if self.kto_learning_rate is not None and not _is_pos(self.kto_learning_rate):
            problems.append("kto_learning_rate must be None or a finite number > 0, "
                            f"got {self.kto_learning_rate!r}")
        if not isinstance(self.sft_weight, int | float) or isinstance(self.sft_weight, bool) \
                or not 0 <= self.sft_weight < math.inf:
            problems.append(f"sft_weight must be a finite number >= 0, got {self.sft_weight!r}")
        if self.kl_budget is not None and not _is_pos(self.kl_budget):
            problems.append(f"kl_budget must be None or a finite number > 0, got {self.kl_budget!r}")
        if not isinstance(self.pair_cost_limit, int | float) \
                or isinstance(self.pair_cost_limit, bool) or math.isnan(self.pair_cost_limit):
            problems.append(f"pair_cost_limit must be a number, got {self.pair_cost_limit!r}")
        if not isinstance(self.pair_gap, int | float) or isinstance(self.pair_gap, bool) \
                or not 0 <= self.pair_gap < math.inf:
            problems.append(f"pair_gap must be a finite number >= 0, got {self.pair_gap!r}")
        if not isinstance(self.pair_min_accuracy, int | float) \
                or isinstance(self.pair_min_accuracy, bool) or not 0 <= self.pair_min_accuracy < 1:
            problems.append(f"pair_min_accuracy must be in [0, 1), got {self.pair_min_accuracy!r}")
        if self.start_from not in START_FROM:
            problems.append(f"start_from must be one of {START_FROM}, got {self.start_from!r}")
        from retrain.losses import DPO_LOSS_TYPES

        if self.dpo_loss_type not in DPO_LOSS_TYPES:
            problems.append(
                f"dpo_loss_type must be one of {DPO_LOSS_TYPES}, got {self.dpo_loss_type!r}"
            )
        for name in ("kto_steps", "dpo_steps", "min_steps", "seed", "kl_backoffs"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                problems.append(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        for name, low in (("batch_size", 1), ("max_length", 2), ("lora_r", 1), ("log_every", 1),
                          ("kl_check_every", 1), ("kl_patience", 1), ("kl_probe_prompts", 1),
                          ("kl_probe_samples", 1), ("kl_probe_tokens", 1), ("processes", 1),
                          ("pair_samples", 2), ("pair_prompts", 0)):
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
        if self.refresh_pairs not in (True, False):
            problems.append(f"refresh_pairs must be True or False, got {self.refresh_pairs!r}")
        for name in ("quantize_4bit", "gradient_checkpointing"):
            if getattr(self, name) not in (None, True, False):
                problems.append(f"{name} must be None, True or False, got {getattr(self, name)!r}")
        if self.device is not None:
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                problems.append(f"device {self.device!r} is not a torch device")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))
