"""The `feedback-chat` command and its settings, run as a real subprocess."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chat_app.settings import Settings, SettingsError, load_settings, retrain_settings
from feedback_store import FeedbackStore


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    return subprocess.run(
        [sys.executable, "-m", "chat_app", *args], capture_output=True, text=True,
        env={**os.environ, **(env or {})}, cwd=cwd, timeout=120,
    )


def test_settings_report_every_problem_at_once():
    with pytest.raises(SettingsError) as err:
        load_settings(environ={
            "FEEDBACK_CHAT_PORT": "seventy", "FEEDBACK_CHAT_TOP_P": "2",
            "FEEDBACK_CHAT_PRODUCTION": "true", "FEEDBACK_CHAT_USERS": "alice",
        })
    text = str(err.value)
    for fragment in ("FEEDBACK_CHAT_PORT", "top_p", "OPERATOR_PASSWORD", "API_KEYS", "users"):
        assert fragment in text
    assert len(err.value.problems) == 5


def test_feedback_reasons_come_from_the_environment_and_bad_ones_are_refused():
    s = load_settings(environ={"FEEDBACK_CHAT_DOWN_REASONS": " Wrong , Rude,,",
                               "FEEDBACK_CHAT_UP_REASONS": ""})
    assert (Settings.reasons(s.down_reasons), Settings.reasons(s.up_reasons)) == (
        ("Wrong", "Rude"), ())
    with pytest.raises(SettingsError, match="distinct and not Like/Dislike"):
        load_settings(environ={"FEEDBACK_CHAT_DOWN_REASONS": "Rude,Like",
                               "FEEDBACK_CHAT_UP_REASONS": "Rude"})


def test_flags_override_environment_and_defaults_are_embedded(tmp_path):
    s = load_settings({"port": 9000}, environ={"FEEDBACK_CHAT_PORT": "8000",
                                               "FEEDBACK_CHAT_DATA_DIR": str(tmp_path)})
    assert s.port == 9000 and s.data_dir == tmp_path
    assert s.resolved_database_url == f"sqlite:///{tmp_path.resolve() / 'feedback.db'}"
    assert Settings().model == "" and Settings().resolved_adapters_dir == Path("data/adapters")


def test_production_mode_needs_a_real_operator_password():
    env = {"FEEDBACK_CHAT_PRODUCTION": "1", "FEEDBACK_CHAT_OPERATOR_USER": "ops",
           "FEEDBACK_CHAT_OPERATOR_PASSWORD": "short", "FEEDBACK_CHAT_API_KEYS": "k1"}
    with pytest.raises(SettingsError, match="12 characters"):
        load_settings(environ=env)
    ok = load_settings(environ={**env, "FEEDBACK_CHAT_OPERATOR_PASSWORD": "a-long-password!"})
    assert ok.public_dict()["operator_password"] == "***"


def test_retrain_settings_come_from_the_settings_module(tmp_path):
    from retrain import RetrainSettings

    s = load_settings({"data_dir": str(tmp_path), "model": "/models/chat", "device": "cpu",
                       "quantize_4bit": "off"}, environ={})
    mapping = retrain_settings(s)
    assert mapping == {
        "database_url": s.resolved_database_url,
        "adapters_dir": str(s.resolved_adapters_dir),
        "model": "/models/chat",
        "device": "cpu",
        "quantize_4bit": False,
        "canary": {"share": 0.2, "min_ratings": 40, "margin": 0.0, "error_rate": 0.05,
                   "time_limit_hours": 24.0, "max_ratings": 2000},
    }
    assert RetrainSettings.coerce(mapping).model == "/models/chat"
    assert RetrainSettings.coerce(mapping).canary_config().share == 0.2
    auto = retrain_settings(load_settings({"data_dir": str(tmp_path), "model": "m"}, environ={}))
    assert auto["device"] is None and auto["quantize_4bit"] is None


def test_only_the_entry_point_imports_the_cli_module():
    # the server and the console take their settings helpers from chat_app.settings;
    # chat_app.cli sits on top of them, not beside them
    root = Path(__file__).resolve().parent.parent / "chat_app"
    importers = []
    for path in sorted(root.rglob("*.py")):
        package = path.relative_to(root.parent).with_suffix("").parts[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = list(package[: len(package) - node.level + 1]) if node.level else []
                target = ".".join([*base, *(node.module or "").split(".")]).strip(".")
                names = [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any(n == "chat_app.cli" or n.startswith("chat_app.cli.") for n in names):
                importers.append(str(path.relative_to(root.parent)))
    assert importers == ["chat_app/__main__.py"]


def test_bad_settings_exit_2_with_all_problems(tmp_path):
    r = cli("db", "upgrade", "--data-dir", str(tmp_path),
            env={"FEEDBACK_CHAT_PORT": "0", "FEEDBACK_CHAT_MAX_CONCURRENT": "0"})
    assert r.returncode == 2
    assert "port must be" in r.stderr and "max_concurrent" in r.stderr


def test_db_upgrade_export_and_adapters_commands(tmp_path):
    r = cli("db", "upgrade", "--data-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    from feedback_store.db import head_revision

    assert f"revision {head_revision()}" in r.stdout

    store = FeedbackStore.open(f"sqlite:///{tmp_path.resolve() / 'feedback.db'}")
    conv = store.create_conversation()
    q = store.add_user_message(conversation_id=conv.id, content="Where is Paris?")
    a = store.add_reply(parent_id=q.id, content="In France.", adapter_version="base")
    store.rate(reply_id=a.id, rating="up")
    store.edit_reply(reply_id=a.id, content="Paris is in France, on the Seine.")

    out = tmp_path / "kto.jsonl"
    r = cli("export", "--kind", "kto", "--out", str(out), "--data-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"prompt": [{"role": "user", "content": "Where is Paris?"}],
                     "completion": [{"role": "assistant", "content": "In France."}],
                     "label": True, "tags": []}]
    out = tmp_path / "dpo.jsonl"
    r = cli("export", "--kind", "dpo", "--out", str(out), "--data-dir", str(tmp_path),
            "--split", "all")
    assert r.returncode == 0, r.stderr
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["chosen"][0]["content"] == "Paris is in France, on the Seine."
    assert row["rejected"][0]["content"] == "In France."

    r = cli("adapters", "list", "--data-dir", str(tmp_path))
    assert r.returncode == 0 and "base model is served" in r.stdout
    r = cli("adapters", "promote", "v0042", "--data-dir", str(tmp_path))
    assert r.returncode == 1 and "no adapter version 'v0042'" in r.stderr
    store.registry.register_version(version="v0001", path=str(tmp_path / "a"))
    r = cli("adapters", "promote", "v0001", "--data-dir", str(tmp_path))
    assert r.returncode == 0 and store.registry.active_version().version == "v0001"
    r = cli("adapters", "rollback", "--data-dir", str(tmp_path))
    assert r.returncode == 0 and "base model" in r.stdout
    assert store.registry.active_version() is None


def test_unreachable_database_is_a_clear_error(tmp_path):
    r = cli("db", "upgrade", "--database-url", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    assert r.returncode == 1
    assert "unavailable" in r.stderr and "Traceback" not in r.stderr


def test_demo_model_build_command_builds_a_loadable_model(tmp_path):
    r = cli("demo-model", "build", "--steps", "10", "--data-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    folder = tmp_path / "demo-model"
    assert "demo model ready" in r.stdout and (folder / "demo-model.json").is_file()
    manifest = json.loads((folder / "demo-model.json").read_text())
    assert manifest["steps"] == 10
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(folder).chat_template
