"""The `feedback-chat` command.

    feedback-chat serve                      start the chat page, console and API
    feedback-chat trainer                    the retraining schedule alone (/healthz, /metrics)
    feedback-chat db upgrade                 create or migrate the database
    feedback-chat export --kind kto|dpo --out FILE.jsonl [filters]
    feedback-chat demo-model build           (re)build the offline demo model
    feedback-chat retrain --now [--wait]     run one training round
    feedback-chat adapters list | promote VERSION | rollback
    feedback-chat canary status | promote | stop | rollback | history
    feedback-chat users forget USER          delete everything USER wrote (a record stays)
    feedback-chat conversations delete ID | deleted

Heavy modules (torch, gradio) are imported only by the subcommands that need them,
so `db` and `export` work from the store's own dependencies.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime
from pathlib import Path

from .settings import Settings, SettingsError, fields, load_settings, retrain_settings

log = logging.getLogger("feedback_chat")


def _add_setting_flags(p: argparse.ArgumentParser, names: list[str] | None = None) -> None:
    for f in fields(Settings):
        if names is not None and f.name not in names:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        if "bool" in kind:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f.metadata["help"])
        else:
            typ = int if kind == "int" else float if kind == "float" else str
            p.add_argument(flag, dest=f.name, type=typ, default=None,
                           help=f"{f.metadata['help']} (env FEEDBACK_CHAT_{f.name.upper()})")


STORE_FLAGS = ["data_dir", "database_url"]
MODEL_FLAGS = STORE_FLAGS + ["model", "adapters_dir", "device", "quantize_4bit"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="feedback-chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="start the chat page, operator console and HTTP API")
    _add_setting_flags(p)

    p = sub.add_parser("trainer", help="run the retraining schedule as a service of its own "
                       "(front-ends then run with --no-scheduler)")
    _add_setting_flags(p, MODEL_FLAGS + ["host", "port", "retrain_interval_minutes",
                                         "retrain_min_feedback"])

    p = sub.add_parser("engine", help="serve the model alone as an OpenAI-compatible engine "
                       "that loads adapters at run time (front-ends use it through "
                       "FEEDBACK_CHAT_ENGINE_URL)")
    _add_setting_flags(p, ["data_dir", "model", "device", "quantize_4bit", "host", "port",
                           "max_input_tokens", "max_concurrent", "max_queued", "max_new_tokens",
                           "temperature", "top_p", "api_keys"])
    p.add_argument("--served-model-name", default=None,
                   help="the base model's name in requests (default: --model, or demo-model)")

    db = sub.add_parser("db", help="database maintenance")
    dbsub = db.add_subparsers(dest="db_command", required=True)
    _add_setting_flags(dbsub.add_parser("upgrade", help="create or migrate the schema"), STORE_FLAGS)

    p = sub.add_parser("export", help="write training rows as JSONL (TRL formats)")
    p.add_argument("--kind", choices=["kto", "dpo"], required=True)
    p.add_argument("--out", type=Path, required=True, help="output file (.jsonl)")
    p.add_argument("--since", type=datetime.fromisoformat, help="events at or after (ISO time)")
    p.add_argument("--after-event", type=int, help="events with a larger id than this")
    p.add_argument("--adapter-version", help="replies written by this adapter version")
    p.add_argument("--split", choices=["train", "eval", "all"], default="all")
    _add_setting_flags(p, STORE_FLAGS)

    dm = sub.add_parser("demo-model", help="the built-in offline demo model")
    dmsub = dm.add_subparsers(dest="demo_command", required=True)
    p = dmsub.add_parser("build", help="(re)build it into DATA_DIR/demo-model")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: recipe's)")
    _add_setting_flags(p, ["data_dir"])

    p = sub.add_parser("retrain", help="run a training round on the accumulated feedback")
    p.add_argument("--now", action="store_true", required=True, help="start one round now")
    p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                   help="wait for the round to finish (default) or return once it started")
    _add_setting_flags(p, MODEL_FLAGS)

    ad = sub.add_parser("adapters", help="adapter versions")
    adsub = ad.add_subparsers(dest="adapters_command", required=True)
    _add_setting_flags(adsub.add_parser("list", help="list versions"), STORE_FLAGS)
    p = adsub.add_parser("promote", help="make VERSION the served one (operator override)")
    p.add_argument("version")
    _add_setting_flags(p, STORE_FLAGS)
    _add_setting_flags(adsub.add_parser("rollback", help="go back to the previous version"),
                       STORE_FLAGS)

    us = sub.add_parser("users", help="people's data")
    ussub = us.add_subparsers(dest="users_command", required=True)
    p = ussub.add_parser("forget", help="delete every conversation and feedback of USER from "
                         "views, training data and exports (a record of the deletion stays)")
    p.add_argument("user")
    _add_setting_flags(p, STORE_FLAGS)
    cv = sub.add_parser("conversations", help="stored conversations")
    cvsub = cv.add_subparsers(dest="conversations_command", required=True)
    p = cvsub.add_parser("delete", help="delete conversation ID (a record of it stays)")
    p.add_argument("id")
    _add_setting_flags(p, STORE_FLAGS)
    _add_setting_flags(cvsub.add_parser("deleted", help="the records of deleted conversations"),
                       STORE_FLAGS)

    ca = sub.add_parser("canary", help="the version on trial with a share of live chats")
    casub = ca.add_subparsers(dest="canary_command", required=True)
    for name, text in (("status", "its figures per version and the rule's verdict (JSON)"),
                       ("promote", "serve it to everyone now"),
                       ("stop", "end it; the version stays a candidate"),
                       ("rollback", "end it and reject the version"),
                       ("history", "ended canaries with their figures (JSON)")):
        _add_setting_flags(casub.add_parser(name, help=text), STORE_FLAGS)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    names = {f.name for f in fields(Settings)}
    return load_settings({k: v for k, v in vars(args).items() if k in names})


def _open_store(settings: Settings):  # type: ignore[no-untyped-def]
    from feedback_store import FeedbackStore

    return FeedbackStore.open(settings.resolved_database_url)


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from .server import serve

    return serve(settings)


def cmd_trainer(settings: Settings, args: argparse.Namespace) -> int:
    from .trainer import run_trainer

    return run_trainer(settings)


def cmd_engine(settings: Settings, args: argparse.Namespace) -> int:
    from .engine_service import serve_engine

    return serve_engine(settings, served_model=args.served_model_name)


def cmd_db(settings: Settings, args: argparse.Namespace) -> int:
    from feedback_store import Database, upgrade
    from feedback_store.db import current_revision

    db = Database(settings.resolved_database_url)
    upgrade(db)
    print(f"database at revision {current_revision(db)}")
    return 0


def cmd_export(settings: Settings, args: argparse.Namespace) -> int:
    from feedback_store import RowFilter
    from feedback_store.export import export

    flt = RowFilter(since=args.since, after_event_id=args.after_event,
                    adapter_version=args.adapter_version, split=args.split)
    n = export(_open_store(settings), kind=args.kind, out=args.out, flt=flt)
    print(f"wrote {n} {args.kind.upper()} rows to {args.out}")
    return 0


def cmd_demo_model(settings: Settings, args: argparse.Namespace) -> int:
    from .demo_model.build import ensure_demo_model

    path = ensure_demo_model(settings.data_dir, rebuild=True, steps=args.steps)
    print(f"demo model ready at {path}")
    return 0


def cmd_retrain(settings: Settings, args: argparse.Namespace) -> int:
    from retrain import start_round

    run = start_round(settings=retrain_settings(settings), trigger="cli", wait=args.wait)
    print(json.dumps({"run": run.id, "status": run.status, "decision": run.decision,
                      "candidate_version": run.candidate_version, "reasons": list(run.reasons),
                      "error": run.error}, indent=2))
    return 0 if run.status in ("succeeded", "rejected", "queued", "running") else 1


def cmd_adapters(settings: Settings, args: argparse.Namespace) -> int:
    reg = _open_store(settings).registry
    if args.adapters_command == "list":
        versions = reg.list_versions()
        if not versions:
            print("no adapter versions yet: the base model is served")
        for v in versions:
            acc = v.metrics.get("pair_accuracy")
            print(f"{v.version}  {v.status:<9}  parent={v.parent_version or '-':<6} "
                  f"run={v.run_id or '-'}  created={v.created_at:%Y-%m-%d %H:%M}  "
                  f"pair_accuracy={acc if acc is not None else '-'}  {v.path}")
        return 0
    if args.adapters_command == "promote":
        v = reg.activate(args.version, reasons=("promoted by an operator",))
        print(f"{v.version} is now active")
        return 0
    v = reg.rollback()
    print(f"rolled back: now serving {v.version if v else 'the base model (no adapter)'}")
    return 0


def cmd_users(settings: Settings, args: argparse.Namespace) -> int:
    import getpass

    done = _open_store(settings).forget_user(args.user, by=f"operator {getpass.getuser()}")
    print(f"forgot {args.user}: {done['conversations']} conversations, {done['messages']} "
          f"messages and {done['events']} feedback events deleted")
    return 0


def cmd_conversations(settings: Settings, args: argparse.Namespace) -> int:
    import getpass

    store = _open_store(settings)
    if args.conversations_command == "deleted":
        for c in store.deletions():
            print(f"#{c.id}  user={c.user_id or '-'}  deleted {c.deleted_at:%Y-%m-%d %H:%M} "
                  f"by {c.deleted_by or '-'}")
        return 0
    done = store.delete_conversation(args.id, by=f"operator {getpass.getuser()}")
    print(f"conversation {args.id} deleted: {done['messages']} messages, {done['events']} "
          f"feedback events")
    return 0


def cmd_canary(settings: Settings, args: argparse.Namespace) -> int:
    import getpass

    canaries = _open_store(settings).canaries
    if args.canary_command == "status":
        status = canaries.check()
        print(json.dumps(status.to_dict() if status else {"canary": None}, indent=2))
        return 0
    if args.canary_command == "history":
        print(json.dumps(canaries.history(), indent=2))
        return 0
    outcome = {"promote": "promoted", "stop": "stopped", "rollback": "rolled back"}
    ended = canaries.end_by_hand(outcome[args.canary_command], by=getpass.getuser())
    print(f"canary {ended['version']} {ended['outcome']}: {ended['reason']}")
    return 0


COMMANDS = {"serve": cmd_serve, "trainer": cmd_trainer, "engine": cmd_engine, "db": cmd_db, "export": cmd_export,
            "demo-model": cmd_demo_model, "retrain": cmd_retrain, "adapters": cmd_adapters,
            "canary": cmd_canary, "users": cmd_users, "conversations": cmd_conversations}


def main(argv: list[str] | None = None) -> int:
    from feedback_store import StoreError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        settings = _settings(args)
        return COMMANDS[args.command](settings, args)
    except SettingsError as exc:
        print(f"feedback-chat: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"feedback-chat: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
