"""The DPO rows a round trains on (``retrain.onpolicy``): which users' pairs are kept, and
the pairs of the model's own replies that a scorer ranks.

The costs are checked on the demo model, whose replies mean something: an edit that
only changes punctuation is cheap for it, one that says something it never says is
dear. The sampling and ranking are checked on a tiny random model with a scorer whose
ranking is known.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from retrain import modeling
from retrain.onpolicy import own_reply_pairs, pair_costs, pair_prompts, refresh_pairs
from retrain.train import TrainConfig, train_round

torch.set_num_threads(1)


def _chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _pair(prompt: str, chosen: str, rejected: str) -> dict:
    return {"prompt": _chat(prompt), "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


class LengthScorer:
    """Ranks a longer reply higher: log-odds = characters / 10."""

    def log_odds(self, pairs):  # noqa: ANN001, ANN201
        return [len(reply) / 10 for _, reply in pairs]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    path = make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")
    lora = modeling.fresh_lora_config(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    model = modeling.load_trainable_model(path, parent_adapter=None, lora=lora,
                                          device=torch.device("cpu"), quantize_4bit=False)
    return path, model, modeling.load_tokenizer(path)


@pytest.mark.slow
def test_an_edit_the_model_would_say_costs_less_than_one_it_would_not(demo_model_dir: Path):
    from retrain.sampling import encode_prompt, sample_replies, stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    base = AutoModelForCausalLM.from_pretrained(demo_model_dir).eval()
    lora = modeling.fresh_lora_config(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    model = modeling.load_trainable_model(demo_model_dir, parent_adapter=None, lora=lora,
                                          device=torch.device("cpu"), quantize_4bit=False)
    prompts = ["What makes the sky blue?", "How do I cook rice?", "Hello!"]
    ids = [encode_prompt(tokenizer, _chat(p), 256) for p in prompts]
    replies = sample_replies(base, ids, 1, temperature=0.7, top_p=0.95, max_new_tokens=128,
                             stop_ids=stop_token_ids(base, tokenizer), seed=3)
    own = [tokenizer.decode(r[0], skip_special_tokens=True).strip() for r in replies]
    stranger = ("Quantum chromodynamics describes gluons binding quarks; the Standard Model "
                "lists six flavours.")
    rows = [_pair(p, o, o) for p, o in zip(prompts, own, strict=True)]
    rows += [_pair(p, o.rstrip(".!") + ".", o) for p, o in zip(prompts, own, strict=True)]
    rows += [_pair(p, stranger, o) for p, o in zip(prompts, own, strict=True)]
    costs = pair_costs(model, tokenizer, rows, max_length=512, batch_size=4)
    same, punctuation, dear = costs[:3], costs[3:6], costs[6:]
    assert all(abs(c) < 1e-4 for c in same), same
    assert all(c < 1.5 for c in punctuation), punctuation
    assert all(c > 3.0 for c in dear), dear


def test_pair_costs_are_per_token_of_the_chosen_reply(tiny):
    _, model, tokenizer = tiny
    a, b = "Cats sleep for most of the day.", "Water boils at one hundred degrees Celsius."
    forward, backward = pair_costs(model, tokenizer, [_pair("Hi", a, b), _pair("Hi", b, a)],
                                   max_length=512, batch_size=8)
    assert forward * backward < 0  # the same difference, opposite signs
    n_a = len(modeling.encode_dpo_rows(tokenizer, [_pair("Hi", a, b)])[0].chosen.completion_ids)
    n_b = len(modeling.encode_dpo_rows(tokenizer, [_pair("Hi", b, a)])[0].chosen.completion_ids)
    assert math.isclose(forward * n_a, -backward * n_b, rel_tol=1e-4)
    # batching does not change a pair's cost
    alone = pair_costs(model, tokenizer, [_pair("Hi", a, b)], max_length=512, batch_size=1)
    assert math.isclose(alone[0], forward, rel_tol=1e-4, abs_tol=1e-5)


def test_own_reply_pairs_are_the_model_replies_the_scorer_ranks_highest_and_lowest(tiny):
    _, model, tokenizer = tiny
    prompts = [_chat("Hello!"), _chat("Tell me about cats."), _chat("Water?")]
    rows = own_reply_pairs(model, tokenizer, prompts, LengthScorer(), samples=4, gap=0.0,
                           max_new_tokens=24, max_prompt_tokens=128, seed=5)
    assert rows, "a random model's four samples differ in length"
    for row in rows:
        assert row["prompt"] in prompts
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert len(chosen) > len(rejected) and chosen != rejected
    # the same seed gives the same pairs; a gap no pair clears gives none
    again = own_reply_pairs(model, tokenizer, prompts, LengthScorer(), samples=4, gap=0.0,
                            max_new_tokens=24, max_prompt_tokens=128, seed=5)
    assert again == rows
    assert own_reply_pairs(model, tokenizer, prompts, LengthScorer(), samples=4, gap=1e9,
                           max_new_tokens=24, max_prompt_tokens=128, seed=5) == []


def test_refresh_keeps_the_pairs_within_the_cost_limit_and_adds_own_reply_pairs(tiny):
    _, model, tokenizer = tiny
    users = [_pair("Tell me about cats.", "Cats sleep for most of the day.", "No."),
             _pair("Tell me about cats.", "No.", "Cats sleep for most of the day."),
             _pair("Water?", "Water boils at one hundred degrees Celsius.", "I am not sure.")]
    thumbs = [{"prompt": _chat("Hello!"), "completion": [{"role": "assistant", "content": t}],
               "label": up} for t, up in (("Hello! How can I help?", True), ("No.", False))]
    # the scorer's check is off: five rows cannot show it beats chance (its own test below)
    config = TrainConfig(kl_probe_tokens=24, pair_gap=0.0, pair_prompts=100,
                         pair_min_accuracy=0.0)
    costs = pair_costs(model, tokenizer, users, max_length=512, batch_size=8)
    limit = sorted(costs)[1]  # keeps exactly the two cheapest
    rows, metrics = refresh_pairs(model, tokenizer, thumbs, users,
                                  replace(config, pair_cost_limit=limit))
    kept = [u for u, c in zip(users, costs, strict=True) if c <= limit]
    assert len(kept) == 2 and rows[:2] == kept
    assert metrics["pairs/users"] == 3 and metrics["pairs/users_kept"] == 2
    assert metrics["pairs/own"] == len(rows) - 2
    # own replies to the prompts of the pairs and of the thumbs, nothing else
    assert metrics["pairs/own_prompts"] == 3
    assert {tuple(map(str, r["prompt"])) for r in rows[2:]} <= {
        tuple(map(str, u["prompt"])) for u in [*users, *thumbs]}

    # pair_prompts 0 (the default): the pairs' prompts alone
    _, alone = refresh_pairs(model, tokenizer, thumbs, users,
                             replace(config, pair_cost_limit=limit, pair_prompts=0))
    assert alone["pairs/own_prompts"] == 2

    unchanged, none = refresh_pairs(model, tokenizer, thumbs, users,
                                    replace(config, refresh_pairs=False))
    assert unchanged == users and none == {}


def _rated(by_rule: bool) -> tuple[list[dict], list[dict]]:
    """Thumbs and pairs on 46 prompts: by a rule (calm replies up, shouting down), or the
    same replies with labels and sides drawn at random."""
    draw = random.Random(3)
    thumbs, pairs = [], []
    for i in range(40):
        calm = i % 2 == 0
        text = f"Gladly, here is a calm answer about item {i}." if calm else f"No!! Item {i}!!"
        up = calm if by_rule else draw.random() < 0.5
        thumbs.append({"prompt": _chat(f"What about item {i}?"), "label": up,
                       "completion": [{"role": "assistant", "content": text}]})
    for i in range(6):
        calm, loud = "Gladly, here is a calm answer.", "No!! Never!!"
        keep = by_rule or draw.random() < 0.5
        pairs.append(_pair(f"Tell me about topic {i}.", *((calm, loud) if keep else (loud, calm))))
    return thumbs, pairs


def test_own_reply_pairs_are_drawn_only_when_the_ratings_predict_themselves(tiny):
    """A scorer fitted to random ratings ranks the model's replies by whatever it happened
    to learn, and many such pairs push the model one way as surely as a real rule would
    (on the demo model, a random-rating round with own-reply pairs on 100 prompts moved
    a style judge by +0.10). So pairs are drawn only when the scorer's cross-validated
    accuracy on the round's rows is above ``pair_min_accuracy`` at 95%."""
    _, model, tokenizer = tiny
    config = TrainConfig(kl_probe_tokens=8, pair_gap=0.0, pair_prompts=100)
    rows, by_rule = refresh_pairs(model, tokenizer, *_rated(True), config)
    assert by_rule["pairs/scorer_accuracy_lower_bound"] > 0.5
    assert by_rule["pairs/own"] > 0 and by_rule["pairs/own_prompts"] == 46
    rows, noise = refresh_pairs(model, tokenizer, *_rated(False), config)
    assert noise["pairs/scorer_accuracy_lower_bound"] <= 0.5
    assert noise["pairs/own"] == 0 and noise["pairs/own_prompts"] == 0
    assert len(rows) == noise["pairs/users_kept"]
    # 0 turns the check off
    _, unchecked = refresh_pairs(model, tokenizer, *_rated(False),
                                 replace(config, pair_min_accuracy=0.0))
    assert unchecked["pairs/own"] > 0
    with pytest.raises(ValueError, match="pair_min_accuracy"):
        TrainConfig(pair_min_accuracy=1.0).validate()


def test_own_replies_are_ranked_on_the_pairs_prompts_then_the_thumbs_then_the_unrated():
    pairs = [_pair(f"Pair {i}?", "Yes.", "No.") for i in range(3)] + [_pair("Pair 0?", "A", "B")]
    thumbs = [{"prompt": _chat(q), "label": True,
               "completion": [{"role": "assistant", "content": "Hi."}]}
              for q in ("Thumb 0?", "Thumb 1?", "Pair 1?")]
    asked = [_chat(q) for q in ("Asked 0?", "Thumb 0?", "Asked 1?")]

    def asked_of(limit: int) -> list[str]:
        return [p[-1]["content"] for p in pair_prompts(pairs, thumbs, asked, limit)]

    every = asked_of(100)
    # each prompt once, in the order of the groups: pairs, thumbs, then unrated ones
    assert sorted(every[:3]) == ["Pair 0?", "Pair 1?", "Pair 2?"]
    assert sorted(every[3:5]) == ["Thumb 0?", "Thumb 1?"]
    assert sorted(every[5:]) == ["Asked 0?", "Asked 1?"]
    assert asked_of(4) == every[:4] and asked_of(1) == every[:1]
    assert asked_of(100) == every  # the order is fixed
    # 0: the pairs' prompts alone, however many
    assert sorted(asked_of(0)) == ["Pair 0?", "Pair 1?", "Pair 2?"]


def test_a_round_ranks_own_replies_to_prompts_users_asked_and_did_not_rate(tiny, tmp_path):
    """Users who only edit and pick leave pairs on a few prompts; the round also ranks
    the model's replies to the prompts they asked without rating (``asked_prompts``)."""
    path, _, _ = tiny
    users = [_pair(f"Tell me about topic {i}.", f"Topic {i} is a fine thing to know.", "No.")
             for i in range(6)]
    asked = [_chat(f"What about item {i}?") for i in range(10)]
    config = TrainConfig(device="cpu", dpo_steps=2, min_steps=0, batch_size=2, kl_budget=None,
                         kl_probe_tokens=16, pair_gap=0.0, pair_prompts=12,
                         pair_min_accuracy=0.0)
    common = dict(base_model=str(path), parent_adapter=None, kto_rows=[], dpo_rows=users,
                  config=config)
    alone = train_round(**common, out_dir=tmp_path / "a")
    more = train_round(**common, out_dir=tmp_path / "b", asked_prompts=asked)
    assert alone.metrics["pairs/own_prompts"] == 6
    assert more.metrics["pairs/own_prompts"] == 12  # 6 of the pairs', 6 asked (the limit)
    assert more.metrics["pairs/own"] > alone.metrics["pairs/own"]


def test_the_scorer_that_ranks_own_replies_sees_one_half_of_the_rows(tiny, monkeypatch):
    """The gate's scorer is fitted to the other half (``split_halves``): the candidate
    must not be judged by the scorer whose mistakes it was trained toward."""
    from retrain import onpolicy
    from retrain.reward_model import split_halves

    _, model, tokenizer = tiny
    users = [_pair(f"Tell me about topic {i}.", f"Topic {i} is a fine thing.", "No.")
             for i in range(12)]
    thumbs = [{"prompt": _chat(f"Hello {i}!"), "label": i % 2 == 0,
               "completion": [{"role": "assistant", "content": f"Hi {i}."}]} for i in range(12)]
    fitted, real = [], onpolicy.train_reward_model

    def spy(kto, dpo, **kwargs):  # noqa: ANN001, ANN003, ANN202
        fitted.append((list(kto), list(dpo)))
        return real(kto, dpo, **kwargs)

    monkeypatch.setattr(onpolicy, "train_reward_model", spy)
    refresh_pairs(model, tokenizer, thumbs, users,
                  TrainConfig(kl_probe_tokens=8, pair_min_accuracy=0.0))
    ranking, gate = split_halves(thumbs, users)
    assert fitted == [ranking]
    assert ranking[1] and gate[1]  # both halves have pairs here: the test means something


def test_a_round_of_thumbs_alone_trains_dpo_on_own_reply_pairs_the_thumbs_rank(tiny, tmp_path):
    """Users who only give thumbs leave no pairs, yet the scorer fitted to their thumbs
    ranks the model's own replies as well as one fitted to pairs: the round draws
    own-reply pairs from it and trains its DPO phase on them after the KTO phase. Random
    thumbs draw none, and the round is the KTO phase alone."""
    path, _, _ = tiny
    config = TrainConfig(device="cpu", kto_steps=2, dpo_steps=2, min_steps=0, batch_size=2,
                         kl_budget=None, kl_probe_tokens=8, pair_gap=0.0, pair_prompts=12)

    def round_on(thumbs: list[dict], name: str) -> dict[str, float]:
        return train_round(base_model=str(path), parent_adapter=None, kto_rows=thumbs,
                           dpo_rows=[], out_dir=tmp_path / name, config=config).metrics

    ruled = round_on(_rated(True)[0], "rule")
    assert ruled["pairs/users"] == 0 and ruled["pairs/scorer_accuracy_lower_bound"] > 0.5
    assert ruled["pairs/own_prompts"] == 12 and ruled["pairs/own"] > 0
    assert ruled["dpo/rows"] == ruled["pairs/own"] and ruled["kto/rows"] == 40
    assert "pairs/as_given" not in ruled  # there were no users' pairs to fall back on
    noise = round_on(_rated(False)[0], "random")
    assert noise["pairs/scorer_accuracy_lower_bound"] <= 0.5 and noise["pairs/own"] == 0
    assert "dpo/rows" not in noise and noise["kto/rows"] == 40
    assert (tmp_path / "random" / "adapter_config.json").is_file()


def test_a_round_left_with_no_pairs_trains_on_the_users_pairs_as_given(tiny, tmp_path):
    path, _, _ = tiny
    users = [_pair("Tell me about cats.", "Cats sleep for most of the day.", "No."),
             _pair("Water?", "Water boils at one hundred degrees Celsius.", "I am not sure.")]
    config = TrainConfig(device="cpu", dpo_steps=2, min_steps=0, batch_size=2, kl_budget=None,
                         kl_probe_tokens=16, pair_cost_limit=-math.inf, pair_gap=1e9)
    result = train_round(base_model=str(path), parent_adapter=None, kto_rows=[],
                         dpo_rows=users, out_dir=tmp_path / "a", config=config)
    assert result.metrics["pairs/users_kept"] == 0 and result.metrics["pairs/own"] == 0
    assert result.metrics["pairs/as_given"] == 1.0 and result.metrics["dpo/rows"] == 2
    assert (tmp_path / "a" / "adapter_config.json").is_file()


@pytest.mark.parametrize("field,value", [("pair_samples", 1), ("pair_gap", -0.1),
                                         ("pair_gap", math.inf), ("pair_cost_limit", math.nan),
                                         ("refresh_pairs", None), ("pair_prompts", -1)])
def test_bad_pair_settings_are_named(field: str, value: object):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value}).validate()
