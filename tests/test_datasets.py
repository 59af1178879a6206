"""Feedback becomes TRL training rows: the exact conversational content, the conflict
rules of ``feedback_store.datasets``, the filters and the held-out split.

Every test runs on a SQLite file and on a fresh PostgreSQL database (``store``).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone

import pytest

from feedback_store import (
    FeedbackStore,
    InvalidInput,
    RowFilter,
    build_asked_prompts,
    build_dpo_rows,
    build_kto_rows,
    split_of,
)
from feedback_store.datasets import normalise_prompt, prompt_key

SYSTEM = "You are a terse assistant."
GEN = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 64, "seed": 3}


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def one_reply(store: FeedbackStore, text: str = "Q", answer: str = "A", *,
              version: str | None = "v0001", system: str | None = None) -> int:
    """A fresh conversation with one user message and one reply; returns the reply id."""
    conv = store.create_conversation(system_prompt=system)
    user = store.add_user_message(conversation_id=conv.id, content=text)
    return store.add_reply(parent_id=user.id, content=answer, adapter_version=version).id


def test_round_trip_keeps_reply_metadata_and_builds_kto_rows_from_the_thread(
    store: FeedbackStore,
) -> None:
    conv = store.create_conversation(user_id="alice", system_prompt=SYSTEM)
    u1 = store.add_user_message(conversation_id=conv.id, content="What is 2+2?")
    r1 = store.add_reply(
        parent_id=u1.id, content="4", adapter_version="v0001", model_name="tiny-llama",
        generation=GEN, finish_reason="stop", prompt_tokens=12, completion_tokens=1,
    )
    r1b = store.add_reply(source_reply_id=r1.id, content="Four.", adapter_version="v0001")
    u2 = store.add_user_message(conversation_id=conv.id, content="And 3+3?", parent_id=r1b.id)
    r2 = store.add_reply(parent_id=u2.id, content="6", adapter_version="v0002")
    # another branch under the first reply: it must not leak into r2's prompt
    u2x = store.add_user_message(conversation_id=conv.id, content="Other branch", parent_id=r1.id)
    store.add_reply(parent_id=u2x.id, content="ignored", adapter_version="v0002")

    stored = store.get_message(r1.id)
    assert (stored.role, stored.content, stored.parent_id) == ("assistant", "4", u1.id)
    assert stored.adapter_version == "v0001" and stored.model_name == "tiny-llama"
    assert stored.generation == GEN and stored.finish_reason == "stop"
    assert (stored.prompt_tokens, stored.completion_tokens) == (12, 1)
    assert stored.origin == "generated" and stored.created_at.tzinfo is not None
    regen = store.get_message(r1b.id)
    assert (regen.origin, regen.source_reply_id, regen.parent_id) == ("regenerated", r1.id, u1.id)
    assert [m.id for m in store.siblings(r1.id)] == [r1.id, r1b.id]
    assert store.get_message(u1.id).user_id == "alice"  # the conversation's user by default
    assert [m.id for m in store.context(r2.id)] == [u1.id, r1b.id, u2.id, r2.id]

    store.rate(reply_id=r2.id, rating="up", user_id="alice")
    store.rate(reply_id=r1.id, rating="down", user_id="alice", comment="too short")

    assert build_kto_rows(store) == [
        {"prompt": [msg("system", SYSTEM), msg("user", "What is 2+2?")],
         "completion": [msg("assistant", "4")], "label": False},
        {"prompt": [msg("system", SYSTEM), msg("user", "What is 2+2?"),
                    msg("assistant", "Four."), msg("user", "And 3+3?")],
         "completion": [msg("assistant", "6")], "label": True},
    ]
    with_ids = build_kto_rows(store, with_ids=True)
    assert [(r["reply_id"], r["conversation_id"]) for r in with_ids] == [
        (r1.id, conv.id), (r2.id, conv.id)]
    assert build_dpo_rows(store) == []


def test_conversation_without_system_prompt_has_no_system_message(store: FeedbackStore) -> None:
    rid = one_reply(store, "Hi", "Hello")
    store.rate(reply_id=rid, rating="up")
    assert build_kto_rows(store) == [
        {"prompt": [msg("user", "Hi")], "completion": [msg("assistant", "Hello")], "label": True}
    ]


def test_edit_is_a_pair_with_the_edit_chosen_and_the_original_untouched(
    store: FeedbackStore,
) -> None:
    conv = store.create_conversation(system_prompt=SYSTEM)
    u = store.add_user_message(conversation_id=conv.id, content="Capital of France?")
    orig = store.add_reply(parent_id=u.id, content="Lyon.", adapter_version="v0003",
                           generation=GEN)
    before = store.get_message(orig.id)

    edited, event = store.edit_reply(reply_id=orig.id, content="Paris.", user_id="bob")

    assert store.get_message(orig.id) == before  # the original is never modified
    assert (edited.origin, edited.source_reply_id, edited.parent_id) == ("edit", orig.id, u.id)
    assert edited.content == "Paris." and edited.role == "assistant"
    assert (event.kind, event.reply_id, event.other_reply_id, event.user_id) == (
        "edit", orig.id, edited.id, "bob")
    assert [m.id for m in store.siblings(orig.id)] == [orig.id, edited.id]
    assert build_dpo_rows(store) == [
        {"prompt": [msg("system", SYSTEM), msg("user", "Capital of France?")],
         "chosen": [msg("assistant", "Paris.")], "rejected": [msg("assistant", "Lyon.")]}
    ]
    assert build_dpo_rows(store, with_ids=True)[0]["chosen_id"] == edited.id
    # the edit event is filed under the adapter version that wrote the original
    assert len(build_dpo_rows(store, RowFilter(adapter_version="v0003"))) == 1


def test_choice_between_regenerated_siblings_is_a_pair(store: FeedbackStore) -> None:
    conv = store.create_conversation()
    u = store.add_user_message(conversation_id=conv.id, content="A haiku, please")
    first = store.add_reply(parent_id=u.id, content="Roses are red.")
    second = store.add_reply(source_reply_id=first.id, content="Old pond, frog jumps in.")

    store.choose(chosen_id=second.id, rejected_id=first.id, user_id="carol")

    assert store.get_message(first.id).content == "Roses are red."
    assert build_dpo_rows(store, with_ids=True) == [
        {"prompt": [msg("user", "A haiku, please")],
         "chosen": [msg("assistant", "Old pond, frog jumps in.")],
         "rejected": [msg("assistant", "Roses are red.")],
         "chosen_id": second.id, "rejected_id": first.id, "conversation_id": conv.id}
    ]


def labels(store: FeedbackStore, flt: RowFilter | None = None) -> dict[int, bool]:
    return {r["reply_id"]: r["label"] for r in build_kto_rows(store, flt, with_ids=True)}


def test_a_users_latest_vote_counts(store: FeedbackStore) -> None:
    rid = one_reply(store)
    store.rate(reply_id=rid, rating="up", user_id="alice")
    assert labels(store) == {rid: True}
    store.rate(reply_id=rid, rating="down", user_id="alice")
    assert labels(store) == {rid: False}
    store.rate(reply_id=rid, rating="up", user_id="alice")
    assert labels(store) == {rid: True}
    assert store.counts()["events.up"] == 2  # every vote is kept as an event


def test_conflicting_votes_follow_the_majority_and_ties_are_left_out(
    store: FeedbackStore,
) -> None:
    tie, majority_up, majority_down, anonymous = (one_reply(store) for _ in range(4))
    store.rate(reply_id=tie, rating="up", user_id="alice")
    store.rate(reply_id=tie, rating="down", user_id="bob")
    for user, rating in (("alice", "up"), ("bob", "up"), ("carol", "down")):
        store.rate(reply_id=majority_up, rating=rating, user_id=user)
    for user, rating in (("alice", "down"), ("bob", "down"), ("carol", "up")):
        store.rate(reply_id=majority_down, rating=rating, user_id=user)
    # anonymous votes on a reply count as one voter: only the latest one counts
    store.rate(reply_id=anonymous, rating="down")
    store.rate(reply_id=anonymous, rating="up")

    assert labels(store) == {majority_up: True, majority_down: False, anonymous: True}

    store.rate(reply_id=tie, rating="up", user_id="bob")  # bob changes his mind
    assert labels(store)[tie] is True


def test_conflicting_choices_follow_the_majority_and_ties_are_left_out(
    store: FeedbackStore,
) -> None:
    conv = store.create_conversation()
    u = store.add_user_message(conversation_id=conv.id, content="Q")
    x = store.add_reply(parent_id=u.id, content="X")
    y = store.add_reply(source_reply_id=x.id, content="Y")

    def winners() -> list[tuple[int, int]]:
        return [(r["chosen_id"], r["rejected_id"]) for r in build_dpo_rows(store, with_ids=True)]

    store.choose(chosen_id=x.id, rejected_id=y.id, user_id="alice")
    store.choose(chosen_id=y.id, rejected_id=x.id, user_id="bob")
    assert winners() == []  # one each: a tie
    store.choose(chosen_id=x.id, rejected_id=y.id, user_id="carol")
    assert winners() == [(x.id, y.id)]
    store.choose(chosen_id=y.id, rejected_id=x.id, user_id="alice")  # alice's latest counts
    assert winners() == [(y.id, x.id)]
    assert store.counts()["events.choice"] == 4


def test_filters_by_time_event_id_and_adapter_version(store: FeedbackStore) -> None:
    old = one_reply(store, "old", "old answer", version="v0001")
    new = one_reply(store, "new", "new answer", version="v0002")
    pair_conv = store.create_conversation()
    u = store.add_user_message(conversation_id=pair_conv.id, content="pick")
    a = store.add_reply(parent_id=u.id, content="a", adapter_version="v0002")
    b = store.add_reply(source_reply_id=a.id, content="b", adapter_version="v0002")

    first = store.rate(reply_id=old, rating="up")
    time.sleep(0.05)
    middle = datetime.now(UTC)
    time.sleep(0.05)
    second = store.rate(reply_id=new, rating="down")
    choice = store.choose(chosen_id=a.id, rejected_id=b.id)

    assert labels(store) == {old: True, new: False}
    assert labels(store, RowFilter(after_event_id=first.id)) == {new: False}
    assert labels(store, RowFilter(up_to_event_id=first.id)) == {old: True}
    assert labels(store, RowFilter(adapter_version="v0001")) == {old: True}
    assert labels(store, RowFilter(adapter_version="v0002")) == {new: False}
    assert labels(store, RowFilter(adapter_version="v0009")) == {}
    assert labels(store, RowFilter(since=middle)) == {new: False}
    # the same instant written in another zone, or naive (taken as UTC), filters alike
    for same in (middle.astimezone(timezone(timedelta(hours=-5))),
                 middle.astimezone(timezone(timedelta(hours=9, minutes=30))),
                 middle.replace(tzinfo=None)):
        assert labels(store, RowFilter(since=same)) == {new: False}
    assert labels(store, RowFilter(since=datetime.now(UTC) + timedelta(minutes=1))) == {}

    assert len(build_dpo_rows(store, RowFilter(adapter_version="v0002"))) == 1
    assert build_dpo_rows(store, RowFilter(adapter_version="v0001")) == []
    assert build_dpo_rows(store, RowFilter(after_event_id=choice.id)) == []
    assert build_dpo_rows(store, RowFilter(since=middle))[0]["chosen"] == [msg("assistant", "a")]
    assert second.id > first.id


def test_held_out_split_is_by_normalised_prompt_deterministic_disjoint_and_complete(
    store: FeedbackStore,
) -> None:
    # 20 questions, each asked in two conversations, the second time with other case,
    # punctuation and spacing: both copies must land on the same side
    for i in range(40):
        q = i // 2
        text = f"Question {q}?" if i % 2 == 0 else f"  question   {q} !! "
        conv = store.create_conversation()
        u = store.add_user_message(conversation_id=conv.id, content=text)
        r = store.add_reply(parent_id=u.id, content=f"answer {q} from {i}")
        store.rate(reply_id=r.id, rating="up" if i % 3 else "down")
        if i % 2:
            r2 = store.add_reply(source_reply_id=r.id, content=f"another answer {i}")
            store.choose(chosen_id=r2.id, rejected_id=r.id)

    for build, n_all in ((build_kto_rows, 40), (build_dpo_rows, 20)):
        everything = build(store, RowFilter(split="all"), with_ids=True)
        train = build(store, RowFilter(split="train", eval_fraction=0.3), with_ids=True)
        held = build(store, RowFilter(split="eval", eval_fraction=0.3), with_ids=True)
        assert len(everything) == n_all
        assert train and held
        train_keys = {prompt_key(r["prompt"]) for r in train}
        held_keys = {prompt_key(r["prompt"]) for r in held}
        assert not train_keys & held_keys
        assert all(split_of(r["prompt"], 0.3) == "eval" for r in held)
        assert sorted(map(repr, train + held)) == sorted(map(repr, everything))
        assert build(store, RowFilter(split="eval", eval_fraction=0.3), with_ids=True) == held
    # the same question asked in other words of case and punctuation shares its side
    assert normalise_prompt("  What's the capital,  of FRANCE?! ") == "what s the capital of france"
    for q in range(20):
        assert split_of(f"Question {q}?", 0.3) == split_of(f"  question   {q} !! ", 0.3)
        assert split_of([msg("system", "s"), msg("user", f"QUESTION {q}")], 0.3) == split_of(
            f"question {q}", 0.3)
    # a larger fraction only adds to eval; zero puts everything in train
    texts = [f"prompt number {i}" for i in range(200)]
    assert all(split_of(t, 0.5) == "eval" for t in texts if split_of(t, 0.3) == "eval")
    assert {split_of(t, 0.0) for t in texts} == {"train"}


def test_identical_held_out_rows_are_counted_once(store: FeedbackStore) -> None:
    # the same question and reply rated in many conversations: training keeps every vote,
    # the held-out split keeps one row per distinct (prompt, reply, label)
    fraction = 0.5
    held_q = next(f"held {i}" for i in range(100) if split_of(f"held {i}", fraction) == "eval")
    train_q = next(f"train {i}" for i in range(100) if split_of(f"train {i}", fraction) == "train")
    for question in (held_q, train_q):
        for copy in range(3):
            text = question.upper() + "?" * copy
            rid = one_reply(store, text, "Same reply.")
            store.rate(reply_id=rid, rating="up")
            other = store.add_reply(source_reply_id=rid, content="Other reply")
            store.choose(chosen_id=rid, rejected_id=other.id)
        store.rate(reply_id=one_reply(store, question, "Same reply!"), rating="down")

    def rows(build, split):  # type: ignore[no-untyped-def]
        return build(store, RowFilter(split=split, eval_fraction=fraction))

    held_kto, train_kto = rows(build_kto_rows, "eval"), rows(build_kto_rows, "train")
    assert [(r["completion"][0]["content"], r["label"]) for r in held_kto] == [
        ("Same reply.", True), ("Same reply!", False)]  # the two labels stay apart
    assert len(train_kto) == 4
    assert len(rows(build_dpo_rows, "eval")) == 1 and len(rows(build_dpo_rows, "train")) == 3
    assert len(build_kto_rows(store)) == 8


def test_an_edit_counts_as_its_authors_down_vote_for_training_only(
    store: FeedbackStore,
) -> None:
    edited = one_reply(store, "Q1", "Too long a reply.")
    store.edit_reply(reply_id=edited, content="Short.", user_id="ann")
    # ann edits, then says she likes the original after all: her later vote wins
    changed_mind = one_reply(store, "Q2", "A fine reply.")
    store.edit_reply(reply_id=changed_mind, content="Fine.", user_id="ann")
    store.rate(reply_id=changed_mind, rating="up", user_id="ann")
    # bob likes a reply that ann edited: one vote each way is a tie, left out
    tie = one_reply(store, "Q3", "Some reply.")
    store.rate(reply_id=tie, rating="up", user_id="bob")
    store.edit_reply(reply_id=tie, content="Other reply.", user_id="ann")
    # a down-vote and an edit by the same user are one vote, not two
    both = one_reply(store, "Q4", "Bad reply.")
    store.rate(reply_id=both, rating="down", user_id="cat", tags=["rude"])
    store.edit_reply(reply_id=both, content="Good reply.", user_id="cat")

    rows = build_kto_rows(store, edits_as_votes=True, with_ids=True, with_tags=True)
    assert [(r["reply_id"], r["label"], r["tags"]) for r in rows] == [
        (edited, False, []), (changed_mind, True, []), (both, False, ["rude"])]
    assert rows[0]["completion"] == [msg("assistant", "Too long a reply.")]
    # exports and the default keep thumbs only
    assert [(r["reply_id"], r["label"]) for r in build_kto_rows(store, with_ids=True)] == [
        (changed_mind, True), (tie, True), (both, False)]
    assert len(build_dpo_rows(store)) == 4


def test_asked_prompts_are_the_held_out_prompts_answered_rated_or_not(
    store: FeedbackStore,
) -> None:
    fraction = 0.5
    asked = []
    for i in range(30):
        conv = store.create_conversation(system_prompt=SYSTEM if i % 2 else None)
        u = store.add_user_message(conversation_id=conv.id, content=f"Question {i}?")
        r = store.add_reply(parent_id=u.id, content=f"answer {i}")
        if i % 3 == 0:
            store.rate(reply_id=r.id, rating="up")
        # the same question asked again, in other case: one prompt
        conv2 = store.create_conversation()
        u2 = store.add_user_message(conversation_id=conv2.id, content=f"QUESTION {i}")
        store.add_reply(parent_id=u2.id, content=f"another answer {i}")
        asked.append(f"question {i}")
    # a user message without a reply is not a prompt the model answered
    conv = store.create_conversation()
    store.add_user_message(conversation_id=conv.id, content="Question 99?")

    held = build_asked_prompts(store, split="eval", eval_fraction=fraction)
    keys = [prompt_key(p) for p in held]
    assert sorted(keys) == sorted(q for q in asked if split_of(q, fraction) == "eval")
    assert len(keys) == len(set(keys)) and 0 < len(keys) < 30
    # no held-out prompt is a prompt of a training row
    train_keys = {prompt_key(r["prompt"]) for r in build_kto_rows(
        store, RowFilter(split="train", eval_fraction=fraction))}
    assert train_keys and not train_keys & set(keys)
    # prompts are rebuilt like the training rows' (system prompt first)
    with_system = [p for p in held if p[0]["role"] == "system"]
    assert all(p[0]["content"] == SYSTEM and p[-1]["role"] == "user" for p in with_system)
    assert len(build_asked_prompts(store, split="all")) == 30
    with pytest.raises(InvalidInput):
        build_asked_prompts(store, split="test")


@pytest.mark.parametrize("flt", [
    RowFilter(split="test"), RowFilter(eval_fraction=1.0), RowFilter(eval_fraction=-0.1),
    RowFilter(after_event_id=-1), RowFilter(up_to_event_id="7"),  # type: ignore[arg-type]
    RowFilter(since="2026-01-01"),  # type: ignore[arg-type]
], ids=["split", "fraction-1", "fraction-negative", "after-negative", "up-to-text", "since-text"])
def test_bad_row_filters_are_refused(sqlite_url: str, flt: RowFilter) -> None:
    store = FeedbackStore.open(sqlite_url)
    try:
        with pytest.raises(InvalidInput):
            build_kto_rows(store, flt)
        with pytest.raises(InvalidInput):
            build_dpo_rows(store, flt)
    finally:
        store.close()


def test_a_rounds_rows_are_the_feedback_up_to_its_event_split_by_prompt(
    store: FeedbackStore,
) -> None:
    import inspect

    from retrain.evaluate import evaluate_behaviour
    from retrain.reward_model import split_halves
    from retrain.rows import ranked_own_pairs, round_rows

    fraction = 0.5
    held_q = next(f"held {i}" for i in range(100) if split_of(f"held {i}", fraction) == "eval")
    train_q = next(f"train {i}" for i in range(100) if split_of(f"train {i}", fraction) == "train")
    unrated = next(f"unrated {i}" for i in range(100) if split_of(f"unrated {i}", fraction) == "eval")
    one_reply(store, unrated, "Never rated.")
    for question in (held_q, train_q):
        store.rate(reply_id=one_reply(store, question, "Liked."), rating="up")
        store.edit_reply(reply_id=one_reply(store, question, "Too long, sorry!"),
                         content="Short.", user_id="ann")
    last = store.last_event_id()
    store.rate(reply_id=one_reply(store, train_q, "Rated later."), rating="down")
    # prompts answered after the round's last event are not the round's
    later = [f"later {i}" for i in range(40)]
    for question in later:
        one_reply(store, question, "Asked later.")
    assert {split_of(q, fraction) for q in later} == {"train", "eval"}

    rows = round_rows(store, last, fraction)
    for kto, dpo, question in ((rows.kto, rows.dpo, train_q),
                               (rows.heldout_kto, rows.heldout_dpo, held_q)):
        # the edit is a pair and its author's down-vote; the later vote is not there
        assert [(r["completion"][0]["content"], r["label"]) for r in kto] == [
            ("Liked.", True), ("Too long, sorry!", False)]
        assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in dpo] == [
            ("Short.", "Too long, sorry!")]
        assert {prompt_key(r["prompt"]) for r in [*kto, *dpo]} == {
            prompt_key([msg("user", question)])}
    assert sorted(prompt_key(p) for p in rows.asked) == sorted(
        prompt_key([msg("user", q)]) for q in (held_q, unrated))
    assert [prompt_key(p) for p in rows.train_asked] == [prompt_key([msg("user", train_q)])]
    # read without the bound, the later prompts are there
    everything = {prompt_key(p) for p in build_asked_prompts(store, split="all")}
    assert {prompt_key([msg("user", q)]) for q in later} <= everything
    assert build_asked_prompts(store, split="all", up_to_event_id=0) == []
    # what the gate is given are parameters of evaluate_behaviour
    assert set(rows.gate_rows()) <= set(inspect.signature(evaluate_behaviour).parameters)
    # after a round that ranked its own replies, the gate's scorer fits the other half
    ranked = rows.gate_rows(ranked_pairs=True)
    assert set(ranked) <= set(inspect.signature(evaluate_behaviour).parameters)
    assert (ranked["scorer_kto"], ranked["scorer_dpo"]) == split_halves(rows.kto, rows.dpo)[1]
    assert "scorer_kto" not in rows.gate_rows()
    assert ranked_own_pairs({"pairs/own": 3.0}) and not ranked_own_pairs({"pairs/own": 0.0})
    assert not ranked_own_pairs({})
