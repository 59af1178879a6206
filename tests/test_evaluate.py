"""The evaluation metrics on a real tiny model, the degenerate-reply detector, the
feedback-trained scorer, the behavioural comparison and the three-way gate."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import make_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from retrain.evaluate import (
    FIXED_PROMPTS,
    BehaviourReport,
    evaluate_behaviour,
    is_degenerate,
    repeated_ngram_fraction,
)
from retrain.gate import GateConfig, gate_decision
from retrain.implicit import implicit_report
from retrain.modeling import InvalidRowError
from retrain.reward_model import (
    Outcomes,
    ScorerAccuracy,
    cross_validated_accuracy,
    split_halves,
    train_reward_model,
    two_sided,
)

torch.set_num_threads(1)

PAIR = {
    "prompt": [{"role": "user", "content": "Tell me about Paris."}],
    "chosen": [{"role": "assistant", "content": "Paris is a city on the Seine. Thank you!"}],
    "rejected": [{"role": "assistant", "content": "No. Go away."}],
}
THUMBS = [
    {"prompt": PAIR["prompt"], "completion": PAIR["chosen"], "label": True},
    {"prompt": PAIR["prompt"], "completion": PAIR["rejected"], "label": False},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


def _save_adapter(tiny: Path, out: Path, *, random_b: bool, scale: float = 0.2,
                  targets: str | list[str] = "all-linear") -> Path:
    """A LoRA adapter saved without training: random B (std ``scale``) moves the model,
    zero B does not."""
    torch.manual_seed(1)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=targets,
            init_lora_weights=not random_b,
            task_type="CAUSAL_LM",
        ),
    )
    if random_b:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, scale)
    model.save_pretrained(out)
    return out


def _completion_logp(model, tokenizer, messages: list[dict], completion: list[dict]) -> float:
    """Sum of log p(completion token | everything before), computed the plain way."""
    prompt_text = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    full_text = tokenizer.apply_chat_template(messages + completion, tokenize=False)
    n_prompt = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([tokenizer(full_text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids).logits[0].double(), -1)
    return sum(log_probs[t - 1, ids[0, t]].item() for t in range(n_prompt, ids.shape[1]))


def test_bare_base_scores_neutral(tiny: Path):
    report = implicit_report(base_model=str(tiny), adapter_path=None, heldout_kto=THUMBS,
                             heldout_dpo=[PAIR, PAIR])
    assert report.pair_accuracy == 0.5  # every pair is a tie against itself
    assert report.pair_margin == 0.0 and report.kto_separation == 0.0
    assert (report.n_pairs, report.n_thumbs) == (2, 2)
    json.dumps(report.to_dict())


def test_pair_margin_is_the_implicit_reward_margin(tiny: Path, tmp_path: Path):
    adapter = _save_adapter(tiny, tmp_path / "random", random_b=True)
    beta = 0.25
    report = implicit_report(base_model=str(tiny), adapter_path=adapter, heldout_kto=THUMBS,
                             heldout_dpo=[PAIR], beta=beta)

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), adapter)
    base = AutoModelForCausalLM.from_pretrained(tiny)
    rewards = {
        key: beta
        * (
            _completion_logp(policy, tokenizer, PAIR["prompt"], PAIR[key])
            - _completion_logp(base, tokenizer, PAIR["prompt"], PAIR[key])
        )
        for key in ("chosen", "rejected")
    }
    expected = rewards["chosen"] - rewards["rejected"]
    assert abs(expected) > 1e-2
    assert report.pair_margin == pytest.approx(expected, abs=1e-4)
    assert report.pair_accuracy == (1.0 if expected > 0 else 0.0)
    assert report.kto_separation == pytest.approx(expected, abs=1e-4)  # same two replies


def test_one_class_thumbs_give_no_separation(tiny: Path):
    report = implicit_report(base_model=str(tiny), adapter_path=None, heldout_kto=THUMBS[:1],
                             heldout_dpo=[])
    assert report.kto_separation is None and report.pair_accuracy is None


def test_bad_evaluation_input_raises_typed_errors(tiny: Path, tmp_path: Path):
    common = dict(base_model=str(tiny), heldout_kto=[], heldout_dpo=[])
    with pytest.raises(ValueError, match="beta.*batch_size"):
        implicit_report(adapter_path=None, beta=0.0, batch_size=0, **common)
    with pytest.raises(FileNotFoundError):
        implicit_report(adapter_path=Path("/nonexistent"), **common)
    adapter = _save_adapter(tiny, tmp_path / "zero", random_b=False)
    with pytest.raises(InvalidRowError, match="fixed prompt 1"):
        evaluate_behaviour(base_model=str(tiny), candidate_path=adapter, active_path=None,
                           train_kto=[], train_dpo=[], heldout_kto=[], heldout_dpo=[],
                           fixed_prompts=[FIXED_PROMPTS[0], [{"role": "user"}]], device="cpu")


@pytest.mark.parametrize(
    "text",
    [
        "the the the the the the the the the the the the",
        "I am here. I am here. I am here. I am here. I am here.",
        "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
        "",
        "   \n ",
    ],
)
def test_degenerate_replies_are_flagged(text: str):
    assert is_degenerate(text)


@pytest.mark.parametrize(
    "text",
    [
        "The capital of France is Paris, a city on the Seine.",
        "Hello! How can I help you today?",
        "Water boils at one hundred degrees Celsius at sea level. At higher altitude the air "
        "pressure is lower, so it boils at a lower temperature; in the mountains pasta takes "
        "longer to cook for that reason.",
        "Yes.",
    ],
)
def test_normal_replies_are_not_flagged(text: str):
    assert not is_degenerate(text)


def test_repeated_ngram_fraction_counts_repeats():
    assert repeated_ngram_fraction(["a", "b", "c", "d"], 1) == 0.0
    assert repeated_ngram_fraction(["a", "a", "a", "a"], 1) == 0.75
    assert repeated_ngram_fraction(["a", "b", "a", "b", "a"], 2) == 0.5
    assert repeated_ngram_fraction(["a", "b"], 3) == 0.0


# -- the feedback-trained scorer --------------------------------------------------------

WORDS = ["the", "a", "is", "of", "and", "it", "this", "that", "for", "on", "with", "so"]


def _rule_rows(topics: list[str], rng: random.Random, *, random_labels: bool = False
               ) -> tuple[list[dict], list[dict]]:
    """Thumbs and pairs where polite replies are liked and curt ones are not (or, with
    ``random_labels``, labels and preferences drawn by coin flip)."""

    def reply(polite: bool, topic: str) -> str:
        body = " ".join(rng.sample(WORDS, 5)) + f" {topic}"
        return f"Thank you for asking! {body}. I hope this helps." if polite else (
            f"{body}. whatever.")

    kto, dpo = [], []
    for topic in topics:
        prompt = [{"role": "user", "content": f"Tell me about {topic}?"}]
        for polite in (True, False):
            label = rng.random() < 0.5 if random_labels else polite
            kto.append({"prompt": prompt, "label": label,
                        "completion": [{"role": "assistant", "content": reply(polite, topic)}]})
        chosen, rejected = reply(True, topic), reply(False, topic)
        if random_labels and rng.random() < 0.5:
            chosen, rejected = rejected, chosen
        dpo.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}]})
    return kto, dpo


TOPICS = [f"subject{i} item{i % 7}" for i in range(160)]


def test_reward_model_learns_a_rule_and_predicts_held_out_prompts():
    rng = random.Random(0)
    train_kto, train_dpo = _rule_rows(TOPICS[:120], rng)
    held_kto, held_dpo = _rule_rows(TOPICS[120:], rng)
    model = train_reward_model(train_kto, train_dpo)
    acc = model.accuracy(held_kto, held_dpo)
    assert acc.accuracy > 0.95 and acc.thumb_accuracy > 0.95 and acc.pair_accuracy > 0.95
    assert (acc.n_thumbs, acc.n_pairs) == (80, 40)
    prompt = "Tell me about clouds?"
    assert model.score(prompt, "Thank you for asking! It is rain. I hope this helps.") > 0.7
    assert model.score(prompt, "rain. whatever.") < 0.3


def test_thumbs_of_one_label_neither_train_nor_measure_the_scorer():
    """Users who only edit leave only down-votes (each edited reply) and pairs. A scorer
    fitted to the down-votes learns "unlike the disliked replies" and rates any change
    as a gain, so such thumbs are left out: the pairs alone train it."""
    rng = random.Random(4)
    kto, dpo = _rule_rows(TOPICS[:120], rng)
    downs = [row for row in kto if not row["label"]]
    prompt = "Tell me about clouds?"
    replies = [(prompt, "It is rain."), (prompt, "rain. whatever."), (prompt, "zebra quartz")]
    with_downs, pairs_only = train_reward_model(downs, dpo), train_reward_model([], dpo)
    assert with_downs.log_odds(replies) == pairs_only.log_odds(replies)
    assert with_downs.bias == 0.0
    better, worse, _ = pairs_only.log_odds(replies)
    assert better - worse > 1.0  # the pairs' rule still shows
    # down-votes alone: no evidence either way, a novel reply gains nothing
    assert train_reward_model(downs, []).log_odds(replies) == [0.0, 0.0, 0.0]
    acc = pairs_only.accuracy(downs[:40], dpo[:10])
    assert (acc.thumb_accuracy, acc.n_thumbs, acc.n_pairs) == (None, 0, 10)
    assert acc.accuracy == acc.pair_accuracy
    assert two_sided([True] * 3 + [False] * 50) and not two_sided([True] * 2 + [False] * 50)


def test_reward_model_on_random_labels_is_near_chance():
    rng = random.Random(1)
    train_kto, train_dpo = _rule_rows(TOPICS[:120], rng, random_labels=True)
    held_kto, held_dpo = _rule_rows(TOPICS[120:], rng, random_labels=True)
    acc = train_reward_model(train_kto, train_dpo).accuracy(held_kto, held_dpo)
    assert 0.3 < acc.accuracy < 0.6


def test_cross_validated_accuracy_holds_out_by_prompt_and_tells_rule_from_noise():
    rng = random.Random(3)
    kto, dpo = _rule_rows(TOPICS[:30], rng)
    cv = cross_validated_accuracy(kto, dpo)
    assert cv.method == "cross-validated" and (cv.n_thumbs, cv.n_pairs) == (60, 30)
    assert cv.accuracy > 0.9
    noise = cross_validated_accuracy(*_rule_rows(TOPICS[:30], rng, random_labels=True))
    assert noise.accuracy < 0.7
    # a prompt asked twice is in one fold only: a scorer that only memorised replies per
    # prompt (here the labels follow the prompt, not the reply) gets nothing right
    twice = []
    for topic in TOPICS[:20]:
        prompt = [{"role": "user", "content": f"Tell me about {topic}?"}]
        label = rng.random() < 0.5
        twice += [{"prompt": prompt, "label": label,
                   "completion": [{"role": "assistant", "content": f"same {topic}"}]}] * 2
    assert cross_validated_accuracy(twice, []).accuracy < 0.75
    with pytest.raises(ValueError):
        cross_validated_accuracy(kto, dpo, folds=1)


def test_thumb_accuracy_is_balanced_so_a_label_prior_earns_nothing():
    rng = random.Random(2)
    train_kto, _ = _rule_rows(TOPICS[:60], rng)
    train_kto = [r for r in train_kto if r["label"]] + [r for r in train_kto if not r["label"]][:5]
    model = train_reward_model(train_kto, [])
    everything_up = ScorerAccuracy(0.5, 0.5, None, 1, 0)
    assert model.accuracy([], []) == ScorerAccuracy(None, None, None, 0, 0)
    held_kto, _ = _rule_rows(TOPICS[60:80], rng)
    assert model.accuracy(held_kto, []).thumb_accuracy > everything_up.thumb_accuracy


def test_the_rows_split_in_two_halves_by_prompt():
    """One half ranks a round's own-reply pairs, the other trains the gate's scorer: no
    prompt in both, no row lost, the same split every time."""
    rng = random.Random(5)
    kto, dpo = _rule_rows(TOPICS, rng)
    (rank_kto, rank_dpo), (gate_kto, gate_dpo) = split_halves(kto, dpo)
    assert sorted(map(repr, rank_kto + gate_kto)) == sorted(map(repr, kto))
    assert sorted(map(repr, rank_dpo + gate_dpo)) == sorted(map(repr, dpo))
    ranking = {repr(r["prompt"]) for r in rank_kto + rank_dpo}
    gate = {repr(r["prompt"]) for r in gate_kto + gate_dpo}
    assert not ranking & gate
    assert 0.35 < len(ranking) / len(TOPICS) < 0.65
    assert split_halves(kto, dpo) == ((rank_kto, rank_dpo), (gate_kto, gate_dpo))
    assert split_halves([], []) == (([], []), ([], []))


# -- behaviour on sampled replies -------------------------------------------------------

# Random weights answer with noise, degenerate or not, so only the rise is limited here.
SMALL_GATE = GateConfig(min_heldout_rows=10, min_heldout_prompts=4, max_prompts=6,
                        samples_per_prompt=3, max_new_tokens=10, max_degenerate_share=1.0)


@pytest.fixture(scope="module")
def rule_rows() -> dict[str, list[dict]]:
    rng = random.Random(3)
    train_kto, train_dpo = _rule_rows(TOPICS[:60], rng)
    held_kto, held_dpo = _rule_rows(TOPICS[60:70], rng)
    return {"train_kto": train_kto, "train_dpo": train_dpo, "heldout_kto": held_kto,
            "heldout_dpo": held_dpo}


def _behaviour(tiny: Path, candidate: Path, active: Path | None, rows: dict,
               config: GateConfig = SMALL_GATE) -> BehaviourReport:
    return evaluate_behaviour(base_model=str(tiny), candidate_path=candidate, active_path=active,
                              config=config, fixed_prompts=FIXED_PROMPTS[:2],
                              device="cpu", **rows)


def test_a_no_op_adapter_is_held_not_promoted(tiny: Path, tmp_path: Path, rule_rows: dict):
    report = _behaviour(tiny, _save_adapter(tiny, tmp_path / "zero", random_b=False), None,
                        rule_rows)
    assert report.kl == pytest.approx(0.0, abs=1e-6)
    assert report.score_diff == pytest.approx(0.0, abs=1e-9)  # the very same replies
    assert report.scorer.accuracy > 0.9 and report.n_heldout_rows == 30
    # checked on every row, each by a scorer that never saw its prompt
    assert report.scorer.method == "cross-validated"
    assert report.scorer.n_rows == sum(len(rows) for rows in rule_rows.values())
    assert (report.n_heldout_prompts, report.n_prompts, report.samples_per_prompt) == (10, 6, 3)
    assert report.changed_share == 0.0
    decision, reasons = gate_decision(report, SMALL_GATE)
    assert decision == "hold", reasons
    assert len(reasons) == 3, reasons
    assert reasons[2] == ("hold: within the safety limits: KL 0.000 ≤ 0.30 nats/token from "
                          "the base; degenerate 0% (base 0%)")
    assert reasons[0] == ("hold: near no-op: only 0% of the candidate's replies on 6 held-out "
                          "prompts × 3 samples differ from base's drawn with the same seed; at "
                          "least 10% must change for users to see a difference")
    assert reasons[1].startswith("hold: candidate replies scored")
    assert "no evidence of improvement" in reasons[1] and "6 held-out prompts × 3" in reasons[1]
    json.dumps(report.to_dict())
    json.dumps(report.metrics())


def test_the_same_adapter_as_active_is_held(tiny: Path, tmp_path: Path, rule_rows: dict):
    moved = _save_adapter(tiny, tmp_path / "moved", random_b=True, scale=0.05)
    report = _behaviour(tiny, moved, moved, rule_rows)
    assert report.kl == pytest.approx(report.active_kl) and report.kl > 0
    assert report.score_diff == 0.0 and report.score_lower_bound == 0.0
    assert report.implicit["pair_accuracy"] == report.implicit["active/pair_accuracy"]
    assert gate_decision(report, replace(SMALL_GATE, max_kl=10.0))[0] == "hold"


def test_a_collapsed_adapter_is_rejected_for_its_kl(tiny: Path, tmp_path: Path,
                                                    rule_rows: dict):
    # a random-weight model's logits are nearly flat whatever its hidden states (its output
    # layer is tiny), so the wreck goes through a LoRA on the output layer itself
    wrecked = _save_adapter(tiny, tmp_path / "wrecked", random_b=True, scale=3.0,
                            targets=["q_proj", "v_proj", "down_proj", "lm_head"])
    report = _behaviour(tiny, wrecked, None, rule_rows)
    decision, reasons = gate_decision(report, SMALL_GATE)
    assert decision == "reject", reasons
    assert report.kl > 1.0
    assert any(r.startswith("reject: KL") and "exceeds 0.30" in r for r in reasons)


def test_the_gates_scorer_is_fitted_to_the_rows_given_for_it(tiny: Path, tmp_path: Path,
                                                            rule_rows: dict):
    """A round that ranked its own replies is scored by a scorer of the other half of the
    rows: given those, the gate fits nothing else (here: the rule's labels flipped, so the
    same candidate scores the other way), and says so."""
    moved = _save_adapter(tiny, tmp_path / "moved", random_b=True, scale=0.05)
    plain = _behaviour(tiny, moved, None, rule_rows)
    flipped_kto = [{**r, "label": not r["label"]} for r in rule_rows["train_kto"][:40]]
    flipped_dpo = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]}
                   for r in rule_rows["train_dpo"][:20]]
    half = _behaviour(tiny, moved, None, {**rule_rows, "scorer_kto": flipped_kto,
                                          "scorer_dpo": flipped_dpo})
    assert (plain.scorer_half, plain.n_train_rows) == (False, 180)
    assert (half.scorer_half, half.n_train_rows) == (True, 60)
    assert plain.score_diff != 0 and half.score_diff * plain.score_diff < 0
    # the accuracy check is on all the rows either way
    assert half.scorer == plain.scorer
    assert half.metrics()["scorer_half"] is True
    reason = gate_decision(half, replace(SMALL_GATE, max_kl=10.0, min_changed_share=0.0))[1]
    assert any("by the feedback-trained scorer fitted to the 60 training rows of the prompts "
               "that did not rank the round's own-reply pairs (difference" in r
               for r in reason), reason


def test_random_feedback_gives_a_hold_for_inconsistent_ratings(tiny: Path, tmp_path: Path):
    rng = random.Random(4)
    train_kto, train_dpo = _rule_rows(TOPICS[:60], rng, random_labels=True)
    held_kto, held_dpo = _rule_rows(TOPICS[60:90], rng, random_labels=True)
    rows = {"train_kto": train_kto, "train_dpo": train_dpo, "heldout_kto": held_kto,
            "heldout_dpo": held_dpo}
    report = _behaviour(tiny, _save_adapter(tiny, tmp_path / "zero", random_b=False), None, rows)
    decision, reasons = gate_decision(report, SMALL_GATE)
    assert decision == "hold"
    assert report.scorer.accuracy < 0.6
    assert any("does not predict itself" in r for r in reasons), reasons


# -- the decision rule on reports -------------------------------------------------------


def _report(**kwargs) -> BehaviourReport:
    fields = dict(
        active_label="v0002", n_heldout_thumbs=30, n_heldout_pairs=12, n_heldout_prompts=20,
        n_prompts=20, samples_per_prompt=4, n_fixed=6,
        scorer=ScorerAccuracy(0.8, 0.75, 0.9, 30, 12), n_train_rows=200,
        candidate_score=0.61, active_score=0.52, score_diff=0.09, score_lower_bound=0.04,
        confidence_z=1.96, kl=0.12, active_kl=0.05, degenerate_share=0.0,
        active_degenerate_share=0.0, implicit={"pair_accuracy": 0.8},
    )
    return BehaviourReport(**(fields | kwargs))


def test_gate_promotes_on_evidence_of_improvement_and_says_what_it_saw():
    decision, reasons = gate_decision(_report())
    assert decision == "promote"
    assert reasons == [
        "promote: candidate replies scored 0.610 vs v0002 0.520 in log-odds by the feedback-trained scorer "
        "(difference +0.090, one-sided 95% lower bound +0.040 > 0) on 20 held-out prompts × 4 samples; "
        "KL 0.120 ≤ 0.30 nats/token; degenerate 0% (v0002 0%); scorer accuracy 80% on 42 "
        "held-out rows"]


def test_the_improvement_bound_is_one_sided_and_says_its_level():
    """Promotion asks a one-sided question (better or not), so its bound is one-sided:
    1.645 standard errors is 95%; the 1.96 it had is 97.5%, which the reasons say."""
    assert GateConfig().improvement_z == 1.645 and GateConfig().confidence_z == 1.96
    _, reasons = gate_decision(_report(improvement_z=1.96))
    assert "(difference +0.090, one-sided 97.5% lower bound +0.040 > 0)" in reasons[0]
    with pytest.raises(ValueError, match="improvement_z"):
        GateConfig(improvement_z=-1.0).validate()


def test_gate_holds_when_the_lower_bound_is_not_above_zero():
    decision, reasons = gate_decision(_report(candidate_score=0.512, active_score=0.508,
                                              score_diff=0.004, score_lower_bound=-0.03))
    assert decision == "hold"
    assert reasons == [
        "hold: candidate replies scored 0.512 vs v0002 0.508 in log-odds by the feedback-trained scorer "
        "(difference +0.004, one-sided 95% lower bound -0.030 ≤ 0) on 20 held-out prompts × 4 samples: "
        "no evidence of improvement",
        "hold: within the safety limits: KL 0.120 ≤ 0.30 nats/token from the base; "
        "degenerate 0% (v0002 0%)"]


def test_gate_holds_a_near_no_op_whose_few_changed_replies_look_significant():
    """Paired by seed, a candidate that changed 4 of 80 replies has 0 differences almost
    everywhere, so a small gain on those few can clear the lower bound; users would not
    see it, and the scorer's verdict on 4 replies is no evidence."""
    decision, reasons = gate_decision(_report(changed_share=0.05))
    assert decision == "hold" and len(reasons) == 2
    assert reasons[0].startswith("hold: near no-op: only 5% of the candidate's replies on 20 "
                                 "held-out prompts × 4 samples differ from v0002's")
    assert gate_decision(_report(changed_share=0.1))[0] == "promote"
    assert gate_decision(_report(changed_share=0.05),
                         GateConfig(min_changed_share=0.0))[0] == "promote"


def test_gate_holds_without_enough_held_out_evidence_and_gives_the_counts():
    decision, reasons = gate_decision(_report(n_heldout_thumbs=4, n_heldout_pairs=2,
                                              n_heldout_prompts=3,
                                              scorer=ScorerAccuracy(0.8, 0.75, 1.0, 4, 2)))
    assert decision == "hold"
    assert reasons == [
        "hold: not enough evidence: the scorer was checked on 6 held-out rows (4 thumbs, "
        "2 pairs) and there are 3 distinct held-out prompts; the gate needs at least 10 rows "
        "and 8 prompts",
        "hold: within the safety limits: KL 0.120 ≤ 0.30 nats/token from the base; "
        "degenerate 0% (v0002 0%)"]


def test_few_held_out_rows_count_as_evidence_when_the_scorer_is_cross_validated():
    """An edits-only round: 5 held-out pairs, but 40 rows cross-validated by prompt and
    held-out prompts answered without ratings to compare on."""
    cv = ScorerAccuracy(0.85, None, 0.85, 0, 40, method="cross-validated")
    decision, reasons = gate_decision(_report(n_heldout_thumbs=0, n_heldout_pairs=5,
                                              n_heldout_prompts=20, scorer=cv))
    assert decision == "promote"
    assert reasons[0].endswith(
        "scorer accuracy 85% on 40 rows cross-validated by prompt (5 held-out)")
    # the same scorer, but too few prompts to compare replies on
    decision, reasons = gate_decision(_report(n_heldout_thumbs=0, n_heldout_pairs=5,
                                              n_heldout_prompts=5, scorer=cv))
    assert decision == "hold" and reasons[0].startswith("hold: not enough evidence")
    # cross-validation over too few rows is not evidence either
    few = ScorerAccuracy(1.0, None, 1.0, 0, 8, method="cross-validated")
    decision, reasons = gate_decision(_report(n_heldout_pairs=3, n_heldout_thumbs=0,
                                              scorer=few))
    assert decision == "hold" and "checked on 8 rows cross-validated" in reasons[0]


def test_a_scorer_right_by_luck_on_few_rows_is_not_evidence():
    """The accuracy's lower bound, not only its value: 9 of 10 pairs right is evidence
    that the ratings predict themselves, 8 of 10 is not (a coin gives 8 or more one time
    in 18); balanced thumbs with a rare label count as fewer rows."""
    nine = ScorerAccuracy(0.9, None, 0.9, 0, 10, method="cross-validated")
    assert nine.lower_bound(1.96) == pytest.approx(0.596, abs=1e-3)
    decision, reasons = gate_decision(_report(n_heldout_thumbs=0, n_heldout_pairs=4,
                                              scorer=nine))
    assert decision == "promote", reasons
    eight = ScorerAccuracy(0.8, None, 0.8, 0, 10, method="cross-validated")
    decision, reasons = gate_decision(_report(n_heldout_thumbs=0, n_heldout_pairs=4,
                                              scorer=eight))
    assert decision == "hold"
    assert reasons[0] == (
        "hold: the feedback does not predict itself on held-out prompts: a scorer trained on "
        "200 training rows got 80% of 10 rows cross-validated by prompt (4 held-out) right "
        "(thumbs n/a, pairs 0.80; 95% lower bound 49%), needs more than 60% with a lower "
        "bound above 50% (chance): ratings look inconsistent or too few")
    # 95 up-votes and 5 down-votes, every one predicted right but one down-vote: 90%
    # balanced accuracy, measured about as precisely as on 19 rows, not 100
    rare = ScorerAccuracy.of(Outcomes(thumbs=[(True, True)] * 95 + [(False, True)] * 4
                                      + [(False, False)]))
    assert (rare.thumb_accuracy, rare.n_thumbs) == (pytest.approx(0.9), 100)
    assert rare.effective_rows == pytest.approx(19.0)
    mixed = ScorerAccuracy.of(Outcomes(thumbs=[(True, True)] * 95 + [(False, True)] * 4
                                       + [(False, False)], pairs=[1.0] * 20))
    assert mixed.effective_rows == pytest.approx(120 ** 2 / (100 ** 2 / 19 + 20))
    assert rare.lower_bound(1.96) < mixed.lower_bound(1.96) < ScorerAccuracy(
        mixed.accuracy, None, None, 100, 20).lower_bound(1.96)


def test_gate_holds_when_the_scorer_does_not_predict_held_out_feedback():
    decision, reasons = gate_decision(_report(scorer=ScorerAccuracy(0.55, 0.5, 0.6, 30, 12)))
    assert decision == "hold" and len(reasons) == 2
    assert "does not predict itself" in reasons[0] and "55% of 42 held-out rows" in reasons[0]
    assert gate_decision(_report(scorer=ScorerAccuracy(None, None, None, 0, 0)))[0] == "hold"
    # with no minimum of rows, a scorer checked on none still holds, and says so
    decision, reasons = gate_decision(_report(scorer=ScorerAccuracy(None, None, None, 0, 0)),
                                      GateConfig(min_heldout_rows=0))
    assert decision == "hold" and "got no rows to check it on" in reasons[0]


def test_gate_rejects_collapse_whatever_the_evidence_and_lists_every_reason():
    decision, reasons = gate_decision(_report(kl=3.1, degenerate_share=0.5, n_heldout_thumbs=1))
    assert decision == "reject"
    assert reasons[0] == "reject: KL 3.1 nats/token from the base on sampled replies exceeds 0.30"
    assert len(reasons) == 3 and all(r.startswith("reject: ") for r in reasons)
    assert "rose from 0% (v0002) to 50%" in reasons[2]


def test_gate_allows_a_small_rise_in_degenerate_replies():
    assert gate_decision(_report(degenerate_share=0.04))[0] == "promote"
    assert gate_decision(_report(degenerate_share=0.1))[0] == "reject"


def test_gate_kl_limit_reads_the_older_setting_name_too():
    assert gate_decision(_report(kl=0.4))[0] == "reject"
    assert gate_decision(_report(kl=0.4), GateConfig(max_kl=0.5))[0] == "promote"
    assert gate_decision(_report(kl=0.4), GateConfig(max_canary_kl=5.0))[0] == "promote"


def test_gate_rejects_non_finite_measurements_and_bad_settings():
    decision, reasons = gate_decision(_report(kl=math.nan))
    assert decision == "reject" and "KL is not a finite number" in reasons[0]
    with pytest.raises(ValueError, match="min_scorer_accuracy.*max_kl.*samples_per_prompt"):
        GateConfig(max_kl=-1.0, min_scorer_accuracy=1.5, samples_per_prompt=0).validate()
