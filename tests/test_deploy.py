"""The deployment files are checked by real tools: hadolint for the Dockerfile, the
Compose Specification's JSON schema for both compose files (check-jsonschema), and the
nginx front naming exactly the chat services of the compose file."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: it comes with the dev dependencies "
                    "(deploy/setup.sh --dev)")
    return path


def test_the_dockerfile_passes_hadolint() -> None:
    done = subprocess.run([tool("hadolint"), "--failure-threshold", "info",
                           str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^USER \d+$", text, re.MULTILINE)  # not root
    assert "HEALTHCHECK" in text and "/healthz" in text


@pytest.mark.parametrize("name", ["compose.yaml", "compose.cpu.yaml"])
def test_the_compose_files_follow_the_compose_specification(name: str) -> None:
    done = subprocess.run([tool("check-jsonschema"), "--builtin-schema",
                           "vendor.compose-spec", str(DEPLOY / name)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    text = (DEPLOY / name).read_text()
    for service in ("postgres:", "engine:", "chat-1:", "chat-2:", "trainer:", "proxy:"):
        assert f"\n  {service}" in text
    assert '["feedback-chat", "trainer"]' in text and '["feedback-chat", "engine"]' in text
    assert "FEEDBACK_CHAT_ENGINE_URL: http://engine:7860" in text  # front-ends hold no model
    assert ("driver: nvidia" in text) == (name == "compose.yaml")


def test_the_proxy_sends_to_both_front_ends() -> None:
    conf = (DEPLOY / "nginx.conf").read_text()
    assert re.findall(r"server (chat-\d):7860;", conf) == ["chat-1", "chat-2"]
    assert "proxy_buffering off" in conf  # streamed replies pass through as they come
