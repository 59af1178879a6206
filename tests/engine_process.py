"""Run ``feedback-chat engine`` as a real subprocess on a loopback port, for tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from live_server import free_port


class EngineProcess:
    def __init__(self, model: Path | str, data_dir: Path, port: int | None = None,
                 **settings: object) -> None:
        self.model, self.data_dir = str(model), data_dir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = settings
        self.proc: subprocess.Popen | None = None
        self.log = data_dir / f"engine-{self.port}.log"

    def start(self, timeout: float = 180.0) -> EngineProcess:
        args = [sys.executable, "-m", "chat_app", "engine", "--model", self.model,
                "--device", "cpu", "--host", "127.0.0.1", "--port", str(self.port),
                "--data-dir", str(self.data_dir)]
        for name, value in self.settings.items():
            args += ["--" + name.replace("_", "-"), str(value)]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the engine exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the engine did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


@contextmanager
def engine_process(model: Path | str, data_dir: Path, **settings: object
                   ) -> Iterator[EngineProcess]:
    proc = EngineProcess(model, data_dir, **settings).start()
    try:
        yield proc
    finally:
        proc.stop()
