"""HTTP API under load, with an adapter swap in the middle: throughput, latency, failures and
whether every reply is tagged with the version that wrote it.

The real served app (``tests/live_server.py``: FastAPI + Gradio + engine + SQLite store +
adapter watcher, on a free loopback port) over a model (default: a random-weight Llama of
4 layers of width 256 whose replies always run to ``--max-tokens``). A client in its own
process (``httpx.AsyncClient``, ``--concurrency`` requests in flight) sends ``--requests``
streamed ``POST /v1/chat/completions`` (greedy, ``--max-tokens`` tokens), stopping early at
``--max-seconds``. When ``--swap-at`` of them have finished, a LoRA adapter is registered
and activated as v0001 in the registry; the server's watcher swaps it in while the load
goes on.

Figures:

* requests/s = successful requests / wall time from the first request to the last reply;
* TTFT = from sending the request to the first chunk carrying text; latency = from sending
  it to ``data: [DONE]``; p50 and p99 (nearest rank) over successful requests;
* failures = requests without status 200 and a final ``[DONE]`` (must be 0);
* version tags: for every reply, the ``adapter_version`` of its first streamed chunk must
  equal the one stored with the reply id (``store.get_message(id).adapter_version``), and
  every request sent after the swap completed (``SwapEvent.at``) must be on v0001. Replies
  are counted by version. Any mismatch makes the exit status 1, like any failure.

With ``--engine remote`` the same front-end generates on a ``feedback-chat engine``
subprocess on the same machine (``FEEDBACK_CHAT_ENGINE_URL``, ``chat_app.engine.remote``);
with ``--engine both`` it runs in-process first, then remote, and prints the remote/in-process
ratios of requests/s and TTFT measured in the same run.

    python benchmarks/bench_api_load.py [--model PATH] [--requests 320] [--concurrency 16]
                                        [--max-tokens 24] [--engine in-process|remote|both]
                                        [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_common_args,
    build_random_llama,
    check_common_args,
    machine_note,
    parameter_count,
    percentile,
    print_table,
    ratio,
    save_random_adapter,
    write_json,
)

NEW_VERSION = "v0001"


# ------------------------------------------------------------------------------ the client


async def one_request(client: Any, url: str, n: int, max_tokens: int) -> dict[str, Any]:
    """Send one streamed chat completion and record what the client saw, with wall times."""
    body = {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": f"Request {n}: how are replies rated?"}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True}
    rec: dict[str, Any] = {"n": n, "start": time.time(), "ok": False}
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            rec["status"] = response.status_code
            if response.status_code != 200:
                rec["error"] = (await response.aread()).decode(errors="replace")[:200]
                return rec
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    rec["ok"] = "id" in rec
                    break
                chunk = json.loads(line[6:])
                if "id" not in rec:
                    rec["id"], rec["version"] = chunk["id"], chunk.get("adapter_version")
                delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
                if delta.get("content") and "first_text" not in rec:
                    rec["first_text"] = time.time()
    except Exception as exc:  # noqa: BLE001 - a failed request is what this counts
        rec["error"] = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        rec["end"] = time.time()
    return rec


async def run_client(url: str, requests: int, concurrency: int, max_tokens: int,
                     max_seconds: float) -> list[dict[str, Any]]:
    """``concurrency`` loops send requests until ``requests`` are sent or time is up; each
    finished request is announced on stdout (``done K``) for the driver."""
    import httpx

    results: list[dict[str, Any]] = []
    sent = 0
    deadline = time.time() + max_seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def loop() -> None:
            nonlocal sent
            while sent < requests and time.time() < deadline:
                sent += 1
                results.append(await one_request(client, url, sent, max_tokens))
                print(f"done {len(results)}", flush=True)

        await asyncio.gather(*(loop() for _ in range(concurrency)))
    return results


# ------------------------------------------------------------------------------ the driver


def drive(url: str, args: argparse.Namespace, registry: Any, adapter: Path,
          tmp: Path) -> tuple[list[dict[str, Any]], float | None]:
    """Run the client process; activate the adapter once ``--swap-at`` of the requests are
    done. Returns the client's records and the wall time of the registry write."""
    out = tmp / "client.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--client", url, "--client-out",
           str(out), "--requests", str(args.requests), "--concurrency", str(args.concurrency),
           "--max-tokens", str(args.max_tokens), "--max-seconds", str(args.max_seconds)]
    swap_after = max(1, round(args.requests * args.swap_at))
    t_write = None
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                          env=dict(os.environ, TOKENIZERS_PARALLELISM="false")) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            done = int(line.split()[1]) if line.startswith("done ") else 0
            if t_write is None and done >= swap_after:
                registry.register_version(version=NEW_VERSION, path=str(adapter))
                registry.activate(NEW_VERSION)
                t_write = time.time()
                print(f"  {done} requests done: {NEW_VERSION} activated", file=sys.stderr,
                      flush=True)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"the client process failed (exit {proc.returncode})")
    return json.loads(out.read_text()), t_write


def check_versions(records: list[dict[str, Any]], store: Any, swap_at: float | None) -> dict:
    """Compare each reply's streamed version with the stored one and with the swap time."""
    ok = [r for r in records if r["ok"]]
    mismatched = [r["id"] for r in ok
                  if store.get_message(int(r["id"])).adapter_version != r["version"]]
    late_old = [r["id"] for r in ok if swap_at is not None and r["start"] > swap_at
                and r["version"] != NEW_VERSION]
    return {"by_version": dict(sorted(Counter(r["version"] for r in ok).items())),
            "stored_differs": len(mismatched), "after_swap_not_new": len(late_old)}


def figures(records: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in records if r["ok"]]
    ttft = [r["first_text"] - r["start"] for r in ok if "first_text" in r]
    latency = [r["end"] - r["start"] for r in ok]
    wall = (max(r["end"] for r in records) - min(r["start"] for r in records)) if records else 0
    errors = [r.get("error") or f"status {r.get('status')}" for r in records if not r["ok"]]
    return {
        "requests": len(records), "ok": len(ok), "failures": len(records) - len(ok),
        "first_failure": errors[0] if errors else None, "wall_s": wall,
        "requests_per_s": len(ok) / wall if wall else float("nan"),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "latency_p50_s": percentile(latency, 50), "latency_p99_s": percentile(latency, 99),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    add_common_args(parser, model_help="model folder or hub id (default: a random Llama)")
    parser.add_argument("--layers", type=int, default=4, help="layers of the random Llama")
    parser.add_argument("--hidden", type=int, default=256, help="width of the random Llama")
    parser.add_argument("--requests", type=int, default=320)
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens per reply")
    parser.add_argument("--max-seconds", type=float, default=240,
                        help="stop sending new requests after this long")
    parser.add_argument("--swap-at", type=float, default=0.5,
                        help="fraction of the requests done when the adapter is activated")
    parser.add_argument("--max-concurrent", type=int, default=None,
                        help="replies the engine advances at once (default: --concurrency)")
    parser.add_argument("--engine", choices=("in-process", "remote", "both"),
                        default="in-process", help="where the front-end generates")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--client-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:  # the load generator, in its own process
        records = asyncio.run(run_client(args.client, args.requests, args.concurrency,
                                         args.max_tokens, args.max_seconds))
        args.client_out.write_text(json.dumps(records))
        return 0
    check_common_args(parser, args)
    problems = [f"--{n.replace('_', '-')} must be >= 1" for n in
                ("requests", "concurrency", "max_tokens", "layers") if getattr(args, n) < 1]
    if not 0 < args.swap_at < 1:
        problems.append("--swap-at must be between 0 and 1")
    if args.max_seconds <= 0:
        problems.append("--max-seconds must be positive")
    if args.device != "cpu":
        problems.append("tests/live_server.py serves on the CPU only, so --device must be cpu")
    if problems:
        parser.error("; ".join(problems))
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import torch

    torch.set_num_threads(args.threads)
    slots = args.max_concurrent or args.concurrency
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp_name:
        tmp = Path(tmp_name)
        model = args.model or str(build_random_llama(
            tmp / "random-llama", hidden_size=args.hidden, num_layers=args.layers,
            never_end=True))
        kinds = ["in-process", "remote"] if args.engine == "both" else [args.engine]
        runs = {kind: run_once(args, model, tmp / kind, slots, kind) for kind in kinds}
        parameters = parameter_count(model)

    reports = []
    for kind, (records, versions, swap, poll, t_write) in runs.items():
        reports.append({
            "benchmark": "bench_api_load", "engine": kind,
            "model": args.model or f"random-llama-{args.layers}x{args.hidden}",
            "parameters": parameters, "device": args.device, "torch_threads": args.threads,
            "concurrency": args.concurrency, "engine_slots": slots,
            "max_tokens": args.max_tokens, **figures(records), "versions": versions,
            "swap": {"ok": bool(swap and swap.ok),
                     "watcher_swap_s": swap.seconds if swap else None,
                     "write_to_serving_s": (swap.at - t_write) if swap and t_write else None,
                     "poll_seconds": poll},
            "note": machine_note(),
        })
        print_report(reports[-1])
    report = reports[0] if len(reports) == 1 else {"benchmark": "bench_api_load",
                                                   "runs": reports, **remote_ratios(*reports)}
    if len(reports) == 2:
        print_table(("remote / in-process", "requests/s", "TTFT p50", "TTFT p99",
                     "latency p50"),
                    [("ratio", report["ratio_requests_per_s"], report["ratio_ttft_p50"],
                      report["ratio_ttft_p99"], report["ratio_latency_p50"])])
    write_json(args.json, report)
    bad = any(r["failures"] or not r["swap"]["ok"] or r["versions"]["stored_differs"]
              or r["versions"]["after_swap_not_new"] for r in reports)
    return 1 if bad else 0


def run_once(args: argparse.Namespace, model: str, tmp: Path, slots: int,
             kind: str) -> tuple[list[dict[str, Any]], dict, Any, float, float | None]:
    """One load (with its swap) through a fresh front-end whose engine is ``kind``."""
    from contextlib import ExitStack

    from engine_process import engine_process
    from live_server import live_server

    print(f"-- {kind} engine", file=sys.stderr, flush=True)
    adapter = save_random_adapter(model, tmp / "staging" / NEW_VERSION, seed=1)
    with ExitStack() as stack:
        remote = {}
        if kind == "remote":
            engine = stack.enter_context(engine_process(
                model, tmp / "engine", max_concurrent=slots,
                max_queued=max(32, args.concurrency)))
            remote = {"engine_url": engine.url}
        srv = stack.enter_context(live_server(model, tmp / "data", max_concurrent=slots,
                                              max_queued=max(32, args.concurrency), **remote))
        services = srv.services
        final = srv.settings.resolved_adapters_dir / NEW_VERSION
        final.parent.mkdir(parents=True, exist_ok=True)
        adapter.rename(final)  # in place before it is registered, as a trainer does
        records, t_write = drive(srv.url, args, services.store.registry, final, tmp)
        events = [e for e in services.watcher.events if e.version == NEW_VERSION]
        swap = events[-1] if events else None
        versions = check_versions(records, services.store,
                                  swap.at if swap and swap.ok else None)
        return records, versions, swap, srv.settings.adapter_poll_seconds, t_write


def remote_ratios(local: dict[str, Any], remote: dict[str, Any]) -> dict[str, float]:
    return {"ratio_requests_per_s": ratio(remote["requests_per_s"], local["requests_per_s"]),
            "ratio_ttft_p50": ratio(remote["ttft_p50_s"], local["ttft_p50_s"]),
            "ratio_ttft_p99": ratio(remote["ttft_p99_s"], local["ttft_p99_s"]),
            "ratio_latency_p50": ratio(remote["latency_p50_s"], local["latency_p50_s"])}


def print_report(r: dict[str, Any]) -> None:
    print(f"\n{r['engine']} engine: model {r['model']} ({r['parameters'] / 1e6:.1f}M params) "
          f"on {r['device']}, "
          f"{r['torch_threads']} torch threads; {r['concurrency']} streamed requests in flight, "
          f"{r['engine_slots']} engine slots, {r['max_tokens']} tokens per reply; "
          f"{NEW_VERSION} activated mid-run")
    print_table(("requests", "ok", "failures", "wall s", "req/s", "TTFT p50 s", "TTFT p99 s",
                 "latency p50 s", "latency p99 s"),
                [(r["requests"], r["ok"], r["failures"], r["wall_s"], r["requests_per_s"],
                  r["ttft_p50_s"], r["ttft_p99_s"], r["latency_p50_s"], r["latency_p99_s"])])
    v, s = r["versions"], r["swap"]
    by_version = ", ".join(f"{k}: {n}" for k, n in v["by_version"].items())
    print_table(("replies by version", "stored tag differs", "sent after swap, not new",
                 "swap ok", "write->serving s", "watcher swap s"),
                [(by_version, v["stored_differs"], v["after_swap_not_new"], s["ok"],
                  s["write_to_serving_s"], s["watcher_swap_s"])])
    print(f"the watcher polls every {s['poll_seconds']} s (live_server's setting); {r['note']}")
    if r["first_failure"]:
        print(f"first failure: {r['first_failure']}")


if __name__ == "__main__":
    sys.exit(main())
