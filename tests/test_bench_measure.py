"""The alignment benchmark's noise figure: the standard error of a served version's rise
over the base, paired by held-out prompt, and the share of the way it puts beside each
row."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from alignment.judges import JUDGES  # noqa: E402
from alignment.measure import paired_se, prompt_means, selection_kl  # noqa: E402
from bench_alignment import table_rows  # noqa: E402
from bench_selection import picks  # noqa: E402


def test_paired_se_is_the_standard_error_of_the_per_prompt_differences() -> None:
    # differences 1, 0, 1, 0: mean 0.5, sample sd sqrt(1/3), over sqrt(4)
    assert paired_se([1.0, 0.5, 1.0, 0.25], [0.0, 0.5, 0.0, 0.25]) == pytest.approx(
        math.sqrt(1 / 3) / 2)
    # a constant rise on every prompt has no spread
    assert paired_se([0.6, 0.9, 0.4], [0.5, 0.8, 0.3]) == pytest.approx(0.0)
    assert math.isnan(paired_se([1.0], [0.0]))
    with pytest.raises(ValueError, match="3 prompts against 2"):
        paired_se([1.0, 0.0, 1.0], [0.0, 0.0])


def test_prompt_means_average_each_prompts_replies() -> None:
    judge = JUDGES["calm"]  # 1 without "!", 0 with
    means = prompt_means(judge, ["Hi", "Hello"], [["Hi.", "Hi!"], ["Hello.", "Hello."]])
    assert means == [0.5, 1.0]


def test_table_rows_put_the_shares_standard_error_beside_it() -> None:
    base = {"scores": {"calm": 0.5}, "ceiling": {"calm": 1.0},
            "prompt_scores": {"calm": [0.0, 0.5, 1.0, 0.5]},
            "degenerate_share": 0.0, "mean_words": 10.0}
    served = {"round": 1, "serving": "v0001", "decision": "promoted", "status": "succeeded",
              "scores": {"calm": 1.0}, "prompt_scores": {"calm": [1.0, 1.0, 1.0, 1.0]},
              "kl": 0.1, "degenerate_share": 0.0, "mean_words": 8.0, "feedback": None,
              "feedback_to_serving_s": 100.0}
    old = {**served, "round": 2}
    del old["prompt_scores"]  # a report written before the figure existed
    rows = table_rows([{"condition": "kto", "judge": "calm", "rounds": [served, old]}], base,
                      ["calm"])
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[0]["share_se"] is None
    assert rows[1]["share_of_way"] == pytest.approx(1.0)
    # rises 1, 0.5, 0, 0.5 over a gap of 0.5
    assert rows[1]["share_se"] == pytest.approx(paired_se([1.0] * 4, [0.0, 0.5, 1.0, 0.5]) / 0.5)
    assert rows[1]["share_se"] > 0
    assert rows[2]["share_se"] is None


def test_selection_picks_score_the_mean_the_scorers_pick_and_the_judges_pick() -> None:
    judge = JUDGES["calm"]  # 1 without "!", 0 with
    replies = [["Yes!", "Yes.", "No!"], ["Fine!", "Fine!", "Fine."]]

    def longest(pairs):  # noqa: ANN001, ANN202
        return [float(len(reply)) for _, reply in pairs]

    two = picks(["a", "b"], replies, judge.score, longest, 2)
    # prompt a: "Yes!" 0, "Yes." 1 (a tie in length: the first); prompt b: both 0
    assert two == {"mean": pytest.approx(0.25), "scorer": 0.0, "judge": 0.5}
    three = picks(["a", "b"], replies, judge.score, longest, 3)
    assert three["judge"] == 1.0 and three["scorer"] == 0.0
    assert three["mean"] == pytest.approx((1 / 3 + 1 / 3) / 2)


def test_the_picks_kl_bound_is_best_of_n_spread_over_the_replys_tokens() -> None:
    assert selection_kl(4, 10.0) == pytest.approx((math.log(4) - 0.75) / 10)
    assert selection_kl(2, 5.0) == pytest.approx((math.log(2) - 0.5) / 5)
    assert selection_kl(1, 10.0) == 0.0 and selection_kl(4, 0.0) == 0.0
