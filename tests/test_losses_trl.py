"""The preference losses agree with TRL 1.16, loss, gradients and logged metrics.

TRL keeps its loss math inside ``DPOTrainer.compute_loss`` / ``KTOTrainer.compute_loss``,
after a model forward. These tests build real trainers on a tiny model and call
``compute_loss`` two ways: with a stand-in model that returns chosen per-token
log-probs (so both sides see the very same random numbers), and end to end with real
tiny models, where our side goes through :func:`sequence_logps` on the logits. TRL also
accepts the balanced KTO weights and warns about its defaults on unbalanced data.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from test_losses import _pairs, _thumbs
from tiny_models import make_tiny_model

from retrain.losses import (
    balanced_kto_weights,
    completion_token_counts,
    dpo_loss,
    kto_loss,
    mismatched_indices,
    sequence_logps,
)

torch.set_num_threads(1)

DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


# ---------------------------------------------------------------- parity with TRL 1.16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny policy, a perturbed copy as reference, and their tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    tokenizer = AutoTokenizer.from_pretrained(path)

    def load(noise: float):
        model = AutoModelForCausalLM.from_pretrained(path)
        torch.manual_seed(1)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(noise * torch.randn_like(param))
        return model

    return SimpleNamespace(path=path, tokenizer=tokenizer, load=load)


class LogpTable(torch.nn.Module):
    """Stands in for a model carrying TRL's fused LM head.

    Row ``n`` of ``input_ids`` starts with token id ``k``; its per-token log-probs are 0
    except ``values[k]`` on the last position, so TRL's sum over the row is ``values[k]``.
    """

    def __init__(self, values: torch.Tensor):
        super().__init__()
        self.values = values

    def forward(self, input_ids, labels=None, fused_lm_head=False, **kwargs):
        assert fused_lm_head
        rows, width = input_ids.shape
        zeros = torch.zeros(rows, width - 1, dtype=self.values.dtype)
        log_probs = torch.cat([zeros[:, 1:], self.values[input_ids[:, 0]].unsqueeze(1)], dim=1)
        return SimpleNamespace(
            log_probs=log_probs,
            entropy=zeros,
            mean_logits=zeros,
            is_top1=zeros.bool(),
            log_sum_sq_probs=None,
            aux_loss=None,
        )


def _trl_trainer(kind: str, tiny, tmp_path, rows: list[dict], *, ref_model=None, **config):
    """A real TRL DPOTrainer or KTOTrainer on the tiny model, in training mode."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    config_cls, trainer_cls = (DPOConfig, DPOTrainer) if kind == "dpo" else (KTOConfig, KTOTrainer)
    config.setdefault("per_device_train_batch_size", 4)
    args = config_cls(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        dataloader_num_workers=0,
        **config,
    )
    trainer = trainer_cls(
        model=tiny.load(0.0),
        ref_model=ref_model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tiny.tokenizer,
    )
    trainer.model.train()
    return trainer


DPO_ROWS = [
    {
        "prompt": f"Hello {i}?",
        "chosen": " Paris is a city" + " on the Seine" * (i % 3),
        "rejected": f" I am not sure {i}.",
    }
    for i in range(4)
]
KTO_ROWS = [
    {"prompt": f"Tell me {i}.", "completion": " Cats sleep" + " all day" * i, "label": lab}
    for i, lab in enumerate([True, False, True, True])
]


@pytest.mark.parametrize(
    "loss_type, beta", [("sigmoid", 0.1), ("sigmoid", 0.7), ("ipo", 0.1), ("ipo", 0.5)]
)
def test_dpo_matches_trl_on_the_same_logps(loss_type, beta, tiny, tmp_path):
    pytest.importorskip("trl")
    batch = 5
    trainer = _trl_trainer(
        "dpo",
        tiny,
        tmp_path,
        DPO_ROWS,
        beta=beta,
        loss_type=[loss_type],
        precompute_ref_log_probs=True,
    )
    pc, pr, rc, rr = _pairs(batch, seed=3)
    values = torch.cat([pc, pr]).requires_grad_(True)
    lengths = torch.tensor([3, 9, 1, 5, 12, 7, 2, 11, 4, 6])  # completion tokens per row
    completion_mask = (torch.arange(13) >= 1) & (torch.arange(13) <= lengths[:, None])
    inputs = {
        "input_ids": torch.arange(2 * batch)[:, None].expand(-1, 13).contiguous(),
        "attention_mask": torch.ones(2 * batch, 13, dtype=torch.long),
        "completion_mask": completion_mask.long(),
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    trl_loss = trainer.compute_loss(LogpTable(values), inputs)
    trl_loss.backward()
    trl_grad, values.grad = values.grad.clone(), None

    lengths_kw = {}
    if loss_type == "ipo":  # TRL's IPO divides each log-ratio by its completion length
        lengths_kw = {"chosen_lengths": lengths[:batch], "rejected_lengths": lengths[batch:]}
    loss, metrics = dpo_loss(
        values[:batch], values[batch:], rc, rr, beta=beta, loss_type=loss_type, **lengths_kw
    )
    loss.backward()
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-12)
    torch.testing.assert_close(values.grad, trl_grad, rtol=1e-12, atol=1e-15)
    logged = trainer._metrics["train"]
    for key in DPO_METRICS:  # TRL casts the accuracies to float32
        rel = 1e-7 if key == "rewards/accuracies" else 1e-12
        assert metrics[key].item() == pytest.approx(logged[key][-1], rel=rel), key


def test_dpo_label_smoothing_matches_trl_conservative_dpo(tiny, tmp_path):
    """TRL 1.16's sigmoid loss has no label smoothing; its "aot" loss applies the same
    conservative-DPO smoothing to sorted log-ratios, which for a single pair is plain cDPO."""
    pytest.importorskip("trl")
    trainer = _trl_trainer(
        "dpo",
        tiny,
        tmp_path,
        DPO_ROWS,
        beta=0.4,
        loss_type=["aot"],
        label_smoothing=0.15,
        precompute_ref_log_probs=True,
    )
    for seed in range(3):
        pc, pr, rc, rr = _pairs(1, seed=seed)
        inputs = {
            "input_ids": torch.tensor([[0, 0, 0], [1, 1, 1]]),
            "attention_mask": torch.ones(2, 3, dtype=torch.long),
            "completion_mask": torch.tensor([[0, 1, 1], [0, 1, 1]]),
            "ref_chosen_logps": rc,
            "ref_rejected_logps": rr,
        }
        trl_loss = trainer.compute_loss(LogpTable(torch.cat([pc, pr])), inputs)
        loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.4, label_smoothing=0.15)
        assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-12)


@pytest.mark.parametrize(
    "labels",
    [[True, False, True, False, False], [True] * 4, [False] * 3, [True, True]],
    ids=["mixed", "all_desirable", "all_undesirable", "pair"],
)
@pytest.mark.parametrize("beta, weights", [(0.1, (1.0, 1.0)), (0.5, (2.5, 1.0))])
def test_kto_matches_trl_on_the_same_logps(labels, beta, weights, tiny, tmp_path):
    pytest.importorskip("trl")
    batch = len(labels)
    trainer = _trl_trainer(
        "kto",
        tiny,
        tmp_path,
        KTO_ROWS,
        beta=beta,
        precompute_ref_log_probs=True,
        desirable_weight=weights[0],
        undesirable_weight=weights[1],
    )
    policy, ref, policy_kl, ref_kl = _thumbs(batch, seed=batch)
    policy_kl = policy_kl + 4.0  # a positive KL estimate, so the reference point is not clamped
    values = torch.cat([policy, policy_kl]).requires_grad_(True)
    ids = torch.arange(2 * batch)[:, None].expand(-1, 6).contiguous()
    ones = torch.ones(batch, 6, dtype=torch.long)
    inputs = {
        "input_ids": ids[:batch],
        "attention_mask": ones,
        "completion_mask": ones,
        "KL_input_ids": ids[batch:],
        "KL_attention_mask": ones,
        "KL_completion_mask": ones,
        "label": torch.tensor(labels),
        "ref_logps": ref,
        "ref_KL_logps": ref_kl,
    }
    trl_loss = trainer.compute_loss(LogpTable(values), inputs)
    trl_loss.backward()
    trl_grad, values.grad = values.grad.clone(), None

    loss, metrics = kto_loss(
        values[:batch],
        ref,
        values[batch:],
        ref_kl,
        torch.tensor(labels),
        beta=beta,
        desirable_weight=weights[0],
        undesirable_weight=weights[1],
    )
    loss.backward()
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-12)
    torch.testing.assert_close(values.grad, trl_grad, rtol=1e-12, atol=1e-15)
    logged = trainer._metrics["train"]
    assert metrics["kl"].item() == pytest.approx(logged["kl"][-1], rel=1e-6)  # TRL logs float32
    assert metrics["kl"].item() > 0
    pairs = [
        ("rewards/desirable", "rewards/chosen"),
        ("rewards/undesirable", "rewards/rejected"),
        ("rewards/margins", "rewards/margins"),
    ]
    for ours, theirs in pairs:
        if theirs in logged:  # TRL logs a class's rewards only when the class is present
            assert metrics[ours].item() == pytest.approx(logged[theirs][-1], rel=1e-12), ours
    assert ("rewards/chosen" in logged) == any(labels)
    assert ("rewards/rejected" in logged) == (not all(labels))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_on_a_real_tiny_model_matches_trl_end_to_end(loss_type, tiny, tmp_path):
    """sequence_logps on the model's logits + dpo_loss == TRL's fused-head DPO, loss and grads."""
    pytest.importorskip("trl")
    ref_model = tiny.load(0.05)
    trainer = _trl_trainer(
        "dpo", tiny, tmp_path, DPO_ROWS, ref_model=ref_model, beta=0.2, loss_type=[loss_type]
    )
    model = trainer.model
    batch = next(iter(trainer.get_train_dataloader()))
    trl_loss = trainer.compute_loss(model, batch)
    trl_loss.backward()
    trl_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    forward = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    policy = sequence_logps(model(**forward).logits, labels)
    with torch.no_grad():
        ref = sequence_logps(ref_model(**forward).logits, labels)
    lengths = completion_token_counts(labels)
    lengths_kw = {}
    if loss_type == "ipo":
        lengths_kw = dict(
            zip(("chosen_lengths", "rejected_lengths"), lengths.chunk(2), strict=True)
        )
    loss, metrics = dpo_loss(
        *policy.chunk(2), *ref.chunk(2), beta=0.2, loss_type=loss_type, **lengths_kw
    )
    loss.backward()
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5)
    for ours, theirs in zip((p.grad for p in model.parameters()), trl_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    for key in DPO_METRICS:
        assert metrics[key].item() == pytest.approx(trainer._metrics["train"][key][-1], abs=1e-5)
    assert metrics["rewards/margins"].abs().item() > 1e-3  # the two models really differ


def test_kto_on_a_real_tiny_model_matches_trl_end_to_end(tiny, tmp_path):
    """TRL's KL pairs are our mismatched_indices; our loss on the model's logits equals TRL's."""
    pytest.importorskip("trl")
    ref_model = tiny.load(0.05)
    trainer = _trl_trainer(
        "kto", tiny, tmp_path, KTO_ROWS, ref_model=ref_model, beta=0.3, desirable_weight=0.8
    )
    model = trainer.model
    batch = next(iter(trainer.get_train_dataloader()))
    order = mismatched_indices(len(KTO_ROWS))
    for i, j in enumerate(order):
        ids, kl_ids = batch["input_ids"], batch["KL_input_ids"]
        prompt = ids[i][(batch["completion_mask"][i] == 0) & (batch["attention_mask"][i] == 1)]
        kl_prompt = kl_ids[i][
            (batch["KL_completion_mask"][i] == 0) & (batch["KL_attention_mask"][i] == 1)
        ]
        assert torch.equal(prompt, kl_prompt)
        assert torch.equal(
            ids[j][batch["completion_mask"][j] == 1], kl_ids[i][batch["KL_completion_mask"][i] == 1]
        )
    trl_loss = trainer.compute_loss(model, batch)
    trl_loss.backward()
    trl_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    def logps(net, prefix: str) -> torch.Tensor:
        ids, mask = batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"]
        labels = ids.masked_fill(batch[f"{prefix}completion_mask"] == 0, -100)
        return sequence_logps(net(input_ids=ids, attention_mask=mask).logits, labels)

    with torch.no_grad():
        ref, ref_kl, policy_kl = logps(ref_model, ""), logps(ref_model, "KL_"), logps(model, "KL_")
    loss, metrics = kto_loss(
        logps(model, ""),
        ref,
        policy_kl,
        ref_kl,
        batch["label"].bool(),
        beta=0.3,
        desirable_weight=0.8,
    )
    loss.backward()
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5)
    for ours, theirs in zip((p.grad for p in model.parameters()), trl_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    logged = trainer._metrics["train"]
    assert metrics["kl"].item() == pytest.approx(logged["kl"][-1], abs=1e-5)
    assert metrics["rewards/desirable"].item() == pytest.approx(
        logged["rewards/chosen"][-1], abs=1e-5
    )
    assert metrics["rewards/undesirable"].item() == pytest.approx(
        logged["rewards/rejected"][-1], abs=1e-5
    )


@pytest.mark.parametrize("n_desirable, n_undesirable", [(10, 90), (90, 10), (30, 70)])
def test_trl_accepts_balanced_kto_weights_and_warns_about_the_defaults(
    n_desirable, n_undesirable, tiny, tmp_path, caplog
):
    pytest.importorskip("trl")
    rows = [
        {"prompt": f"Q{i}?", "completion": " Yes.", "label": i < n_desirable}
        for i in range(n_desirable + n_undesirable)
    ]
    lam_d, lam_u = balanced_kto_weights(n_desirable, n_undesirable)
    for weights, should_warn in (((lam_d, lam_u), False), ((1.0, 1.0), True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            _trl_trainer(
                "kto",
                tiny,
                tmp_path,
                rows,
                desirable_weight=weights[0],
                undesirable_weight=weights[1],
            )
        warned = any("desirable_weight in" in r.getMessage() for r in caplog.records)
        assert warned == should_warn, weights
