"""JSONL export: files that Hugging Face ``datasets`` loads, with the columns TRL's KTO
(prompt, completion, label; plus the reasons users picked, as tags) and DPO (prompt,
chosen, rejected) trainers take, holding the same rows as the store builds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from feedback_store import FeedbackStore, InvalidInput, RowFilter, build_dpo_rows, build_kto_rows
from feedback_store.export import export

# Text that breaks naive writers: quotes, backslashes, newlines, Unicode line breaks
# (which str.splitlines() splits on), emoji and CJK.
TRICKY = 'He said "hi"\\n\n\tthen\u2028left\u2029 \x85🙂 你好 </s> <|im_end|>'


def load_jsonl(path: Path, tmp_path: Path) -> Any:
    import datasets

    return datasets.load_dataset("json", data_files=str(path), split="train",
                                 cache_dir=str(tmp_path / "hf-cache"))


def fill(store: FeedbackStore) -> None:
    """Thumbs, an edit and a choice, over two conversations and two turns."""
    conv = store.create_conversation(system_prompt="Be kind. " + TRICKY)
    u1 = store.add_user_message(conversation_id=conv.id, content="First " + TRICKY)
    r1 = store.add_reply(parent_id=u1.id, content="Reply " + TRICKY, adapter_version="v0001")
    r1b = store.add_reply(source_reply_id=r1.id, content="Regenerated")
    u2 = store.add_user_message(conversation_id=conv.id, content="Second", parent_id=r1.id)
    r2 = store.add_reply(parent_id=u2.id, content="Second reply")
    store.rate(reply_id=r1.id, rating="up")
    store.rate(reply_id=r2.id, rating="down", user_id="bob", tags=["wrong"])
    store.choose(chosen_id=r1b.id, rejected_id=r1.id)
    store.edit_reply(reply_id=r2.id, content="Edited " + TRICKY)
    other = store.create_conversation()
    u3 = store.add_user_message(conversation_id=other.id, content="Plain question")
    r3 = store.add_reply(parent_id=u3.id, content="Plain answer")
    store.rate(reply_id=r3.id, rating="down")


@pytest.mark.parametrize(("kind", "columns", "build"), [
    ("kto", ["prompt", "completion", "label", "tags"],
     lambda store: build_kto_rows(store, with_tags=True)),
    ("dpo", ["prompt", "chosen", "rejected"], build_dpo_rows),
])
def test_export_loads_with_datasets_and_equals_the_store_rows(
    store: FeedbackStore, tmp_path: Path, kind: str, columns: list[str], build: Any
) -> None:
    fill(store)
    out = tmp_path / "out" / f"{kind}.jsonl"
    n = export(store, kind=kind, out=out)
    expected = build(store)
    assert n == len(expected) > 1
    assert len(out.read_text(encoding="utf-8").splitlines()) == n  # one row a line
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left

    ds = load_jsonl(out, tmp_path)
    assert ds.column_names == columns
    assert ds.to_list() == expected
    if kind == "kto":
        assert ds.features["label"].dtype == "bool"
        # the reasons picked with a vote go out with its row (TRL ignores the column)
        assert [r["tags"] for r in expected if r["completion"][0]["content"] == "Second reply"
                ] == [["wrong"]]
        assert all(r["tags"] == [] for r in expected
                   if r["completion"][0]["content"] != "Second reply")
    assert any(TRICKY in m["content"] for row in expected for m in row["prompt"])


def test_export_applies_the_row_filter_and_replaces_the_file(
    store: FeedbackStore, tmp_path: Path
) -> None:
    fill(store)
    out = tmp_path / "kto.jsonl"
    assert export(store, kind="kto", out=out) == 3
    last = store.last_event_id()
    only_v1 = RowFilter(adapter_version="v0001")
    assert export(store, kind="kto", out=out, flt=only_v1) == 1
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == build_kto_rows(store, only_v1, with_tags=True)[0]
    assert export(store, kind="kto", out=out, flt=RowFilter(after_event_id=last)) == 0
    assert out.read_text() == ""


def test_unknown_export_kind_is_refused_and_writes_no_file(sqlite_url: str,
                                                           tmp_path: Path) -> None:
    store = FeedbackStore.open(sqlite_url)
    try:
        with pytest.raises(InvalidInput, match="kto"):
            export(store, kind="sft", out=tmp_path / "x.jsonl")
        assert not (tmp_path / "x.jsonl").exists()
    finally:
        store.close()


@pytest.mark.slow
def test_exported_rows_render_with_trl_chat_templating(sqlite_url: str, tmp_path: Path) -> None:
    """TRL's own preprocessing (the step its trainers run) takes the rows as they are."""
    from tiny_models import SAMPLE_TEXT
    from trl.data_utils import apply_chat_template, is_conversational

    from chat_app.demo_model.tokenizer import train_chat_tokenizer

    store = FeedbackStore.open(sqlite_url)
    try:
        fill(store)
        tokenizer = train_chat_tokenizer(SAMPLE_TEXT * 2, vocab_size=320)
        for kind, answer_keys in (("kto", ("completion",)), ("dpo", ("chosen", "rejected"))):
            out = tmp_path / f"{kind}.jsonl"
            export(store, kind=kind, out=out)
            for row in load_jsonl(out, tmp_path).to_list():
                assert is_conversational(row)
                text = apply_chat_template(row, tokenizer)
                assert set(text) - {"label"} == {"prompt", *answer_keys}
                for message in row["prompt"]:
                    assert message["content"] in text["prompt"]
                for key in answer_keys:
                    assert row[key][0]["content"] in text[key]
                    assert not text[key].startswith(text["prompt"])  # the answer alone
    finally:
        store.close()
