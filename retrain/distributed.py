"""A training round data-parallel across several processes, through accelerate.

:func:`train_data_parallel` writes the round's job to a file and runs

    accelerate launch --num_processes N --multi_gpu -m retrain.distributed --job FILE

Each process (``main`` here) joins the process group accelerate sets up (gloo on CPUs,
NCCL on GPUs, one GPU per process), trains its share of every batch
(:class:`retrain.train.World`: the gradients are summed across processes, so every
process holds the same weights), and only the main process saves the adapter and the
round's figures. The result matches a one-process round on the same rows and seed up to
the order of float additions (``tests/test_distributed.py`` states the tolerance).

Chosen by ``TrainConfig.processes`` (``FEEDBACK_CHAT_TRAIN_PROCESSES``); 1, the default,
trains in the worker's own process.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .train import RoundResult, TrainConfig, TrainingError, World, train_round


def train_data_parallel(*, processes: int, base_model: str, parent_adapter: Path | None,
                        kto_rows: list[dict], dpo_rows: list[dict], out_dir: Path,
                        config: TrainConfig, probe_messages: list[list[dict]] | None = None,
                        asked_prompts: list[list[dict]] | None = None,
                        timeout: float | None = None) -> RoundResult:
    """:func:`retrain.train.train_round` on ``processes`` processes; same arguments and
    result. ``TrainingError`` with the processes' last output when the launch fails."""
    import torch

    if processes < 2:
        raise ValueError("a data-parallel round needs at least 2 processes")
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="round-") as tmp:
        job = Path(tmp) / "job.json"
        result_file = Path(tmp) / "result.json"
        job.write_text(json.dumps({
            "base_model": base_model,
            "parent_adapter": str(parent_adapter) if parent_adapter else None,
            "kto_rows": kto_rows, "dpo_rows": dpo_rows, "out_dir": str(out_dir),
            "config": {**asdict(config), "processes": 1, "device": device}, "probe_messages": probe_messages,
            "asked_prompts": asked_prompts,
            "result": str(result_file),
        }))
        # accelerate's --cpu launcher starts one process (several need MPI); its multi-GPU
        # launcher (torch.distributed.run) starts N, and on CPUs each joins a gloo group
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes",
               str(processes), "--multi_gpu", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               "-m", "retrain.distributed", "--job", str(job)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false",
                                   **({"ACCELERATE_USE_CPU": "true"} if device == "cpu"
                                      else {})})
        if done.returncode != 0 or not result_file.is_file():
            tail = (done.stdout + done.stderr)[-3000:]
            raise TrainingError(f"the data-parallel round on {processes} processes failed "
                                f"(exit {done.returncode}):\n{tail}")
        saved = json.loads(result_file.read_text())
    return RoundResult(metrics=saved["metrics"], history=saved["history"])


def main(argv: list[str] | None = None) -> int:
    """One process of a data-parallel round (started by ``accelerate launch``)."""
    from accelerate import PartialState

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", type=Path, required=True)
    args = parser.parse_args(argv)
    job = json.loads(args.job.read_text())
    config = TrainConfig(**{k: tuple(v) if k == "target_modules" and isinstance(v, list)
                            else v for k, v in job["config"].items()})
    state = PartialState(cpu=config.device == "cpu")
    world = World(rank=state.process_index, size=state.num_processes)
    device = "cpu" if state.device.type == "cpu" else str(state.device)
    config = TrainConfig(**{**asdict(config), "device": device})
    result = train_round(
        base_model=job["base_model"],
        parent_adapter=Path(job["parent_adapter"]) if job["parent_adapter"] else None,
        kto_rows=job["kto_rows"], dpo_rows=job["dpo_rows"], out_dir=Path(job["out_dir"]),
        config=config, probe_messages=job["probe_messages"], world=world,
        asked_prompts=job.get("asked_prompts"))
    if world.main:
        metrics: dict[str, Any] = dict(result.metrics, processes=float(world.size))
        Path(job["result"]).write_text(json.dumps({"metrics": metrics,
                                                   "history": result.history}))
    state.wait_for_everyone()
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    raise SystemExit(main())
