"""The evaluation metrics on a real tiny model, the degenerate-reply detector, the gate."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import make_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from retrain.evaluate import (
    DEFAULT_CANARY_PROMPTS,
    EvalReport,
    GateConfig,
    evaluate_adapter,
    gate_decision,
    is_degenerate,
    repeated_ngram_fraction,
)
from retrain.modeling import InvalidRowError

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


def _save_adapter(tiny: Path, out: Path, *, random_b: bool) -> Path:
    """A LoRA adapter saved without training: random B moves the model, zero B does not."""
    torch.manual_seed(1)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules="all-linear",
            init_lora_weights=not random_b,
            task_type="CAUSAL_LM",
        ),
    )
    if random_b:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.2)
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
    report = evaluate_adapter(
        base_model=str(tiny),
        adapter_path=None,
        heldout_kto=THUMBS,
        heldout_dpo=[PAIR, PAIR],
        canary_prompts=DEFAULT_CANARY_PROMPTS[:2],
        max_new_tokens=8,
    )
    assert report.pair_accuracy == 0.5  # every pair is a tie against itself
    assert report.pair_margin == 0.0 and report.kto_separation == 0.0
    assert report.canary_kl == 0.0
    assert (report.n_pairs, report.n_thumbs, report.n_canary) == (2, 2, 2)
    assert len(report.canary_replies) == 2
    json.dumps(report.to_dict())


def test_pair_margin_is_the_implicit_reward_margin(tiny: Path, tmp_path: Path):
    adapter = _save_adapter(tiny, tmp_path / "random", random_b=True)
    beta = 0.25
    report = evaluate_adapter(
        base_model=str(tiny),
        adapter_path=adapter,
        heldout_kto=THUMBS,
        heldout_dpo=[PAIR],
        canary_prompts=[],
        beta=beta,
    )

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


def test_canary_kl_is_zero_for_an_untrained_adapter_and_positive_for_a_moved_one(
    tiny: Path, tmp_path: Path
):
    common = dict(
        base_model=str(tiny),
        heldout_kto=[],
        heldout_dpo=[],
        canary_prompts=DEFAULT_CANARY_PROMPTS[:3],
        max_new_tokens=12,
    )
    base = evaluate_adapter(adapter_path=None, **common)
    untrained = evaluate_adapter(
        adapter_path=_save_adapter(tiny, tmp_path / "z", random_b=False), **common
    )
    moved = evaluate_adapter(
        adapter_path=_save_adapter(tiny, tmp_path / "r", random_b=True), **common
    )
    assert untrained.canary_kl == pytest.approx(0.0, abs=1e-6)
    assert untrained.canary_replies == base.canary_replies
    assert moved.canary_kl > 1e-3
    assert moved.pair_accuracy is None and moved.kto_separation is None


def test_one_class_thumbs_give_no_separation(tiny: Path):
    report = evaluate_adapter(
        base_model=str(tiny),
        adapter_path=None,
        heldout_kto=THUMBS[:1],
        heldout_dpo=[],
        canary_prompts=[],
    )
    assert report.kto_separation is None and report.pair_accuracy is None
    assert report.n_canary == 0 and report.degenerate_share == 0.0


def test_bad_evaluation_input_raises_typed_errors(tiny: Path):
    common = dict(base_model=str(tiny), adapter_path=None, heldout_kto=[], heldout_dpo=[])
    with pytest.raises(ValueError, match="beta.*max_new_tokens"):
        evaluate_adapter(canary_prompts=[], beta=0.0, max_new_tokens=0, **common)
    with pytest.raises(InvalidRowError, match="canary prompt 1"):
        evaluate_adapter(canary_prompts=[DEFAULT_CANARY_PROMPTS[0], [{"role": "user"}]], **common)
    with pytest.raises(FileNotFoundError):
        evaluate_adapter(canary_prompts=[], **common | {"adapter_path": Path("/nonexistent")})


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


def _report(**kwargs) -> EvalReport:
    fields = dict(
        pair_accuracy=0.8,
        pair_margin=0.5,
        kto_separation=0.4,
        canary_kl=0.05,
        degenerate_share=0.0,
        n_pairs=10,
        n_thumbs=10,
        n_canary=6,
    )
    return EvalReport(**(fields | kwargs))


def test_gate_promotes_a_candidate_that_is_no_worse():
    promote, reasons = gate_decision(_report(pair_accuracy=0.9), _report())
    assert promote
    assert len(reasons) == 1 and reasons[0].startswith("promote")
    assert "0.900" in reasons[0] and "0.800" in reasons[0]


def test_gate_rejects_an_accuracy_drop_with_the_reason():
    promote, reasons = gate_decision(_report(pair_accuracy=0.7), _report())
    assert not promote
    assert reasons == ["pair accuracy fell from 0.800 to 0.700 (allowed drop 0.000)"]


def test_gate_allows_a_drop_within_the_configured_margin():
    config = GateConfig(max_accuracy_drop=0.15)
    assert gate_decision(_report(pair_accuracy=0.7), _report(), config)[0]


def test_gate_lists_every_failed_check():
    candidate = _report(kto_separation=0.1, pair_margin=0.2, canary_kl=0.9, degenerate_share=0.5)
    promote, reasons = gate_decision(candidate, _report())
    assert not promote
    text = "\n".join(reasons)
    assert len(reasons) == 5
    for words in (
        "canary KL 0.900",
        "degenerate canary replies 0.50 exceed",
        "KTO separation",
        "pair reward margin",
        "rose from 0.00 to 0.50",
    ):
        assert words in text


def test_gate_without_an_active_adapter_applies_absolute_limits_only():
    assert gate_decision(_report(pair_accuracy=0.1), None)[0]
    promote, reasons = gate_decision(_report(canary_kl=2.0), None)
    assert not promote and "canary KL" in reasons[0]


def test_gate_skips_comparisons_when_a_report_lacks_the_metric():
    candidate = _report(pair_accuracy=None, pair_margin=None, n_pairs=0)
    assert gate_decision(candidate, _report())[0]
    assert gate_decision(_report(pair_accuracy=0.1), replace(_report(), pair_accuracy=None))[0]


def test_gate_rejects_non_finite_metrics_and_bad_limits():
    promote, reasons = gate_decision(_report(pair_margin=math.nan), _report())
    assert not promote and "pair_margin" in reasons[0]
    with pytest.raises(ValueError, match="max_canary_kl.*max_degenerate_share"):
        gate_decision(
            _report(), None, GateConfig(max_canary_kl=-1.0, max_degenerate_share=math.inf)
        )
