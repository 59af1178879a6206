"""The offline demo chat model: its corpus, its build, and the cached copy in the data folder.

Builds here are real (tokenizer trained, model trained for a few steps, HF folder
written and loaded back); only the step count is small. The one full default build
is marked ``slow``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import textwrap
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chat_app.demo_model.build import (
    DEMO_MODEL_DIRNAME,
    MANIFEST_NAME,
    RECIPE,
    RECIPE_VERSION,
    build_demo_model,
    ensure_demo_model,
    read_manifest,
)
from chat_app.demo_model.corpus import (
    STYLES,
    VARIANTS,
    answer_variants,
    build_corpus,
    build_examples,
    corpus_sha256,
)
from chat_app.demo_model.corpus_data import TOPICS
from chat_app.demo_model.spread import distinct_replies, reply_style, sample_spread
from chat_app.demo_model.tokenizer import IM_END, train_chat_tokenizer
from chat_app.demo_model.training import IGNORE_INDEX, encode_conversation

ROOT = Path(__file__).resolve().parents[1]
TINY_STEPS = 3  # enough to exercise every file the build writes; quality is not checked


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> object:
    """The CPU is shared: train and generate on one thread here, then restore the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ask(model_dir: Path, messages: list[dict[str, str]], **generate: object) -> tuple[str, bool]:
    """Generate a reply through the chat template; return (text, stopped at <|im_end|>).

    "Stopped" means the last new token is ``<|im_end|>`` and it appears nowhere else.
    """
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    out = model.generate(**enc, **generate)
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    stopped = bool(new) and new[-1] == im_end and new.count(im_end) == 1
    return tokenizer.decode(new, skip_special_tokens=True).strip(), stopped


def _building_lines(caplog: pytest.LogCaptureFixture) -> int:
    return sum("building the demo model" in r.getMessage() for r in caplog.records)


# --- corpus ---------------------------------------------------------------------------


def test_corpus_is_the_same_for_a_seed_and_changes_with_it() -> None:
    first, again, other = build_corpus(0), build_corpus(0), build_corpus(1)
    assert first == again
    assert corpus_sha256(first) == corpus_sha256(again)
    assert corpus_sha256(first) != corpus_sha256(other)


def test_corpus_conversations_are_well_formed_chats() -> None:
    conversations = build_corpus(0)
    assert len(conversations) >= 500
    for conv in conversations:
        roles = [m["role"] for m in conv]
        body = roles[1:] if roles[0] == "system" else roles
        assert body[0::2] == ["user"] * len(body[0::2]), conv
        assert body[1::2] == ["assistant"] * len(body[1::2]), conv
        assert body[-1] == "assistant" and all(m["content"].strip() for m in conv), conv
    assert sum(sum(m["role"] == "user" for m in c) >= 2 for c in conversations) > 100
    assert sum(c[0]["role"] == "system" for c in conversations) > 50


def test_corpus_covers_several_topics() -> None:
    per_topic: dict[str, int] = defaultdict(int)
    for ex in build_examples(0):
        per_topic[ex.topic] += 1
    assert {"cooking", "weather", "animals", "space", "geography", "programming", "health"} <= set(
        per_topic
    )
    assert "about_the_service" in per_topic and len(per_topic) >= 9
    assert min(per_topic[t] for t in per_topic if t != "out_of_scope") >= 40
    # the words of each topic really are in the text, not only in the labels
    text = " ".join(m["content"] for c in build_corpus(0) for m in c).lower()
    for word in ("boil", "rain", "whale", "planet", "capital", "python", "sleep", "thumbs"):
        assert word in text


SPREAD_PROMPTS = {  # prompt: words of which an on-topic reply has at least one
    "Hello!": {"hello", "hi", "meet", "talk"},
    "How are you?": {"well", "fine", "doing"},
    "How do I cook rice?": {"rice", "water", "boil"},
    "What makes the sky blue?": {"sky", "sunlight", "scatter"},
    "Make me laugh.": {"scarecrow", "joke", "funny", "no."},
}


def test_one_question_gets_balanced_answers_in_several_variants() -> None:
    examples = build_examples(0)
    assert {ex.style for ex in examples} == set(STYLES)
    replies: dict[str, Counter[str]] = defaultdict(Counter)
    for ex in examples:
        if len(ex.messages) == 2:  # single turn, no system prompt
            replies[ex.messages[0]["content"]][ex.messages[1]["content"]] += 1
    hand_written = [q for facts in TOPICS.values() for f in facts for q in f.questions]
    for question in hand_written:
        counts = replies[question]
        assert len(counts) >= 4, (question, counts)
        assert max(counts.values()) <= 0.4 * sum(counts.values()), (question, counts)
    answers = [a for counts in replies.values() for a in counts.elements()]
    off_topic = sum(ex.style == "off_topic" for ex in examples)
    assert 0 < off_topic <= 0.1 * len(answers)
    # the variants differ along the axes raters judge: length, tone, layout
    assert sum(a.startswith("- ") for a in answers) > 0.05 * len(answers)
    assert sum(a.startswith(("Good question!", "Sure!")) for a in answers) > 0.03 * len(answers)
    assert sum("!" not in a for a in answers) > 0.3 * len(answers)
    assert sum(len(a.split()) <= 6 for a in answers) > 0.1 * len(answers)
    assert sum(len(a.split()) >= 30 for a in answers) > 0.2 * len(answers)


def test_answer_variants_are_derived_from_the_facts_answers() -> None:
    rng = random.Random(0)
    for topic, facts in TOPICS.items():
        for fact in facts:
            variants = answer_variants(rng, topic, fact)
            assert variants["full"] == fact.friendly and variants["curt"] == fact.curt
            assert set(variants) <= set(VARIANTS) and len(set(variants.values())) == len(variants)
            assert len(fact.friendly.split()) >= 3 * len(fact.curt.split()), fact
            if "first" in variants:
                assert fact.friendly.startswith(variants["first"])
            if "long" in variants:
                assert variants["long"].startswith(fact.friendly)
                assert variants["long"].endswith(fact.curt)
            if "plain" in variants:
                assert "!" in fact.friendly and variants["plain"].count("!") < fact.friendly.count(
                    "!"
                )


# --- encoding --------------------------------------------------------------------------


def test_training_tokens_equal_the_chat_template_and_only_assistant_turns_are_learned() -> None:
    conversations = build_corpus(0)[:40]
    tokenizer = train_chat_tokenizer(
        [m["content"] for c in conversations for m in c], vocab_size=600
    )
    for conv in conversations:
        encoded = encode_conversation(tokenizer, conv, max_length=10_000)
        assert encoded.input_ids == tokenizer.apply_chat_template(conv)["input_ids"]
        learned = [t for t in encoded.labels if t != IGNORE_INDEX]
        expected = "".join(m["content"] + IM_END for m in conv if m["role"] == "assistant")
        assert tokenizer.decode(learned) == expected
    short = encode_conversation(tokenizer, conversations[0], max_length=7)
    assert len(short.input_ids) == len(short.labels) == 7


# --- a real, small build --------------------------------------------------------------


@pytest.fixture(scope="module")
def small_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("demo") / "model", steps=40, progress=False)


def test_small_build_is_a_standard_folder_that_chats_and_stops_at_im_end(small_build: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(small_build)
    model = AutoModelForCausalLM.from_pretrained(small_build)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    assert tokenizer.eos_token == IM_END and tokenizer.pad_token == "<|pad|>"
    assert model.generation_config.eos_token_id == im_end
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tokenizer)
    manifest = read_manifest(small_build)
    assert manifest is not None and manifest["steps"] == 40
    assert manifest["recipe_version"] == RECIPE_VERSION
    assert manifest["corpus_sha256"] == corpus_sha256(build_corpus(0))
    assert 0 < manifest["final_loss"] < 7.0  # below the ~7.3 of uniform guessing over 1536

    # A 40-step model cannot write a reply yet; it must still run through the template.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    reply, _ = _ask(small_build, messages, max_new_tokens=12, do_sample=False)
    assert "<|" not in reply
    # Once the model emits <|im_end|> (made certain here by a logit bias), generation ends
    # on it, with the saved generation config alone, and the marker is not in the text.
    reply, stopped = _ask(
        small_build, messages, max_new_tokens=12, sequence_bias={(im_end,): 100.0}
    )
    assert stopped and reply == ""


def test_same_seed_gives_identical_weights_and_other_seed_does_not(tmp_path: Path) -> None:
    rng_before = torch.get_rng_state()
    a = build_demo_model(tmp_path / "a", steps=TINY_STEPS, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is left alone
    b = build_demo_model(tmp_path / "b", steps=TINY_STEPS, progress=False)
    c = build_demo_model(tmp_path / "c", steps=TINY_STEPS, seed=1, progress=False)
    sa, sb, sc = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_bad_arguments_raise_clear_errors(tmp_path: Path) -> None:
    for steps in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="steps must be a positive integer"):
            build_demo_model(tmp_path / "x", steps=steps)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="steps must be a positive integer"):
            ensure_demo_model(tmp_path, steps=steps)  # type: ignore[arg-type]
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        build_demo_model(full, steps=1, progress=False)
    assert (full / "keep.txt").read_text() == "mine"
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with pytest.raises(NotADirectoryError):
        ensure_demo_model(a_file, steps=1, progress=False)


# --- the cached copy in the data folder -----------------------------------------------


def test_ensure_builds_once_then_reuses_and_rebuild_builds_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="chat_app.demo_model.build")
    path = ensure_demo_model(tmp_path, steps=TINY_STEPS, progress=False)
    assert path == tmp_path / DEMO_MODEL_DIRNAME
    first = (path / MANIFEST_NAME).stat().st_mtime_ns
    assert _building_lines(caplog) == 1
    assert path.stat().st_mode & 0o777 == 0o755  # not the private mode of a temp folder

    assert ensure_demo_model(tmp_path, steps=TINY_STEPS, progress=False) == path
    assert (path / MANIFEST_NAME).stat().st_mtime_ns == first
    assert _building_lines(caplog) == 1

    assert ensure_demo_model(tmp_path, steps=TINY_STEPS, rebuild=True, progress=False) == path
    assert (path / MANIFEST_NAME).stat().st_mtime_ns != first
    assert _building_lines(caplog) == 2
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [DEMO_MODEL_DIRNAME]


def test_a_changed_recipe_or_step_count_triggers_a_rebuild(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="chat_app.demo_model.build")
    path = ensure_demo_model(tmp_path, steps=TINY_STEPS, progress=False)
    manifest_file = path / MANIFEST_NAME
    old = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps({**old, "recipe_version": RECIPE_VERSION - 1}))

    ensure_demo_model(tmp_path, steps=TINY_STEPS, progress=False)
    assert _building_lines(caplog) == 2
    assert read_manifest(path)["recipe_version"] == RECIPE_VERSION  # type: ignore[index]

    ensure_demo_model(tmp_path, steps=TINY_STEPS + 1, progress=False)
    assert _building_lines(caplog) == 3
    assert read_manifest(path)["steps"] == TINY_STEPS + 1  # type: ignore[index]


def test_unfinished_builds_are_never_used_and_are_cleaned_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="chat_app.demo_model.build")
    crashed_tmp = tmp_path / ".demo-model.tmp-crashed"
    crashed_tmp.mkdir()
    (crashed_tmp / "config.json").write_text("{ half written")
    half_built = tmp_path / DEMO_MODEL_DIRNAME  # a folder with files but no manifest
    half_built.mkdir()
    (half_built / "config.json").write_text("{ half written")

    path = ensure_demo_model(tmp_path, steps=TINY_STEPS, progress=False)
    assert _building_lines(caplog) == 1
    assert not crashed_tmp.exists()
    assert read_manifest(path) is not None
    assert AutoModelForCausalLM.from_pretrained(path).config.model_type == "llama"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [DEMO_MODEL_DIRNAME]


def test_two_processes_at_once_build_once_and_get_the_same_model(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import json, logging, sys, torch
        torch.set_num_threads(1)
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        from chat_app.demo_model.build import ensure_demo_model, read_manifest
        path = ensure_demo_model(sys.argv[1], steps={TINY_STEPS}, progress=False)
        print(json.dumps({{"path": str(path), "built_at": read_manifest(path)["built_at"]}}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    outputs = [json.loads(out) for out, _ in results]
    assert outputs[0] == outputs[1]
    assert sum(err.count("building the demo model") for _, err in results) == 1
    assert Path(outputs[0]["path"]) == tmp_path / DEMO_MODEL_DIRNAME


# --- the full default build -------------------------------------------------------------

ON_TOPIC = [
    ("How do I cook pasta?", {"water", "boil"}),
    ("how should I cook spaghetti", {"water", "boil"}),
    ("What makes the sky blue?", {"sunlight", "scatter"}),
    ("What is the capital of France?", {"paris"}),
    ("Why do cats purr?", {"happy", "relaxed"}),
    ("What is the biggest planet?", {"jupiter"}),
    ("How much sleep do I need?", {"hours"}),
    ("What is a loop in programming?", {"repeat"}),
    ("Who are you?", {"demo"}),
]


@pytest.fixture(scope="module")
def full_model(demo_model_dir: Path) -> Path:
    """The full build, shared with the other tests that need it (``conftest.py``)."""
    return demo_model_dir


@pytest.mark.slow
def test_full_build_answers_its_topics_in_on_topic_sentences(full_model: Path) -> None:
    assert read_manifest(full_model)["steps"] == RECIPE.steps  # type: ignore[index]
    misses = []
    for question, words in ON_TOPIC:
        reply, stopped = _ask(full_model, [{"role": "user", "content": question}], do_sample=False)
        lowered = reply.lower()
        if not (stopped and any(w in lowered for w in words)):
            misses.append((question, reply))
    assert not misses, misses


@pytest.mark.slow
def test_full_build_answers_briefly_when_the_system_prompt_asks(full_model: Path) -> None:
    questions = ["What is the capital of France?", "What is a function?", "Tell me about whales."]
    lengths: dict[str, list[int]] = {"brief": [], "helpful": []}
    for question in questions:
        for style, system in (
            ("brief", "Answer as briefly as possible."),
            ("helpful", "You are a helpful assistant."),
        ):
            messages = [
                {"role": "system", "content": system},
                {"role": "user", "content": question},
            ]
            reply, stopped = _ask(full_model, messages, do_sample=False)
            assert stopped, (system, question, reply)
            lengths[style].append(len(reply.split()))
    assert sum(lengths["brief"]) * 3 < sum(lengths["helpful"]), lengths


@pytest.mark.slow
def test_full_build_samples_a_spread_of_on_topic_replies(full_model: Path) -> None:
    """At the serving defaults (temperature 0.7, top_p 0.95) a typical question gets
    several different replies, in more than one style, mostly on topic: preference
    learning needs a spread to reweight.

    Each of three draws of 8 replies must hold at least 3 distinct replies on average
    and 2 for every prompt. Styles and topic are counted over the three draws (24
    replies a prompt): at least 2 styles for every prompt, every prompt on topic in at
    least half of its replies, all of them together in at least 80%. One draw of 8 is
    too few to judge a model by: the build's floating-point sums differ between CPUs,
    and on one machine the same recipe answered "How do I cook rice?" in one style at
    seed 0 (two at seed 2) and "Make me laugh." on topic in 4, 4 and 6 of 8 at seeds
    0-2 (27 of 40 over five seeds), where another machine's build had passed 5 of 8 at
    seed 0."""
    styles: dict[str, set[str]] = {prompt: set() for prompt in SPREAD_PROMPTS}
    on_topic = dict.fromkeys(SPREAD_PROMPTS, 0)
    draws = 3
    for seed in range(draws):
        spread = sample_spread(full_model, list(SPREAD_PROMPTS), n=8, seed=seed)
        counts = {prompt: distinct_replies(replies) for prompt, replies in spread.items()}
        assert sum(counts.values()) >= 3 * len(counts), spread  # at least 3 on average
        for prompt, words in SPREAD_PROMPTS.items():
            replies = spread[prompt]
            assert len(replies) == 8
            assert counts[prompt] >= 2, (prompt, replies)
            assert all("<|" not in r for r in replies), (prompt, replies)
            styles[prompt] |= {reply_style(r) for r in replies}
            on_topic[prompt] += sum(any(w in r.lower() for w in words) for r in replies)
    assert all(len(found) >= 2 for found in styles.values()), styles
    assert all(n >= 4 * draws for n in on_topic.values()), on_topic
    assert sum(on_topic.values()) >= 0.8 * 8 * draws * len(SPREAD_PROMPTS), on_topic
