"""A default training round changes what users see, toward what they rated up.

On the demo model (which samples a spread of replies), simulated users rate sampled
replies by a hidden rule (with 10% of their thumbs flipped) and edit some disliked ones.
One round at the DEFAULT TrainConfig must then move the replies sampled on held-out
prompts (other questions than the rated ones) toward the rule, with the sampled KL from
the base within the gate's budget and no rise in degenerate replies. A round on random
ratings must not be promoted by the default gate.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from retrain.evaluate import evaluate_behaviour, is_degenerate
from retrain.gate import GateConfig, gate_decision
from retrain.reward_model import serving_scorer
from retrain.train import TrainConfig, train_round

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from alignment import sim as fs  # noqa: E402  (the alignment benchmark's simulated users)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def calm(prompt: str, reply: str) -> float:
    """The users' hidden rule: no exclamation marks."""
    return 0.0 if "!" in reply else 1.0


def calm_edit(prompt: str, reply: str) -> str:
    return reply.replace("!", ".")


def _prompts() -> tuple[list[str], list[str]]:
    from chat_app.demo_model.corpus_data import TOPICS

    rated, heldout = [], []
    for topic, facts in TOPICS.items():
        if topic == "out_of_scope":
            continue
        for fact in facts:
            *asked, kept = fact.questions
            rated += asked
            heldout.append(kept)
    assert not set(rated) & set(heldout)
    return rated, heldout[::2]


def _measure(model, tokenizer, prompts: list[str]) -> tuple[float, float, float, list]:
    replies = fs.sample_replies(model, tokenizer, prompts, 4, seed=1234)
    flat = [r for group in replies for r in group]
    kl = fs.kl_from_base(model, tokenizer, prompts, replies) if isinstance(model, PeftModel) else 0
    return (fs.mean_score(prompts, replies, calm), kl, sum(map(is_degenerate, flat)) / len(flat),
            replies)


@pytest.fixture(scope="module")
def rounds(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.set_num_threads(2)
    rated, heldout = _prompts()
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    base = AutoModelForCausalLM.from_pretrained(demo_model_dir).eval()
    asked = [rated[i % len(rated)] for i in range(100)]
    replies = fs.sample_replies(base, tokenizer, asked, 2, seed=7)
    probes = [fs.chat(p) for p in heldout[1::3]]
    out = tmp_path_factory.mktemp("learning")
    result = {"base": _measure(base, tokenizer, heldout), "heldout": heldout, "out": out}
    # random users "edit" a reply into another reply the model gave to the same prompt,
    # as the benchmark's control does: an edit that follows no rule
    random_edit = fs.edit_into_another_reply(asked, replies)
    for name, random_labels in (("rule", False), ("random", True)):
        feedback = fs.rate(asked, replies, calm, random_labels=random_labels,
                           improve=random_edit if random_labels else calm_edit)
        train_round(base_model=str(demo_model_dir), parent_adapter=None, kto_rows=feedback.kto,
                    dpo_rows=feedback.dpo, out_dir=out / name, config=TrainConfig(device="cpu"),
                    probe_messages=probes)
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(demo_model_dir), str(out / name)).eval()
        result[name] = _measure(model, tokenizer, heldout)
        result[f"{name}_feedback"] = feedback
    return result


def test_a_default_round_moves_sampled_replies_toward_the_rule_within_budget(rounds: dict):
    base_score, _, base_degenerate, _ = rounds["base"]
    score, kl, degenerate, _ = rounds["rule"]
    assert base_score < 0.9, "the base must leave room to improve for this test to mean anything"
    # at least a third of the way from the base to always following the rule
    assert score >= base_score + (1.0 - base_score) / 3, (base_score, score, kl)
    assert kl <= GateConfig().max_kl, kl
    assert degenerate <= base_degenerate + 0.02


def test_random_ratings_move_the_rule_score_by_no_more_than_noise(rounds: dict):
    base_score, _, _, _ = rounds["base"]
    score, kl, _, _ = rounds["random"]
    assert abs(score - base_score) < 0.1, (base_score, score)
    assert kl <= GateConfig().max_kl


def test_the_default_gate_does_not_promote_a_round_on_random_ratings(
    rounds: dict, demo_model_dir: Path
):
    feedback = rounds["random_feedback"]
    heldout = [fs.chat(p) for p in rounds["heldout"]]
    # held-out feedback from the same random users on other prompts than the rated ones
    held_replies = [[r] for r in ["Sure.", "Hello! Nice to meet you!"] * (len(heldout) // 2)]
    held = fs.rate([m[0]["content"] for m in heldout[: len(held_replies)]], held_replies, calm,
                   random_labels=True, seed=99)
    report = evaluate_behaviour(
        base_model=str(demo_model_dir), candidate_path=rounds["out"] / "random", active_path=None,
        train_kto=feedback.kto, train_dpo=feedback.dpo, heldout_kto=held.kto,
        heldout_dpo=held.dpo, device="cpu",
    )
    decision, reasons = gate_decision(report)
    assert decision in ("hold", "reject"), reasons


def _picked(prompts: list[str], replies: list[list[str]], scorer) -> float:
    """The rule's mean score of the reply ``scorer`` picks among each prompt's replies."""
    return sum(calm(p, group[scorer.best(p, group)])
               for p, group in zip(prompts, replies, strict=True)) / len(prompts)


def test_the_rule_rounds_reply_scorer_is_written_and_picks_what_users_prefer(rounds: dict):
    # the scorer the engine ranks a version's sampled replies by: fitted to the round's
    # feedback, checked, then asked to pick among replies to prompts no user rated
    feedback = rounds["rule_feedback"]
    scorer, info = serving_scorer(feedback.kto, feedback.dpo,
                                  min_accuracy=TrainConfig().pair_min_accuracy)
    assert scorer is not None and info["written"], info["reason"]
    heldout = rounds["heldout"]
    base_score, _, _, base_replies = rounds["base"]
    ceiling = sum(max(calm(p, r) for r in g)
                  for p, g in zip(heldout, base_replies, strict=True)) / len(heldout)
    assert ceiling > base_score + 0.05, "the base's samples must differ for a pick to matter"
    # at least half of the way from the base's mean reply to the rule's own pick of 4
    assert _picked(heldout, base_replies, scorer) >= base_score + (ceiling - base_score) / 2
    score, _, _, rule_replies = rounds["rule"]
    assert _picked(heldout, rule_replies, scorer) >= score


def test_random_ratings_write_no_reply_scorer(rounds: dict):
    feedback = rounds["random_feedback"]
    scorer, info = serving_scorer(feedback.kto, feedback.dpo,
                                  min_accuracy=TrainConfig().pair_min_accuracy)
    assert scorer is None and not info["written"]
    assert info["reason"].startswith("no reply scorer: accuracy"), info["reason"]
