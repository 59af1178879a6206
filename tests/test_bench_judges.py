"""The alignment benchmark's judges: each scores in [0, 1], and the edit a simulated user
makes of a reply the judge dislikes is a reply the judge likes (else the benchmark's
``dpo`` users would teach the model nothing, or the wrong thing)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from alignment.judges import JUDGES  # noqa: E402

PROMPTS = ("How do I cook rice?", "What makes the sky blue?", "Hello!",
           "how should I cook spaghetti for dinner")
REPLIES = (
    "Good question! Rinse the rice, then simmer it with twice as much water for about "
    "fifteen minutes, and let it rest with the lid on before you fluff it with a fork. "
    "I hope that helps!",
    "Happy to help: Sunlight scatters off the air, and blue light scatters the most.",
    "Sure! Let me know if you want more detail.",
    "Boil it.",
    "- Rinse the rice.\n- Simmer it for 15 minutes.",
    "Oh, hello there! It is always nice to talk with you.",
)


@pytest.mark.parametrize("name", sorted(JUDGES))
def test_a_judges_edit_of_a_disliked_reply_is_liked_and_ends_a_sentence(name: str) -> None:
    judge = JUDGES[name]
    disliked = 0
    for prompt in PROMPTS:
        for reply in REPLIES:
            score = judge.score(prompt, reply)
            assert 0.0 <= score <= 1.0
            if score >= 0.5:
                continue
            disliked += 1
            edit = judge.improve(prompt, reply)
            assert judge.score(prompt, edit) >= 0.5, (prompt, reply, edit)
            assert edit.rstrip().endswith((".", "!", "?")), edit
    assert disliked, f"{name} liked every reply here: the test checked no edit"


def test_listed_and_no_filler_tell_the_replies_apart() -> None:
    listed, no_filler = JUDGES["listed"], JUDGES["no_filler"]
    assert [listed.score("", r) for r in REPLIES] == [0, 0, 0, 0, 1, 0]
    assert [no_filler.score("", r) for r in REPLIES] == [0, 0, 0, 1, 1, 1]
    assert no_filler.improve("", REPLIES[0]).startswith("Rinse the rice")
    assert listed.improve("", REPLIES[1]) == (
        "- Happy to help: Sunlight scatters off the air, and blue light scatters the most.")
