"""Simulated users: several threads that chat with the served model over the HTTP API and
give feedback by a judge, as people do on the chat page.

One *rating* is one reply a user read and judged. What the user then sends depends on the
condition:

* ``kto``: a thumb (up when the judge scores >= 0.5, flipped with probability ``flip``);
* ``dpo``: no thumbs; a disliked reply is edited (``improve``) with probability
  ``edit_share``, and with probability ``regen_share`` the user regenerates and picks the
  sibling the judge prefers (none on a tie; the pick flipped with probability ``flip``);
* ``both``: all of the above;
* ``control``: random thumbs (up or down with equal odds); random edits (another reply the
  service gave to the same prompt, with the same probabilities) and random picks. No
  judge is consulted, so one control run serves every judge.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from .judges import Judge
from .prompts import PromptSets
from .service import Service

CONDITIONS = ("kto", "dpo", "both", "control")


@dataclass(frozen=True)
class UserConfig:
    ratings: int
    users: int = 8
    flip: float = 0.1
    edit_share: float = 0.3
    regen_share: float = 0.15
    seed: int = 0


@dataclass
class FeedbackTally:
    """What the users sent in one round, and when the last of it was stored."""

    counts: Counter = field(default_factory=Counter)
    judge_scores: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    last_feedback_at: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {**{k: self.counts[k] for k in ("replies", "up", "down", "edits", "picks",
                                               "retries")},
                "users_judge_mean": (sum(self.judge_scores) / len(self.judge_scores)
                                     if self.judge_scores else None),
                "errors": len(self.errors), "first_error": self.errors[0] if self.errors else None,
                "seconds": self.seconds}


def post(client: httpx.Client, path: str, body: dict[str, Any] | None,
         tally: FeedbackTally, *, tries: int = 20) -> dict[str, Any]:
    """POST and return the JSON body; a 429 (engine full) is retried after a pause."""
    for _ in range(tries):
        response = client.post(path, json=body) if body is not None else client.post(path)
        if response.status_code == 429:
            tally.counts["retries"] += 1
            time.sleep(0.5)
            continue
        if response.status_code != 200:
            raise RuntimeError(f"POST {path} -> {response.status_code}: {response.text[:300]}")
        return response.json()
    raise RuntimeError(f"POST {path}: still busy after {tries} tries")


def chat(client: httpx.Client, prompt: str, user: str, tally: FeedbackTally) -> tuple[str, str]:
    """One reply to ``prompt`` at the service's default sampling: (reply id, text)."""
    body = post(client, "/v1/chat/completions",
                {"messages": [{"role": "user", "content": prompt}], "user": user}, tally)
    return body["id"], body["choices"][0]["message"]["content"]


def run_users(service: Service, prompts: PromptSets, judge: Judge | None, condition: str,
              config: UserConfig, *, round_no: int) -> FeedbackTally:
    """``config.ratings`` replies judged by ``config.users`` concurrent users."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}")
    if condition != "control" and judge is None:
        raise ValueError(f"condition {condition!r} needs a judge")
    tally = FeedbackTally()
    lock = threading.Lock()
    remaining = [config.ratings]
    seen: dict[str, list[str]] = {}  # control edits: earlier replies to the same prompt

    def take() -> bool:
        with lock:
            if remaining[0] <= 0:
                return False
            remaining[0] -= 1
            return True

    def user_loop(n: int) -> None:
        rng = random.Random(f"{config.seed}-{round_no}-{n}")
        name = f"sim-user-{n}"
        with service.client() as client:
            while take():
                try:
                    one(client, rng, name)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    with lock:
                        tally.errors.append(f"{type(exc).__name__}: {exc}"[:300])

    def send(client: httpx.Client, path: str, body: dict[str, Any] | None, kind: str) -> Any:
        out = post(client, path, body, tally)
        with lock:
            tally.counts[kind] += 1
            tally.last_feedback_at = max(tally.last_feedback_at, time.time())
        return out

    def one(client: httpx.Client, rng: random.Random, name: str) -> None:
        prompt = prompts.pick_train(rng)
        reply_id, text = chat(client, prompt, name, tally)
        with lock:
            tally.counts["replies"] += 1
            earlier = list(seen.get(prompt, ()))
            seen.setdefault(prompt, []).append(text)
        if condition == "control":
            liked = rng.random() < 0.5
        else:
            score = judge.score(prompt, text)
            with lock:
                tally.judge_scores.append(score)
            liked = (score >= 0.5) != (rng.random() < config.flip)
        if condition in ("kto", "both", "control"):
            send(client, "/v1/feedback",
                 {"reply_id": reply_id, "rating": "up" if liked else "down", "user": name},
                 "up" if liked else "down")
        if condition == "kto":
            return
        if not liked and rng.random() < config.edit_share:
            if condition == "control":
                better = rng.choice(earlier) if earlier else None
            else:
                better = judge.improve(prompt, text)
            if better and better.strip() != text.strip():
                send(client, f"/v1/replies/{reply_id}/edit", {"content": better, "user": name},
                     "edits")
        if rng.random() < config.regen_share:
            other = post(client, f"/v1/replies/{reply_id}/regenerate", {}, tally)
            other_id, other_text = other["id"], other["choices"][0]["message"]["content"]
            if condition == "control":
                first_wins = rng.random() < 0.5
            else:
                a, b = judge.score(prompt, text), judge.score(prompt, other_text)
                if a == b:
                    return
                first_wins = (a > b) != (rng.random() < config.flip)
            chosen, rejected = (reply_id, other_id) if first_wins else (other_id, reply_id)
            send(client, "/v1/preferences",
                 {"chosen_id": chosen, "rejected_id": rejected, "user": name}, "picks")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=user_loop, args=(n,), daemon=True)
               for n in range(config.users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tally.seconds = time.perf_counter() - t0
    return tally
