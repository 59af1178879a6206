"""Batched sampling and KL (``retrain.sampling``): prompts of different lengths decoded
together, left-padded, must give what each prompt gives alone."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_models import make_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from retrain import modeling, sampling
from retrain.sampling import encode_prompt, kl_to_base, sample_replies, stop_token_ids

QUESTIONS = ["Hi", "What is the capital of France, and why is it on the Seine?",
             "Cats?", "Tell me about water boiling at sea level, please, in detail."]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    path = make_tiny_model(tmp_path_factory.mktemp(request.param) / "m", arch=request.param)
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    torch.manual_seed(1)
    model = get_peft_model(base, modeling.fresh_lora_config(
        r=4, alpha=8, dropout=0.0, target_modules="all-linear")).eval()
    with torch.no_grad():  # a LoRA that moves the model (B starts at zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": q}], 256)
               for q in QUESTIONS]
    assert len({len(p) for p in prompts}) > 1  # the batch needs padding
    return model, tokenizer, prompts


def _sample(model, tokenizer, prompts, n, **kw):
    args = dict(temperature=0.0, top_p=1.0, max_new_tokens=12,
                stop_ids=stop_token_ids(model, tokenizer), seed=3)
    return sample_replies(model, prompts, n, **{**args, **kw})


def test_batched_greedy_replies_equal_each_prompt_alone(setup) -> None:
    model, tokenizer, prompts = setup
    together = _sample(model, tokenizer, prompts, 2)
    alone = [_sample(model, tokenizer, [p], 2)[0] for p in prompts]
    assert together == alone
    assert [len(g) for g in together] == [2] * len(prompts)
    assert all(r for g in together for r in g)


def test_sampling_is_seeded_and_chunking_keeps_rows_in_order(setup) -> None:
    model, tokenizer, prompts = setup
    kw = dict(temperature=1.0, top_p=0.95)
    first = _sample(model, tokenizer, prompts, 3, **kw)
    assert first == _sample(model, tokenizer, prompts, 3, **kw)
    assert first != _sample(model, tokenizer, prompts, 3, **{**kw, "seed": 4})
    chunked = _sample(model, tokenizer, prompts, 3, max_rows=5, **{**kw, "temperature": 0.0})
    assert chunked == _sample(model, tokenizer, prompts, 3, temperature=0.0)


def test_kl_to_base_batched_equals_per_turn_and_is_zero_without_adapter(setup) -> None:
    model, tokenizer, prompts = setup
    replies = _sample(model, tokenizer, prompts, 2, temperature=1.0, top_p=1.0)
    turns = [(p, r) for p, group in zip(prompts, replies, strict=True) for r in group]
    pad = tokenizer.pad_token_id
    total, count = kl_to_base(model, turns, pad)
    one_by_one = [kl_to_base(model, [t], pad) for t in turns]
    assert count == sum(len(r) for _, r in turns) == sum(c for _, c in one_by_one)
    assert total > 0.01 * count  # this LoRA moves the model
    assert total == pytest.approx(sum(k for k, _ in one_by_one), rel=1e-4)
    assert kl_to_base(model, turns, pad, max_rows=3) == pytest.approx((total, count), rel=1e-5)
    with model.disable_adapter():  # the adapter off: the model is the base, KL 0
        zero, _ = kl_to_base(_Unwrapped(model), turns, pad)
    assert zero == pytest.approx(0.0, abs=1e-6)
    assert kl_to_base(model, [(prompts[0], [])], pad) == (0.0, 0)


class _Unwrapped(torch.nn.Module):
    """The PEFT model with the adapter already disabled, and disable_adapter a no-op."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, **kw):
        return self.model(**kw)

    def disable_adapter(self):
        from contextlib import nullcontext

        return nullcontext()


def test_encode_prompt_drops_oldest_turns_over_budget(setup) -> None:
    _, tokenizer, _ = setup
    chat = [{"role": "user", "content": "Hello there, how are you doing today?"},
            {"role": "assistant", "content": "Fine, thank you for asking me."},
            {"role": "user", "content": "Cats?"}]
    full = encode_prompt(tokenizer, chat, 10_000)
    short = encode_prompt(tokenizer, chat, len(full) - 1)
    assert len(short) < len(full)
    assert short == encode_prompt(tokenizer, chat[1:], 10_000)  # the oldest turn went


def test_a_sampled_reply_does_not_depend_on_the_rows_beside_it(setup) -> None:
    """Sampled (not greedy) replies: each row keeps its own random numbers token by token,
    whichever rows share its batch and however long their replies run; so the replies
    of a batch are those of each prompt sampled in a batch of its own with the same
    numbers (the first chunk's rows are the same rows, so the same numbers)."""
    model, tokenizer, prompts = setup
    kw = dict(temperature=1.0, top_p=0.9, max_new_tokens=16)
    # a stop token that the first reply says early: rows end at different tokens
    kw["stop_ids"] = {_sample(model, tokenizer, prompts, 1, **kw)[0][0][2]}
    together = _sample(model, tokenizer, prompts, 1, **kw)
    assert len({len(r[0]) for r in together}) > 1  # replies of different lengths
    for i, prompt in enumerate(prompts):
        # the same prompt in row i, the other rows replaced by another prompt
        other = prompts[(i + 1) % len(prompts)]
        mixed = [prompt if j == i else other for j in range(len(prompts))]
        assert _sample(model, tokenizer, mixed, 1, **kw)[i] == together[i]


def test_nucleus_draws_follow_the_filtered_softmax_whichever_path_they_take() -> None:
    """The fast path (the nucleus among the 64 likeliest tokens) keeps exactly the tokens
    the full-vocabulary filter keeps; a flat row, whose nucleus is wider, falls back to
    it. Either way each token is drawn as often as its filtered probability says."""
    torch.manual_seed(0)
    peaked = torch.randn(3, 1000) * 4
    flat = torch.randn(1, 1000) * 0.1
    for logits in (peaked, torch.cat([peaked, flat])):
        scores = logits / 0.7
        want = _top_p_filter(scores, 0.95).softmax(-1)
        nucleus = sampling._nucleus(scores, 0.95)
        if logits is peaked:
            ids, probs = nucleus
            got = torch.zeros_like(want).scatter(-1, ids, probs)
            assert torch.equal(got > 0, want > 0)
            assert torch.allclose(got / got.sum(-1, keepdim=True), want, atol=1e-6)
        else:
            assert nucleus is None
        generator = torch.Generator().manual_seed(1)
        draws = torch.stack([
            sampling._draw(logits, 0.7, 0.95,
                           torch.rand((logits.shape[0], 1), generator=generator))
            for _ in range(4000)])
        for row in range(logits.shape[0]):
            freq = torch.bincount(draws[:, row], minlength=1000) / len(draws)
            assert (freq[want[row] == 0] == 0).all()
            assert (freq - want[row]).abs().max() < 0.03


def test_a_finished_reply_leaves_the_batch_and_changes_no_other_reply(setup) -> None:
    """Rows whose reply has ended stop being decoded (the forward passes shrink), and
    every row still gets what it gets decoded alone, to the same token budget."""
    model, tokenizer, prompts = setup
    greedy = _sample(model, tokenizer, prompts, 2, max_new_tokens=16)
    # a stop set holding the first token of some replies but not of others
    firsts = sorted({g[0][0] for g in greedy})
    assert len(firsts) > 1, "the tiny model's replies need different first tokens"
    stop = {firsts[0]}
    sizes: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kw: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        together = _sample(model, tokenizer, prompts, 2, max_new_tokens=16, stop_ids=stop)
    finally:
        hook.remove()
    alone = [_sample(model, tokenizer, [p], 2, max_new_tokens=16, stop_ids=stop)[0]
             for p in prompts]
    assert together == alone
    rows = [r for g in together for r in g]
    first_ended = sum(r[0] in stop for r in rows)
    assert 0 < first_ended < len(rows)
    assert sizes[0] == len(rows)  # the prompts
    assert sizes[1] == len(rows) - first_ended  # the rows that ended at once have left
    assert sizes == sorted(sizes, reverse=True)


def _top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """The nucleus by its definition: ``scores`` with the tokens outside each row's
    top-``top_p`` nucleus (the whole vocabulary sorted, its tail cut) set to -inf."""
    sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1] = False
    return scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
