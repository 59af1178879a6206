"""One training round on a real tiny model: what it changes, what it learns, its edges.

The preference in the data is simple and content-independent: the chosen/desirable
reply is always a polite sentence template, the rejected/undesirable one a rude
template, each around a varying topic. Held-out rows use topics never trained on, so
a rising held-out margin means the round learned the preference, not the rows.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tiny_models import make_tiny_model
from transformers import AutoModelForCausalLM

from retrain import modeling
from retrain.implicit import implicit_report
from retrain.losses import sequence_logps
from retrain.train import (
    RoundResult,
    TrainConfig,
    _batches,
    phase_steps,
    run_round,
    train_round,
)

torch.set_num_threads(1)

TRAIN_TOPICS = [
    "the weather",
    "my cat",
    "Paris",
    "water",
    "the train",
    "dinner",
    "music",
    "the sea",
    "books",
    "coffee",
]
HELDOUT_TOPICS = ["a city", "the night", "school", "a garden", "winter", "trees"]
FAST = TrainConfig(refresh_pairs=False, learning_rate=1e-3, kto_steps=4, dpo_steps=4, batch_size=4, log_every=2)


def polite(topic: str) -> str:
    return f"Thank you for asking about {topic}! Have a nice day."


def rude(topic: str) -> str:
    return f"No. {topic} is boring, go away."


def prompt(topic: str) -> list[dict]:
    return [{"role": "user", "content": f"Tell me about {topic}."}]


def reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def dpo_rows(topics: list[str]) -> list[dict]:
    return [
        {"prompt": prompt(t), "chosen": reply(polite(t)), "rejected": reply(rude(t))}
        for t in topics
    ]


def kto_rows(topics: list[str]) -> list[dict]:
    """Unpaired thumbs: each topic once, alternately up (polite) and down (rude)."""
    return [
        {
            "prompt": prompt(t),
            "completion": reply(polite(t) if i % 2 else rude(t)),
            "label": bool(i % 2),
        }
        for i, t in enumerate(topics)
    ]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


def _round(tiny: Path, out: Path, **kwargs) -> RoundResult:
    args = {"kto_rows": [], "dpo_rows": [], "parent_adapter": None, "config": FAST} | kwargs
    return train_round(base_model=str(tiny), out_dir=out, **args)


def _all_finite(result: RoundResult) -> bool:
    values = list(result.metrics.values())
    values += [v for h in result.history for v in h.values() if isinstance(v, float)]
    return all(math.isfinite(v) for v in values)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_round_moves_lora_weights_and_leaves_base_weights_untouched(tmp_path: Path, arch: str):
    path = make_tiny_model(tmp_path / arch, arch=arch)
    lora = modeling.fresh_lora_config(r=8, alpha=16, dropout=0.0, target_modules="all-linear")
    model = modeling.load_trainable_model(
        path, parent_adapter=None, lora=lora, device=torch.device("cpu"), quantize_4bit=False
    )
    tokenizer = modeling.load_tokenizer(path)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)

    run_round(
        model,
        tokenizer,
        kto_rows=kto_rows(TRAIN_TOPICS),
        dpo_rows=dpo_rows(TRAIN_TOPICS),
        config=FAST,
    )

    after = dict(model.named_parameters())
    for name, old in before.items():
        if name in trainable:
            assert not torch.equal(old, after[name]), f"LoRA weight {name} did not move"
        elif name not in trainable:
            assert torch.equal(old, after[name]), f"base weight {name} changed"


def test_saved_adapter_loads_with_peft_and_changes_the_model(tiny: Path, tmp_path: Path):
    out = tmp_path / "adapter"
    _round(
        tiny,
        out,
        dpo_rows=dpo_rows(TRAIN_TOPICS),
        config=TrainConfig(refresh_pairs=False, learning_rate=1e-3, dpo_steps=3, lora_r=4, lora_alpha=8),
    )
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4

    base = AutoModelForCausalLM.from_pretrained(tiny)
    ids = torch.tensor([[2, 40, 41, 42, 43]])
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, out)
        adapted_logits = adapted(ids).logits
        with adapted.disable_adapter():
            disabled_logits = adapted(ids).logits
    assert not torch.allclose(base_logits, adapted_logits)
    assert torch.allclose(base_logits, disabled_logits)


def test_dpo_round_raises_heldout_preference_margin(tiny: Path, tmp_path: Path):
    heldout = dpo_rows(HELDOUT_TOPICS)
    common = dict(base_model=str(tiny), heldout_kto=[], heldout_dpo=heldout)
    before = implicit_report(adapter_path=None, **common)
    out = tmp_path / "dpo"
    result = _round(
        tiny,
        out,
        dpo_rows=dpo_rows(TRAIN_TOPICS),
        config=TrainConfig(refresh_pairs=False, learning_rate=1e-3, dpo_steps=20, epochs=10),
    )
    after = implicit_report(adapter_path=out, **common)

    assert result.metrics["dpo/steps"] == 20
    assert before.pair_margin == 0.0 and before.pair_accuracy == 0.5
    assert after.pair_margin > 0.5
    assert after.pair_accuracy >= 5 / 6
    assert after.pair_logp_margin > before.pair_logp_margin + 5.0
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_kto_round_raises_heldout_thumb_separation(tiny: Path, tmp_path: Path):
    heldout = [
        {"prompt": prompt(t), "completion": reply(f(t)), "label": f is polite}
        for t in HELDOUT_TOPICS
        for f in (polite, rude)
    ]
    common = dict(base_model=str(tiny), heldout_kto=heldout, heldout_dpo=[])
    before = implicit_report(adapter_path=None, **common)
    out = tmp_path / "kto"
    train = kto_rows(TRAIN_TOPICS) + kto_rows(list(reversed(TRAIN_TOPICS)))
    _round(
        tiny, out, kto_rows=train, config=TrainConfig(refresh_pairs=False, learning_rate=1e-3, kto_steps=20, epochs=10)
    )
    after = implicit_report(adapter_path=out, **common)

    assert before.kto_separation == 0.0
    assert after.kto_separation > 0.5
    assert after.kto_logp_separation > before.kto_logp_separation + 5.0


def test_a_rate_too_high_for_the_kl_budget_backs_off_instead_of_ending_the_round(
    tiny: Path, tmp_path: Path
):
    """At a rate that overshoots the budget within the first checks, the phase puts back
    the last weights within budget and halves its rate; without back-offs the same run
    of checks ends the phase, and either way the saved adapter is within budget."""
    train = kto_rows(TRAIN_TOPICS) + kto_rows(list(reversed(TRAIN_TOPICS)))
    hot = TrainConfig(refresh_pairs=False, kto_learning_rate=5e-2, kto_steps=24, min_steps=24, batch_size=4,
                      kl_budget=0.02, kl_check_every=2, kl_patience=1, kl_probe_prompts=4,
                      kl_probe_samples=2, kl_probe_tokens=12, warmup_ratio=0.0)
    backed = _round(tiny, tmp_path / "backed", kto_rows=train, config=hot)
    m = backed.metrics
    assert m["kto/kl_backoffs"] >= 1, m
    assert m["kto/peak_lr"] == pytest.approx(5e-2 / 2 ** m["kto/kl_backoffs"])
    first = next(h["step"] for h in backed.history if "kl/backoff" in h)
    assert m["kto/steps"] > first  # it trained on after backing off
    assert 0 < m["kl_sampled"] <= 0.02  # and kept a trained adapter within budget
    stopped = _round(tiny, tmp_path / "stopped", kto_rows=train,
                     config=replace(hot, kl_backoffs=0))
    s = stopped.metrics
    assert s["kto/kl_backoffs"] == 0 and s["kto/stopped_by_kl_budget"] == 1.0
    assert s["kto/steps"] == first and s["kl_sampled"] == 0.0  # a no-op round


def test_the_dpo_phase_runs_after_a_kto_phase_that_spent_the_kl_budget(
    tiny: Path, tmp_path: Path
):
    """A KTO phase that ends on the KL budget leaves the round's weights at its last
    check within budget, and the DPO phase trains on from there: its pairs (in a round
    of thumbs, the model's own replies ranked by the thumbs' scorer) are often what
    teaches a content rule, which the thumbs' KTO phase had spent the budget without."""
    train = kto_rows(TRAIN_TOPICS) + kto_rows(list(reversed(TRAIN_TOPICS)))
    hot_kto = TrainConfig(refresh_pairs=False, kto_learning_rate=5e-2, learning_rate=1e-3,
                          kto_steps=24, dpo_steps=6, min_steps=6, batch_size=4,
                          kl_budget=0.02, kl_check_every=2, kl_patience=1, kl_backoffs=0,
                          kl_probe_prompts=4, kl_probe_samples=2, kl_probe_tokens=12,
                          warmup_ratio=0.0)
    result = _round(tiny, tmp_path / "both", kto_rows=train, dpo_rows=dpo_rows(TRAIN_TOPICS),
                    config=hot_kto)
    m = result.metrics
    assert m["kto/stopped_by_kl_budget"] == 1.0 and m["kto/steps"] < 24, m
    assert m["dpo/steps"] >= 2, m  # it ran on, from the weights within budget
    first_dpo = next(h for h in result.history if h["phase"] == "dpo")
    assert first_dpo["step"] == 1
    assert m["kl_sampled"] <= 0.02  # the saved adapter is within budget either way


def _checked_steps(result: RoundResult) -> list[int]:
    return [h["step"] for h in result.history if "kl/sampled" in h]


def test_kl_checks_space_out_while_far_inside_the_budget_and_leave_training_as_it_was(
    tiny: Path, tmp_path: Path
):
    """A phase whose KL checks read at most half the budget is checked every second
    interval; the checks do not change what it trains; a phase over its budget is
    checked at every interval."""
    train = kto_rows(TRAIN_TOPICS)
    config = TrainConfig(refresh_pairs=False, kto_steps=12, min_steps=12, batch_size=4,
                         kl_budget=1e6, kl_check_every=2, kl_probe_prompts=4,
                         kl_probe_samples=2, kl_probe_tokens=12, log_every=1)
    far = _round(tiny, tmp_path / "far", kto_rows=train, config=config)
    assert _checked_steps(far) == [2, 6, 10, 12]
    assert far.metrics["kl_checks"] == 4
    unchecked = _round(tiny, tmp_path / "unchecked", kto_rows=train,
                       config=replace(config, kl_budget=None))
    assert _checked_steps(unchecked) == []
    trained = load_file(tmp_path / "far" / "adapter_model.safetensors")
    plain = load_file(tmp_path / "unchecked" / "adapter_model.safetensors")
    assert trained.keys() == plain.keys()
    assert all(torch.equal(trained[k], plain[k]) for k in trained)
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)
    over = _round(tiny, tmp_path / "over", kto_rows=train,
                  config=replace(config, kl_budget=1e-9, kl_patience=100, kl_backoffs=0))
    assert _checked_steps(over) == [2, 4, 6, 8, 10, 12]


def _mean_chosen_logps(model: torch.nn.Module, tokenizer, rows: list[dict]) -> float:
    pairs = modeling.encode_dpo_rows(tokenizer, rows)
    batch = modeling.collate(
        [(p.chosen.prompt_ids, p.chosen.completion_ids) for p in pairs],
        pad_id=tokenizer.pad_token_id,
        max_length=512,
        device=torch.device("cpu"),
    )
    with torch.no_grad():
        return (
            sequence_logps(
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                batch.labels,
            )
            .mean()
            .item()
        )


def test_round_starts_from_the_parent_adapter_and_keeps_its_shape(tiny: Path, tmp_path: Path):
    parent = tmp_path / "parent"
    _round(
        tiny,
        parent,
        dpo_rows=dpo_rows(TRAIN_TOPICS),
        config=TrainConfig(refresh_pairs=False, learning_rate=1e-3, dpo_steps=10, lora_r=8, lora_alpha=16),
    )
    rows = dpo_rows(TRAIN_TOPICS[:4])
    tokenizer = modeling.load_tokenizer(tiny)
    parent_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), parent)
    parent_logps = _mean_chosen_logps(parent_model, tokenizer, rows)
    base_logps = _mean_chosen_logps(AutoModelForCausalLM.from_pretrained(tiny), tokenizer, rows)
    assert abs(parent_logps - base_logps) > 0.1  # the parent really differs from the base

    child = tmp_path / "child"
    result = _round(
        tiny,
        child,
        parent_adapter=parent,
        dpo_rows=rows,
        config=TrainConfig(refresh_pairs=False, learning_rate=1e-3, dpo_steps=3, lora_r=16, start_from="parent"),
    )

    first = result.history[0]
    assert first["step"] == 1
    assert first["logps/chosen"] == pytest.approx(parent_logps, abs=1e-3)
    assert first["rewards/margins"] > 0  # measured against the base, which the parent beats
    assert json.loads((child / "adapter_config.json").read_text())["r"] == 8
    child_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), child)
    assert _mean_chosen_logps(child_model, tokenizer, rows) != pytest.approx(parent_logps)


@pytest.mark.parametrize(
    "kind",
    [
        "kto_only",
        "dpo_only",
        "ipo",
        "one_kto_row",
        "one_dpo_row",
        "all_thumbs_up",
        "all_thumbs_down",
    ],
)
def test_edge_rounds_run_and_stay_finite(tiny: Path, tmp_path: Path, kind: str):
    rows = {
        "kto_only": {"kto_rows": kto_rows(TRAIN_TOPICS)},
        "dpo_only": {"dpo_rows": dpo_rows(TRAIN_TOPICS)},
        "ipo": {"dpo_rows": dpo_rows(TRAIN_TOPICS)},
        "one_kto_row": {"kto_rows": kto_rows(TRAIN_TOPICS)[:1]},
        "one_dpo_row": {"dpo_rows": dpo_rows(TRAIN_TOPICS)[:1]},
        "all_thumbs_up": {"kto_rows": [r | {"label": True} for r in kto_rows(TRAIN_TOPICS)]},
        "all_thumbs_down": {"kto_rows": [r | {"label": False} for r in kto_rows(TRAIN_TOPICS)]},
    }[kind]
    config = TrainConfig(
        refresh_pairs=False,
        learning_rate=1e-3,
        kto_steps=5,
        dpo_steps=5,
        epochs=3.0,
        min_steps=0,
        dpo_loss_type="ipo" if kind == "ipo" else "sigmoid",
    )
    out = tmp_path / kind
    result = _round(tiny, out, config=config, **rows)

    assert _all_finite(result)
    phases = {h["phase"] for h in result.history}
    assert phases == ({"kto"} if "kto_rows" in rows else {"dpo"})
    assert (out / "adapter_config.json").is_file()
    if kind.startswith("one_"):  # one row, batch of one: three passes over it
        assert result.metrics[f"{kind[4:7]}/steps"] == 3
    if kind == "all_thumbs_down":
        weights = (result.metrics["kto/desirable_weight"], result.metrics["kto/undesirable_weight"])
        assert weights == (1.0, 1.0)


def test_both_phases_share_one_adapter_and_log_in_order(tiny: Path, tmp_path: Path):
    records: list[dict] = []
    result = _round(
        tiny,
        tmp_path / "both",
        kto_rows=kto_rows(TRAIN_TOPICS),
        dpo_rows=dpo_rows(TRAIN_TOPICS),
        progress=records.append,
    )
    assert [(r["phase"], r["step"]) for r in records] == [
        ("kto", 1),
        ("kto", 2),
        ("kto", 4),
        ("dpo", 1),
        ("dpo", 2),
        ("dpo", 4),
    ]
    assert records == result.history
    for record in records:
        assert {"phase", "step", "total_steps", "loss", "reward_margin"} <= set(record)
        assert record["total_steps"] == 4
    # The DPO phase starts where KTO left the adapter: its first rewards are not zero.
    assert records[3]["rewards/chosen"] != 0.0
    assert result.metrics["kto/rows"] == 10 and result.metrics["dpo/rows"] == 10


def test_unbalanced_thumbs_get_balanced_weights(tiny: Path, tmp_path: Path):
    rows = kto_rows(TRAIN_TOPICS)
    rows = [r | {"label": i == 0} for i, r in enumerate(rows)]  # 1 up, 9 down
    result = _round(tiny, tmp_path / "w", kto_rows=rows)
    assert result.metrics["kto/desirable_weight"] == pytest.approx(9.0)
    assert result.metrics["kto/undesirable_weight"] == 1.0


def test_same_seed_gives_the_same_adapter(tiny: Path, tmp_path: Path):
    def weights(out: Path, seed: int) -> dict[str, torch.Tensor]:
        _round(tiny, out, kto_rows=kto_rows(TRAIN_TOPICS), config=replace(FAST, seed=seed))
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), out)
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    first, again, other = (
        weights(tmp_path / "a", 0),
        weights(tmp_path / "b", 0),
        weights(tmp_path / "c", 1),
    )
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not all(torch.equal(first[n], other[n]) for n in first)


def test_phase_steps_stop_after_the_configured_epochs_but_not_before_min_steps():
    config = TrainConfig(refresh_pairs=False, batch_size=4, epochs=3.0, min_steps=0)
    assert phase_steps(2, config, 50) == 3  # one batch per epoch
    assert phase_steps(10, config, 50) == 9  # three batches per epoch
    assert phase_steps(1000, config, 50) == 50  # the step bound wins
    assert phase_steps(0, config, 50) == 0
    floor = TrainConfig(refresh_pairs=False, batch_size=4, epochs=3.0, min_steps=20)
    assert phase_steps(2, floor, 50) == 20  # few rows: the floor
    assert phase_steps(40, floor, 50) == 30  # enough rows: the epochs
    assert phase_steps(2, floor, 12) == 12  # the step bound still wins
    assert phase_steps(0, floor, 50) == 0  # no rows, no phase
    assert TrainConfig().min_steps == 60
    with pytest.raises(ValueError, match="min_steps"):
        TrainConfig(refresh_pairs=False, min_steps=-1).validate()


def test_batches_never_repeat_a_row_and_every_epoch_is_a_permutation():
    for n_rows in range(1, 13):
        for batch_size in range(1, 9):
            size = min(batch_size, n_rows)
            stream = _batches(n_rows, batch_size, torch.Generator().manual_seed(n_rows))
            batches = [next(stream) for _ in range(6 * n_rows)]
            assert all(len(b) == size and len(set(b)) == size for b in batches), (
                n_rows, batch_size, batches)
            flat = [i for b in batches for i in b]
            epochs = [flat[k : k + n_rows] for k in range(0, len(flat) - n_rows + 1, n_rows)]
            assert all(sorted(e) == list(range(n_rows)) for e in epochs)
    first = _batches(10, 4, torch.Generator().manual_seed(3))
    again = _batches(10, 4, torch.Generator().manual_seed(3))
    other = _batches(10, 4, torch.Generator().manual_seed(4))
    taken = [[next(it) for _ in range(20)] for it in (first, again, other)]
    assert taken[0] == taken[1] != taken[2]


def test_empty_round_and_zero_steps_raise_value_error(tiny: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="at least one"):
        _round(tiny, tmp_path / "x")
    with pytest.raises(ValueError, match="nothing to train"):
        _round(
            tiny, tmp_path / "y", kto_rows=kto_rows(TRAIN_TOPICS), config=TrainConfig(refresh_pairs=False, kto_steps=0)
        )
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_config_validate_lists_every_problem():
    bad = TrainConfig(
        refresh_pairs=False,
        beta=0.0,
        dpo_loss_type="hinge",
        batch_size=0,
        lora_dropout=1.5,
        target_modules=(),
        desirable_weight=-1.0,
        kto_learning_rate=0.0,
        kl_backoffs=-1,
    )
    with pytest.raises(ValueError) as info:
        bad.validate()
    message = str(info.value)
    for name in (
        "beta",
        "dpo_loss_type",
        "batch_size",
        "lora_dropout",
        "target_modules",
        "desirable_weight",
        "kto_learning_rate",
        "kl_backoffs",
    ):
        assert name in message
    TrainConfig().validate()


def test_dpo_loss_types_are_defined_once_in_losses():
    from retrain import losses

    with pytest.raises(ValueError, match=re.escape(str(losses.DPO_LOSS_TYPES))):
        TrainConfig(dpo_loss_type="hinge").validate()
    root = Path(losses.__file__).parent
    defining = [p.name for p in sorted(root.glob("*.py"))
                if "\nDPO_LOSS_TYPES =" in p.read_text()]
    assert defining == ["losses.py"]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": prompt("x"), "completion": reply("y"), "label": 1}, "label"),
        ({"completion": reply("y"), "label": True}, "prompt"),
        (
            {
                "prompt": [{"role": "robot", "content": "hi"}],
                "completion": reply("y"),
                "label": True,
            },
            "role",
        ),
        (
            {"prompt": prompt("x"), "completion": [{"role": "assistant"}], "label": True},
            "completion",
        ),
    ],
)
def test_malformed_rows_raise_a_typed_error_naming_the_row(
    tiny: Path, tmp_path: Path, row, message: str
):
    rows = kto_rows(TRAIN_TOPICS[:2]) + [row]
    with pytest.raises(modeling.InvalidRowError, match=f"KTO row 2.*{message}"):
        _round(tiny, tmp_path / "bad", kto_rows=rows)


def test_four_bit_on_the_cpu_is_refused(tiny: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="CUDA"):
        _round(
            tiny,
            tmp_path / "q",
            kto_rows=kto_rows(TRAIN_TOPICS),
            config=TrainConfig(refresh_pairs=False, quantize_4bit=True, device="cpu"),
        )


def test_completion_tokens_end_with_end_of_turn_and_long_prompts_lose_their_start(tiny: Path):
    tokenizer = modeling.load_tokenizer(tiny)
    long_prompt = [{"role": "user", "content": "Tell me about cats. " * 40}]
    [example] = modeling.encode_kto_rows(
        tokenizer, [{"prompt": long_prompt, "completion": reply("Cats sleep."), "label": True}]
    )
    completion = list(example.turn.completion_ids)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in completion[-2:]
    assert tokenizer.decode(completion, skip_special_tokens=True).strip() == "Cats sleep."

    batch = modeling.collate(
        [(example.turn.prompt_ids, completion)], pad_id=0, max_length=32, device=torch.device("cpu")
    )
    ids = batch.input_ids[0].tolist()
    assert len(ids) == 32
    assert ids[-len(completion) :] == completion  # the completion is whole
    assert ids[: 32 - len(completion)] == list(example.turn.prompt_ids)[-(32 - len(completion)) :]
    labelled = batch.labels[0][batch.labels[0] != -100].tolist()
    assert labelled == completion


def test_a_truncated_pair_keeps_one_prompt_for_chosen_and_rejected(tiny: Path):
    tokenizer = modeling.load_tokenizer(tiny)
    long_prompt = [{"role": "user", "content": "Tell me about cats. " * 40}]
    row = {"prompt": long_prompt, "chosen": reply("Cats sleep."),
           "rejected": reply("No. Cats are boring, go away, I will not talk about them.")}
    [whole] = modeling.encode_dpo_rows(tokenizer, [row])
    short, long = len(whole.chosen.completion_ids), len(whole.rejected.completion_ids)
    assert short < long
    max_length = 40
    [pair] = modeling.encode_dpo_rows(tokenizer, [row], max_length=max_length)
    # the prompt loses from the left what the longer (rejected) side needs; both keep it
    assert pair.chosen.prompt_ids == pair.rejected.prompt_ids
    assert pair.chosen.prompt_ids == whole.chosen.prompt_ids[-(max_length - long) :]
    assert pair.chosen.completion_ids == whole.chosen.completion_ids
    assert pair.rejected.completion_ids == whole.rejected.completion_ids

    # what the trainer feeds the model: one batch, chosen rows then rejected rows
    batch = modeling.collate(
        [(t.prompt_ids, t.completion_ids) for t in (pair.chosen, pair.rejected)],
        pad_id=0, max_length=max_length, device=torch.device("cpu"),
    )
    n_prompt = max_length - long
    ids, labels = batch.input_ids.tolist(), batch.labels.tolist()
    assert ids[0][:n_prompt] == ids[1][:n_prompt] == list(pair.chosen.prompt_ids)
    assert labels[0][:n_prompt] == labels[1][:n_prompt] == [-100] * n_prompt
    assert [t for t in labels[0] if t != -100] == list(whole.chosen.completion_ids)
    assert [t for t in labels[1] if t != -100] == list(whole.rejected.completion_ids)
    assert batch.attention_mask.sum(1).tolist() == [n_prompt + short, max_length]


def test_fit_pair_cuts_completions_from_the_right_only_when_they_alone_do_not_fit():
    prompt = tuple(range(100, 110))
    pair = modeling.DPOExample(modeling.Turn(prompt, (1, 2)), modeling.Turn(prompt, (3,) * 9))
    fitted = modeling.fit_pair(pair, 12)
    assert fitted.chosen.prompt_ids == fitted.rejected.prompt_ids == prompt[-3:]
    assert fitted.chosen.completion_ids == (1, 2)
    assert fitted.rejected.completion_ids == (3,) * 9
    # a completion longer than max_length keeps max_length - 1 tokens and one prompt token
    fitted = modeling.fit_pair(pair, 5)
    assert fitted.chosen.prompt_ids == fitted.rejected.prompt_ids == prompt[-1:]
    assert fitted.chosen.completion_ids == (1, 2)
    assert fitted.rejected.completion_ids == (3,) * 4
    # a pair that fits is unchanged
    assert modeling.fit_pair(pair, 64) == pair
    with pytest.raises(ValueError, match="different prompts"):
        modeling.fit_pair(modeling.DPOExample(modeling.Turn((1,), (2,)),
                                              modeling.Turn((9,), (2,))), 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_round_on_cuda_trains_a_4bit_base(tiny: Path, tmp_path: Path):
    out = tmp_path / "qlora"
    result = _round(
        tiny,
        out,
        kto_rows=kto_rows(TRAIN_TOPICS),
        dpo_rows=dpo_rows(TRAIN_TOPICS),
        config=TrainConfig(refresh_pairs=False, learning_rate=1e-3, kto_steps=5, dpo_steps=5),
    )
    assert result.metrics["quantized_4bit"] == 1.0
    assert _all_finite(result)
    assert result.history[-1]["rewards/margins"] != 0.0
    assert (out / "adapter_config.json").is_file()
    # gradients reached every layer through the 4-bit base and gradient checkpointing
    weights = load_file(out / "adapter_model.safetensors")
    lora_b = {k for k in weights if "lora_B" in k}
    assert lora_b and {k for k in lora_b if weights[k].abs().sum() > 0} == lora_b


def test_down_votes_alone_beside_pairs_skip_the_kto_phase(tiny: Path, tmp_path: Path):
    downs = [r | {"label": False} for r in kto_rows(TRAIN_TOPICS)]
    result = _round(tiny, tmp_path / "a", kto_rows=downs, dpo_rows=dpo_rows(TRAIN_TOPICS))
    assert result.metrics["kto/skipped_only_down_votes"] == len(downs)
    assert "kto/steps" not in result.metrics and result.metrics["dpo/steps"] == 4
    alone = _round(tiny, tmp_path / "b", kto_rows=downs)  # nothing else to learn from
    assert alone.metrics["kto/steps"] == 4
