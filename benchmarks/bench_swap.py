"""Hot-swap under load: how long until a newly activated adapter version is served, and how
long the chats streaming meanwhile stall.

Set-up: an ``Engine`` over a model (default: a random-weight Llama of 4 layers of width 512
whose replies always run to ``--max-new-tokens``), two LoRA adapters saved as v0001 and
v0002, a real ``AdapterWatcher`` polling a real SQLite registry, and ``--chats`` threads
streaming greedy replies back to back. Then ``--swaps`` registry writes, each after a quiet
spell of ``--settle`` seconds: activate v0001 (from the base), activate v0002, roll back,
activate v0002, roll back, ... For each swap:

* write->serving = from the return of the registry write (``activate``/``rollback``) to the
  first moment ``engine.active_version`` is the new version (polled every 2 ms); a probe
  request then started must report ``Generation.version`` == the new version. It includes
  the watcher's wait for its next poll (``--poll``, the server's default unless given);
* watcher swap = the watcher's own load + activate time (``SwapEvent.seconds``);
* swap window = from the write until the old version is unloaded (its last in-flight
  reply ended) or, with nothing to unload, until the new version is served;
* max pause in swap = the longest gap between two consecutive streamed pieces of any chat,
  among the gaps overlapping the swap window ("pause at": when it began, after the write);
  the same statistic over a quiet window just before the write (as long as the swap window
  but at least 1 s, and never reaching back into the previous swap's window) gives the
  ratio (1.0: the swap is not felt).

Every reply must end normally, replies asked for after the switch must be tagged with the
new version and replies asked for before the write with the old one; violations are
counted (and make the exit status 1).

    python benchmarks/bench_swap.py [--model PATH] [--device cpu|cuda] [--chats 4]
                                    [--swaps 5] [--poll S] [--json FILE]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_common_args,
    build_random_llama,
    check_common_args,
    machine_note,
    median,
    parameter_count,
    print_table,
    ratio,
    save_random_adapter,
    write_json,
)

POLL_EVERY = 0.002  # seconds between looks at the engine while a swap is under way
MIN_QUIET = 1.0  # seconds: the shortest quiet window the pause of a swap is compared with


@dataclass
class Reply:
    """One streamed reply as a chat saw it: when it was asked for and when pieces came."""

    asked: float  # before engine.stream() was called
    returned: float  # after it returned (the version was chosen in between)
    version: str
    pieces: list[float] = field(default_factory=list)
    finish_reason: str | None = None


class ChatLoad:
    """``n`` threads, each streaming replies to its own chat back to back until stopped."""

    def __init__(self, engine: Any, n: int, params: Any) -> None:
        self.engine, self.params = engine, params
        self.replies: list[Reply] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._chat, args=(i,), daemon=True)
                         for i in range(n)]

    def _chat(self, i: int) -> None:
        turn = 0
        while not self._stop.is_set():
            turn += 1
            messages = [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"Chat {i}, turn {turn}: tell me about the "
                 "adapter versions this service serves and how replies are rated."},
            ]
            try:
                asked = time.perf_counter()
                gen = self.engine.stream(messages, self.params)
                reply = Reply(asked=asked, returned=time.perf_counter(), version=gen.version)
                for _ in gen:
                    reply.pieces.append(time.perf_counter())
                reply.finish_reason = gen.finish_reason
            except Exception as exc:  # noqa: BLE001 - counted and shown, never hidden
                with self._lock:
                    self.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            with self._lock:
                self.replies.append(reply)

    def start(self) -> ChatLoad:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=300)

    def finished(self) -> int:
        with self._lock:
            return len(self.replies)


def max_gap(replies: list[Reply], start: float, end: float) -> tuple[float, float]:
    """Longest gap between consecutive pieces of one reply, among gaps overlapping
    ``[start, end]``, and when it began; ``(0.0, start)`` when no gap overlaps it."""
    longest, began = 0.0, start
    for reply in replies:
        for a, b in zip(reply.pieces, reply.pieces[1:], strict=False):
            if b >= start and a <= end and b - a > longest:
                longest, began = b - a, a
    return longest, began


def wait_until(condition: Any, timeout: float) -> float:
    """Poll ``condition`` every 2 ms; return the time it first held, or raise TimeoutError."""
    deadline = time.perf_counter() + timeout
    while True:
        now = time.perf_counter()
        if condition():
            return now
        if now > deadline:
            raise TimeoutError("the engine did not follow the registry in time")
        time.sleep(POLL_EVERY)


def swap_plan(n: int) -> list[tuple[str, str | None]]:
    """``n`` registry actions: activate v0001, then activate v0002 and roll back in turn."""
    plan: list[tuple[str, str | None]] = [("activate", "v0001")]
    while len(plan) < n:
        plan.append(("activate", "v0002") if len(plan) % 2 else ("rollback", None))
    return plan[:n]


def run_swaps(engine: Any, registry: Any, watcher: Any, load: ChatLoad,
              args: argparse.Namespace) -> list[dict[str, Any]]:
    """Drive the registry writes; return one record per swap (times are perf_counter)."""
    from chat_app.engine import SamplingParams

    probe_chat = [{"role": "user", "content": "Which version answers this?"}]
    records = []
    for action, version in swap_plan(args.swaps):
        time.sleep(args.settle)
        old, events = engine.active_version, len(watcher.events)
        t_before = time.perf_counter()
        result = registry.activate(version) if action == "activate" else registry.rollback()
        t_write = time.perf_counter()
        target = result.version if result is not None else "base"
        t_active = wait_until(lambda t=target: engine.active_version == t, args.poll + 60)
        wait_until(lambda n=events: len(watcher.events) > n, 60)
        probe = engine.stream(probe_chat, SamplingParams(max_new_tokens=1, temperature=0.0))
        probe.result(timeout=60)
        t_unloaded = t_active
        if old not in ("base", target):
            t_unloaded = wait_until(lambda o=old: o not in engine.loaded_versions(), 600)
        event = watcher.events[-1]
        records.append({
            "action": action if action == "rollback" else f"activate {version}",
            "from": old, "to": target, "t_before": t_before, "t_write": t_write,
            "t_active": t_active,
            "t_settled": max(t_active, t_unloaded), "probe_version": probe.version,
            "event_version": event.version, "event_ok": event.ok,
            "watcher_swap_s": event.seconds,
        })
        print(f"  {old} -> {target}: served after {t_active - t_write:.3f} s",
              file=sys.stderr, flush=True)
    time.sleep(args.settle)
    return records


def analyse(records: list[dict[str, Any]], replies: list[Reply],
            quiet_start: float) -> list[dict[str, Any]]:
    """Add the pause figures and the version checks to each swap record.

    Version rule checked: a reply asked for after ``engine.active_version`` was seen to be
    the new version (and before the next write) runs on it; a reply whose ``stream()`` call
    returned before the write began (and after the previous switch) runs on the old one.
    """
    rows = []
    for i, rec in enumerate(records):
        t_write, t_active, t_settled = rec["t_write"], rec["t_active"], rec["t_settled"]
        previous = records[i - 1]["t_active"] if i else float("-inf")
        following = records[i + 1]["t_before"] if i + 1 < len(records) else float("inf")
        calm_since = records[i - 1]["t_settled"] if i else quiet_start
        length = t_settled - t_write
        quiet_length = max(length, MIN_QUIET)
        quiet = (max(calm_since + 0.05, rec["t_before"] - 0.05 - quiet_length),
                 rec["t_before"] - 0.05)
        swap_pause, pause_began = max_gap(replies, t_write, t_settled)
        quiet_pause, _ = max_gap(replies, *quiet)
        # asked after the switch was seen: the new version; chosen before the write: the old
        wrong = [r for r in replies if t_active < r.asked and r.returned < following
                 and r.version != rec["to"]]
        old_tagged = [r for r in replies if previous < r.asked and r.returned < rec["t_before"]
                      and r.version != rec["from"]]
        across = [r for r in replies if r.pieces and r.pieces[0] < t_write < r.pieces[-1]]
        rows.append({
            "swap": f"{rec['from']} -> {rec['to']}", "action": rec["action"],
            "write_to_serving_s": t_active - t_write,
            "watcher_swap_s": rec["watcher_swap_s"],
            "swap_window_s": length,
            "quiet_window_s": quiet[1] - quiet[0],
            "max_pause_swap_s": swap_pause,
            "pause_began_after_write_s": pause_began - t_write,
            "max_pause_quiet_s": quiet_pause,
            "pause_ratio": ratio(swap_pause, quiet_pause),
            "chats_in_flight_across": len(across),
            "probe_ok": rec["probe_version"] == rec["to"],
            "event_ok": rec["event_ok"] and rec["event_version"] == rec["to"],
            "new_requests_on_wrong_version": len(wrong),
            "earlier_requests_not_on_old_version": len(old_tagged),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    from chat_app.settings import Settings

    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    add_common_args(parser, model_help="model folder or hub id (default: a random Llama)")
    parser.add_argument("--layers", type=int, default=4, help="layers of the random Llama")
    parser.add_argument("--hidden", type=int, default=512, help="width of the random Llama")
    parser.add_argument("--chats", type=int, default=4, help="chats streaming all the time")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="length of each reply")
    parser.add_argument("--swaps", type=int, default=5)
    parser.add_argument("--settle", type=float, default=3.0,
                        help="quiet seconds before each swap")
    parser.add_argument("--poll", type=float, default=Settings().adapter_poll_seconds,
                        help="the watcher's registry poll interval (default: the server's)")
    parser.add_argument("--lora-r", type=int, default=16, help="rank of the two adapters")
    args = parser.parse_args(argv)
    check_common_args(parser, args)
    problems = [f"--{n.replace('_', '-')} must be >= 1" for n in
                ("chats", "max_new_tokens", "swaps", "lora_r", "layers") if getattr(args, n) < 1]
    if args.settle <= 0 or args.poll <= 0:
        problems.append("--settle and --poll must be positive")
    if problems:
        parser.error("; ".join(problems))

    from chat_app.engine import Engine, EngineConfig, SamplingParams
    from chat_app.hotswap import AdapterWatcher
    from feedback_store import FeedbackStore

    with tempfile.TemporaryDirectory(prefix="bench-swap-") as tmp_name:
        tmp = Path(tmp_name)
        model = args.model or str(build_random_llama(
            tmp / "random-llama", hidden_size=args.hidden, num_layers=args.layers,
            never_end=True))
        for n, version in enumerate(("v0001", "v0002"), start=1):
            save_random_adapter(model, tmp / "adapters" / version, seed=n, r=args.lora_r)
        engine = Engine.from_config(EngineConfig(
            model=model, device=args.device, max_concurrent=args.chats + 2,
            max_queued=args.chats + 2, torch_threads=args.threads))
        store = FeedbackStore.open(f"sqlite:///{tmp / 'feedback.db'}")
        for version in ("v0001", "v0002"):
            store.registry.register_version(version=version, path=str(tmp / "adapters" / version))
        watcher = AdapterWatcher(store.registry, engine, poll_seconds=args.poll).start()
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
        load = ChatLoad(engine, args.chats, params).start()
        try:
            wait_until(lambda: load.finished() >= args.chats, 600)  # every chat is warm
            started = time.perf_counter()
            records = run_swaps(engine, store.registry, watcher, load, args)
            elapsed = time.perf_counter() - started
        finally:
            load.stop()
            watcher.stop()
            engine.close()
            store.close()
        parameters = parameter_count(model)

    replies = load.replies
    rows = analyse(records, replies, started)
    bad_replies = [r for r in replies if r.finish_reason not in ("length", "stop")]
    decode_gaps = [b - a for r in replies for a, b in zip(r.pieces, r.pieces[1:], strict=False)]
    summary = {
        key: {"median": median([r[key] for r in rows]), "max": max(r[key] for r in rows)}
        for key in ("write_to_serving_s", "watcher_swap_s", "max_pause_swap_s",
                    "max_pause_quiet_s", "pause_ratio")
    }
    failures = (len(load.errors) + len(bad_replies)
                + sum(r["new_requests_on_wrong_version"] + r["earlier_requests_not_on_old_version"]
                      + (not r["probe_ok"]) + (not r["event_ok"]) for r in rows))
    report = {
        "benchmark": "bench_swap",
        "model": args.model or f"random-llama-{args.layers}x{args.hidden}",
        "parameters": parameters, "device": args.device, "torch_threads": args.threads,
        "chats": args.chats, "max_new_tokens": args.max_new_tokens, "poll_seconds": args.poll,
        "lora_r": args.lora_r, "swaps": rows, "summary": summary,
        "replies": len(replies), "reply_errors": len(load.errors) + len(bad_replies),
        "first_error": (load.errors or [f"finish_reason {r.finish_reason}" for r in bad_replies]
                        or [None])[0],
        "median_piece_gap_s": median(decode_gaps), "seconds": elapsed,
        "failures": failures, "note": machine_note(),
    }
    print_report(report)
    write_json(args.json, report)
    return 1 if failures else 0


def print_report(r: dict[str, Any]) -> None:
    print(f"\nmodel {r['model']} ({r['parameters'] / 1e6:.1f}M params) on {r['device']}, "
          f"{r['torch_threads']} torch threads; {r['chats']} chats streaming "
          f"{r['max_new_tokens']}-token replies; LoRA r={r['lora_r']} all-linear; "
          f"watcher polls every {r['poll_seconds']} s")
    rows = [(x["swap"], x["write_to_serving_s"], x["watcher_swap_s"], x["swap_window_s"],
             x["max_pause_swap_s"], x["pause_began_after_write_s"], x["max_pause_quiet_s"],
             x["pause_ratio"],
             x["chats_in_flight_across"],
             "ok" if x["probe_ok"] and x["event_ok"] and not x["new_requests_on_wrong_version"]
             and not x["earlier_requests_not_on_old_version"] else "WRONG")
            for x in r["swaps"]]
    s = r["summary"]
    for stat in ("median", "max"):
        rows.append((stat, s["write_to_serving_s"][stat], s["watcher_swap_s"][stat], None,
                     s["max_pause_swap_s"][stat], None, s["max_pause_quiet_s"][stat],
                     s["pause_ratio"][stat], None, None))
    print_table(("swap", "write->serving s", "watcher swap s", "window s", "max pause s",
                 "pause at s", "quiet max pause s", "pause ratio", "chats across", "versions"),
                rows)
    print(f"{r['replies']} replies, {r['reply_errors']} errors, median gap between pieces "
          f"{r['median_piece_gap_s'] * 1e3:.1f} ms; failures {r['failures']}; {r['note']}")
    if r["first_error"]:
        print(f"first error: {r['first_error']}")


if __name__ == "__main__":
    sys.exit(main())
