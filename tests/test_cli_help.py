"""Every `metalora` subcommand and every flag says what it does in --help: each argparse action of the main parser,
of every subcommand's parser, and of the trainer's own parsers that the offline commands hand their arguments to
(each such module exposes `build_parser()`)."""
from __future__ import annotations

import argparse
import importlib

import pytest

from metalora.cli import OFFLINE_COMMANDS, build_parser


def parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("metalora",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, (*path, name))


def undocumented(parser: argparse.ArgumentParser) -> list[str]:
    missing = []
    for action in parser._actions:
        if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
            missing.append("/".join(action.option_strings) or action.dest)
        if isinstance(action, argparse._SubParsersAction):
            helped = {choice.dest for choice in action._choices_actions if (choice.help or "").strip()}
            missing += [f"subcommand {name}" for name in action.choices if name not in helped]
    return missing


def all_parsers():
    yield from parsers(build_parser())
    for name, (module, _) in OFFLINE_COMMANDS.items():
        yield from parsers(importlib.import_module(module).build_parser(), ("metalora", name))


@pytest.mark.parametrize("path, parser", list(all_parsers()), ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_every_action_has_help(path, parser):
    assert undocumented(parser) == [], f"{' '.join(path)}: actions without help"


def test_the_client_commands_are_there():
    names = {path[1] for path, _ in parsers(build_parser()) if len(path) == 2}
    assert {"adapt", "jobs", "adapters", "complete", "download", "upload", "serve", "evaluate", "train-meta"} <= names
