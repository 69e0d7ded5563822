"""The command line loads an optional command's module only when that command runs."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from feddistill.cli import OPTIONAL_COMMANDS, build_parser

_PROBE = """
import json, sys
from feddistill.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules if m.startswith("feddistill."))))
"""


def _loaded_after(*argv: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, check=True
    ).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_help_and_simulate_help_import_no_optional_command_module() -> None:
    modules = {module for module, *_ in OPTIONAL_COMMANDS.values()}
    for argv in (("--help",), ("simulate", "--help")):
        loaded = _loaded_after(*argv)
        assert "feddistill.cli" in loaded  # the probe ran the command line
        assert loaded & modules == set(), argv


def test_the_command_that_runs_has_its_arguments() -> None:
    assert "feddistill.bench.robust" in _loaded_after("bench-robust", "--help")


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _options(parser: argparse.ArgumentParser, name: str) -> set[str]:
    return {flag for action in _subparser(parser, name)._actions for flag in action.option_strings}


@pytest.mark.parametrize("name", sorted(OPTIONAL_COMMANDS))
def test_an_optional_command_has_the_same_options_in_the_whole_and_the_lazy_parser(
    name: str,
) -> None:
    """The full parser (as the doc-command tests build it) and the one ``main`` builds for the
    command agree, and the command has options beyond --help."""
    whole, lazy = _options(build_parser(), name), _options(build_parser(name), name)
    assert whole == lazy
    assert whole - {"-h", "--help"}
    assert _subparser(build_parser(name), name).get_default("func") is not None
