"""The DPO rows a round trains on: the users' pairs the model can reach, and pairs of the
model's own replies ranked by a scorer learned from the feedback.

Why: DPO moves the model toward the chosen reply of each pair, but the round may move
only within its KL budget (0.15 nats/token of sampled replies). A user's edit that the
model would hardly ever say costs it several nats per token (on the demo model, an edit
that adds detail 6.2, one that brings the reply back to the subject 4.0; one that drops
filler -0.1, one that makes a list 0.6: ``benchmarks/bench_edit_cost.py``). Training
toward those, the phase reaches the budget long before the sampled replies change, and
the saved adapter barely moved (README, "Why edits fail where they fail").

So, per round (:func:`refresh_pairs`):

1. The **cost** of each users' pair is the reference model's NLL of the chosen reply
   minus that of the rejected one, per token of the chosen (nats/token). Pairs that cost
   at most ``TrainConfig.pair_cost_limit`` are kept as they are.
2. When the feedback predicts itself (below), whether the round has users' pairs or
   thumbs alone, for each distinct prompt of the users' pairs, then of their thumbs,
   then of the training split's prompts answered but not rated (at most
   ``pair_prompts`` in all, 200 by default; 0: the pairs' prompts alone, so none with
   thumbs alone; :func:`pair_prompts`), the model as it starts the round samples ``pair_samples``
   replies as served (temperature 0.7, top-p 0.95, up to ``kl_probe_tokens`` tokens). A
   scorer (:func:`retrain.reward_model.train_reward_model`, the gate's kind) fitted to
   the round's thumbs and pairs of one half of the prompts
   (:func:`retrain.reward_model.split_halves`; the gate's scorer is fitted to the other
   half, so the candidate cannot please it by learning this one's mistakes) ranks them;
   the best and the worst become a pair when their log-odds of a thumbs-up differ by
   more than ``pair_gap``. These pairs say what users asked for in words the model
   already uses, so DPO can move toward them within the budget.

Why so many prompts: users who edit and pick leave pairs on about 30 prompts in 200
rated replies, and a content rule learnt from pairs on those few prompts does not carry
to new ones. On the alignment benchmark's content judge (``on_subject``, ``dpo``, round
2's rows; ``benchmarks/bench_round.py``, 72 held-out prompts, base 0.424), own-reply
pairs on the pairs' prompts alone (45 pairs) moved the judge +0.007 and -0.062 (two
seeds) at KL 0.05, though the judge agreed with the scorer's ranking on 47% of them and
disagreed on 2%; on 64 prompts, -0.021; on 200 (177 pairs, 240 steps), +0.087 and +0.083
at KL 0.04-0.05, both truly better. More steps on the 45 pairs alone moved the replies
(KL 0.11) but not the judge (+0.010).

Why only when the feedback predicts itself: many pairs ranked by one scorer push the
model the way the scorer ranks, whether it learnt the users' rule or noise. On random
ratings (``tests/test_learning.py``'s round, 100 replies rated at random) a scorer right
on 49% of the other half's rows ranked 89 own-reply pairs, and the round moved the
hidden style rule from 0.833 to 0.933 (0.992 with the DPO phase alone), as far as a
real rule would. So the pairs are drawn only when the scorer's accuracy, cross-validated
by prompt over the round's rows (:func:`retrain.reward_model.cross_validated_accuracy`),
has a 95% lower bound above ``TrainConfig.pair_min_accuracy`` (0.5, chance); that round
then moved it by +0.025. Over the 60 rounds of two full runs of the alignment benchmark
the bound was 0.57-0.95 for every judge and 0.38-0.49 for the random-rating control.

Why thumbs alone draw pairs too: KTO learns how each rated reply was liked, which
taught style and length but not a content rule. On the alignment benchmark's
``on_subject`` judge, thumbs-only rounds moved the served replies by -0.007 to +0.017 on
72 held-out prompts (base 0.424): noise. A scorer fitted to the same thumbs does learn
the rule (its cross-validated accuracy bound was 0.63-0.73 on those rounds), so a round
with thumbs and no pairs now draws own-reply pairs the same way, and trains the DPO
phase on them after the KTO phase. The same benchmark's three
``kto``/``on_subject`` candidates then rose +0.075, +0.080 and +0.087 on 72 held-out
prompts (base 0.377 on that build), all truly better, at KL 0.056-0.070; ``concise`` and
``calm`` stayed past half way. Random thumbs still draw none (the check above).

The costly users' pairs still count: their rejected replies are thumbs-down in the KTO
phase (the worker's ``edits_as_votes``), and they train the scorer that ranks the new
pairs. ``refresh_pairs`` off (``TrainConfig.refresh_pairs``) trains on the users' pairs
as given, and a round with thumbs alone is the KTO phase alone.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any

import torch

from feedback_store.datasets import prompt_key
from retrain import modeling, sampling
from retrain.budget import PROBE_TEMPERATURE, PROBE_TOP_P
from retrain.losses import sequence_logps
from retrain.reward_model import (
    cross_validated_accuracy,
    last_user_text,
    split_halves,
    train_reward_model,
)

#: standard errors below the scorer's cross-validated accuracy that must still be above
#: ``TrainConfig.pair_min_accuracy`` for own-reply pairs to be drawn (95%, the gate's level)
SCORER_Z = 1.96


def pair_costs(model: Any, tokenizer: Any, rows: Sequence[dict], *, max_length: int,
               batch_size: int) -> list[float]:
    """Per pair row: the reference's (the adapter disabled) NLL of the chosen reply
    minus its NLL of the rejected one, per token of the chosen reply (nats/token)."""
    if not rows:
        return []
    examples = modeling.encode_dpo_rows(tokenizer, rows, max_length=max_length)
    device = next(model.parameters()).device
    pad = modeling.pad_id(tokenizer)
    costs: list[float] = []
    with modeling.reference_mode(model):
        for lo in range(0, len(examples), batch_size):
            chunk = examples[lo:lo + batch_size]
            turns = [(e.chosen.prompt_ids, e.chosen.completion_ids) for e in chunk]
            turns += [(e.rejected.prompt_ids, e.rejected.completion_ids) for e in chunk]
            batch = modeling.collate(turns, pad_id=pad, max_length=max_length, device=device)
            logps = sequence_logps(modeling.forward_logits(model, batch), batch.labels)
            n = len(chunk)
            tokens = (batch.labels[:n] != -100).sum(dim=1).clamp(min=1)
            costs += ((logps[n:] - logps[:n]) / tokens).float().tolist()
    return costs


def own_reply_pairs(model: Any, tokenizer: Any, prompts: Sequence[list[dict]], scorer: Any, *,
                    samples: int, gap: float, max_new_tokens: int, max_prompt_tokens: int,
                    seed: int) -> list[dict]:
    """For each chat prompt, ``samples`` replies of ``model`` (its adapter on) as served;
    the one ``scorer`` rates highest and the one it rates lowest as a pair row, when
    their log-odds differ by more than ``gap`` and their texts differ."""
    if not prompts:
        return []
    ids = [sampling.encode_prompt(tokenizer, list(p), max_prompt_tokens) for p in prompts]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            replies = sampling.sample_replies(
                model, ids, samples, temperature=PROBE_TEMPERATURE, top_p=PROBE_TOP_P,
                max_new_tokens=max_new_tokens, stop_ids=sampling.stop_token_ids(model, tokenizer),
                seed=seed)
    finally:
        model.train(was_training)
    rows = []
    for messages, group in zip(prompts, replies, strict=True):
        texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in group]
        texts = [t for t in texts if t]
        if len(texts) < 2:
            continue
        user = last_user_text(list(messages))
        odds = scorer.log_odds([(user, t) for t in texts])
        hi = max(range(len(texts)), key=odds.__getitem__)
        lo = min(range(len(texts)), key=odds.__getitem__)
        if odds[hi] - odds[lo] <= gap or texts[hi] == texts[lo]:
            continue
        rows.append({"prompt": list(messages),
                     "chosen": [{"role": "assistant", "content": texts[hi]}],
                     "rejected": [{"role": "assistant", "content": texts[lo]}]})
    return rows


def pair_prompts(dpo_rows: Sequence[dict], kto_rows: Sequence[dict],
                 asked: Sequence[list[dict]], limit: int) -> list[list[dict]]:
    """The distinct prompts (by :func:`feedback_store.datasets.prompt_key`) whose own
    replies are ranked: those of the users' pairs, then of their thumbs, then ``asked``
    (prompts of the training split answered, rated or not), each group in a fixed
    pseudo-random order (by a hash of the prompt), ``limit`` at most
    (``TrainConfig.pair_prompts``, 200 by default); ``limit`` 0: the pairs' prompts alone.

    Why the thumbs' and the unrated prompts: users who edit and pick leave pairs on a
    few prompts (about 30 in 200 replies), while the scorer that ranks the replies
    generalises to any prompt. Drawn from the pairs' prompts alone, a round of the
    content judge (``on_subject``, ``dpo``) trained on 18 own pairs and was held; the
    replies users asked for and did not rate are just as much what they ask."""
    groups = [[r["prompt"] for r in dpo_rows], [r["prompt"] for r in kto_rows], asked]
    if limit == 0:  # the pairs' prompts alone
        groups, limit = groups[:1], len(dpo_rows)
    seen: dict[str, list[dict]] = {}
    for group in groups:
        fresh = {prompt_key(p): list(p) for p in group}
        for key in sorted(fresh, key=lambda k: hashlib.sha256(k.encode()).hexdigest()):
            if len(seen) >= limit:
                return list(seen.values())
            seen.setdefault(key, fresh[key])
    return list(seen.values())


def refresh_pairs(model: Any, tokenizer: Any, kto_rows: Sequence[dict],
                  dpo_rows: Sequence[dict], config: Any,
                  asked: Sequence[list[dict]] = ()) -> tuple[list[dict], dict[str, float]]:
    """The round's DPO rows (module doc): the users' pairs that cost the reference at most
    ``config.pair_cost_limit`` nats/token, then pairs of ``model``'s own replies to
    :func:`pair_prompts` (of the rows and ``asked``) ranked by a scorer fitted to the
    ranking half of ``kto_rows``/``dpo_rows`` (:func:`retrain.reward_model.split_halves`),
    drawn only when a scorer's accuracy cross-validated by prompt over all those rows has a
    95% lower bound above ``config.pair_min_accuracy`` (0: always); with thumbs alone
    (no ``dpo_rows``) the same, from the thumbs. Returns the rows and
    figures for the round's metrics (``pairs/...``; ``pairs/scorer_accuracy_lower_bound``
    is -1 when no row can check the scorer)."""
    if not config.refresh_pairs or not (dpo_rows or kto_rows):
        return list(dpo_rows), {}
    start = time.perf_counter()
    costs = pair_costs(model, tokenizer, dpo_rows, max_length=config.max_length,
                       batch_size=config.batch_size)
    kept = [row for row, cost in zip(dpo_rows, costs, strict=True)
            if cost <= config.pair_cost_limit]
    checked = cross_validated_accuracy(kto_rows, dpo_rows, seed=config.seed)
    bound = checked.lower_bound(SCORER_Z)
    prompts: list[list[dict]] = []
    own: list[dict] = []
    if config.pair_min_accuracy <= 0 or (bound is not None and bound > config.pair_min_accuracy):
        ranking, _ = split_halves(kto_rows, dpo_rows)
        scorer = train_reward_model(*ranking, seed=config.seed)
        prompts = pair_prompts(dpo_rows, kto_rows, asked, config.pair_prompts)
        own = own_reply_pairs(
            model, tokenizer, prompts, scorer, samples=config.pair_samples,
            gap=config.pair_gap, max_new_tokens=config.kl_probe_tokens,
            max_prompt_tokens=max(1, config.max_length - config.kl_probe_tokens),
            seed=config.seed + 1)
    ordered = sorted(costs)
    metrics = {"pairs/users": float(len(dpo_rows)), "pairs/users_kept": float(len(kept)),
               "pairs/own": float(len(own)), "pairs/own_prompts": float(len(prompts)),
               "pairs/users_median_cost": ordered[len(ordered) // 2] if ordered else 0.0,
               "pairs/scorer_rows": float(checked.n_rows),
               "pairs/scorer_accuracy_lower_bound": -1.0 if bound is None else bound,
               "pairs/seconds": time.perf_counter() - start}
    return kept + own, metrics
