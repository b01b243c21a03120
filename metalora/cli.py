"""The `metalora` command line: one entry point for every process the system runs.

    metalora serve          # embedded default: vLLM + worker + gateway on this machine
    metalora gateway        # the HTTP gateway only (compose service `gateway`)
    metalora worker         # one adaptation worker (compose service `worker`, scale with --scale)
    metalora engine         # the vLLM OpenAI server with metalora's LoRA flags
    metalora prepare-model  # convert/cache the default base model and print its folder
    metalora keys create --tenant acme [--name ci]   # prints a new API key once
    metalora keys list [--tenant acme]               # ids, tenants, names, state; never secrets
    metalora keys revoke <key-id>
    metalora prepare-tasks  # fetch BIG-bench + OLMo eval data from PyPI, convert into task folders
    metalora train-meta     # meta-train the shared LoRA init (trainer/train_meta.py; --help for options)
    metalora evaluate DIR…  # few-shot evaluation of LoRA inits on task folders (trainer/evaluate.py)
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
import time
from typing import get_args

from pydantic import ValidationError

from adapters.api_keys import new_api_key
from adapters.backend import open_backend
from adapters.errors import MetaloraError
from adapters.logs import LogLevel, configure_logging
from adapters.settings import Settings
from metalora.supervisor import serve
from metalora.vllm_command import vllm_command, vllm_env

# server/ and trainer/ are imported inside the commands that run them: each process loads only its own side
# (`metalora gateway` never imports the trainer, `metalora worker` never the HTTP stack).


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        # Validated at start: a bad METALORA_* value stops the process with the variable named.
        sys.exit(f"invalid configuration:\n{exc}")


def cmd_serve(args, settings: Settings) -> int:
    return serve(settings, log_dir=args.log_dir)


def cmd_gateway(args, settings: Settings) -> int:
    from server.app import run

    run(settings)
    return 0


def cmd_worker(args, settings: Settings) -> int:
    from trainer.worker import main as worker_main

    worker_main(settings)
    return 0


def cmd_engine(args, settings: Settings) -> int:
    argv = vllm_command(settings, host=args.host, port=args.port)
    if args.print:
        print(" ".join(argv))
        return 0
    settings.adapter_root.mkdir(parents=True, exist_ok=True)
    os.execve(argv[0], argv, vllm_env(settings))


def cmd_prepare_model(args, settings: Settings) -> int:
    from trainer.model_prep import ensure_base_model

    print(ensure_base_model(settings))
    return 0


def cmd_keys(args, settings: Settings) -> int:
    async def run() -> int:
        backend = open_backend(settings)
        try:
            store = backend.store
            if args.keys_command == "create":
                try:
                    record, key = new_api_key(args.tenant, args.name)
                except ValueError as exc:
                    sys.exit(str(exc))
                await store.create_api_key(record)
                # The key alone on stdout (scriptable); the rest on stderr. It is not stored: show it once.
                print(key)
                print(f"created {record.id} for tenant {record.tenant!r}; store the key now, it cannot be shown"
                      " again", file=sys.stderr)
            elif args.keys_command == "list":
                print(f"{'id':<22} {'tenant':<33} {'state':<8} {'created':<20} name")
                for k in await store.list_api_keys(args.tenant):
                    created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(k.created_at))
                    print(f"{k.id:<22} {k.tenant:<33} {'active' if k.active else 'revoked':<8} {created:<20}"
                          f" {k.name}")
            else:
                record = await store.revoke_api_key(args.key_id)
                print(f"revoked {record.id} (tenant {record.tenant!r})")
            return 0
        except MetaloraError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            await backend.close()

    return asyncio.run(run())


OFFLINE_COMMANDS = {
    "prepare-tasks": ("trainer.tasks.fetch", "fetch and convert the meta-training and evaluation tasks"),
    "train-meta": ("trainer.train_meta", "meta-train the shared LoRA init (MeTA-LoRA)"),
    "evaluate": ("trainer.evaluate", "evaluate LoRA inits few-shot on task folders"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metalora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", type=str.upper, choices=get_args(LogLevel), default=None,
                        help="default: METALORA_LOG_LEVEL (Settings.log_level), INFO when unset")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the whole system on this machine (embedded default)")
    p.add_argument("--log-dir", default=None, help="write each child's output to <dir>/<child>.log")
    p.set_defaults(func=cmd_serve)

    sub.add_parser("gateway", help="run the HTTP gateway").set_defaults(func=cmd_gateway)
    sub.add_parser("worker", help="run one adaptation worker").set_defaults(func=cmd_worker)

    p = sub.add_parser("engine", help="run the vLLM OpenAI server with metalora's LoRA flags")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default: the port of the first METALORA_VLLM_URLS")
    p.add_argument("--print", action="store_true", help="print the command instead of running it")
    p.set_defaults(func=cmd_engine)

    sub.add_parser("prepare-model", help="convert and cache the base model, print its folder") \
        .set_defaults(func=cmd_prepare_model)

    # Listed for --help; main() hands their arguments (including --help) to the trainer's own parsers.
    for name, (_module, help_text) in OFFLINE_COMMANDS.items():
        sub.add_parser(name, help=help_text)

    p = sub.add_parser("keys", help="manage API keys (in the configured metadata store)")
    p.set_defaults(func=cmd_keys)
    keys = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    k = keys.add_parser("create", help="create a key bound to a tenant; prints it once")
    k.add_argument("--tenant", required=True, help="tenant id: [a-z0-9][a-z0-9_-]{0,31}")
    k.add_argument("--name", default="", help="a label for listings (who or what uses the key)")
    k = keys.add_parser("list", help="list keys without secrets")
    k.add_argument("--tenant", default=None)
    k = keys.add_parser("revoke", help="revoke a key by id (from `keys list`); takes effect at once")
    k.add_argument("key_id")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in OFFLINE_COMMANDS:
        configure_logging(_settings().log_level)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        importlib.import_module(OFFLINE_COMMANDS[argv[0]][0]).main(argv[1:])
        return
    args = build_parser().parse_args(argv)
    settings = _settings()
    configure_logging(args.log_level or settings.log_level)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(args.func(args, settings) or 0)
