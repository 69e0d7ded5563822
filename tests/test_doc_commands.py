"""Every command shown in README.md and docs/*.md is one that a test or CI runs.

The convention for the docs (one rule for every page):

- A fenced block tagged ``sh`` or ``bash`` holds commands only: one per line, a trailing ``\\``
  joins the next line, ``#`` starts a comment line, ``&&`` chains commands (each part counts
  as a command). No heredocs: show a file's content in a ``toml``/``text`` block instead.
- A fenced block tagged ``console`` is a transcript: lines starting with ``$ `` are commands
  (continued by a trailing ``\\``), the other lines are their output.
- Any other tag (``text``, ``toml``, ``json``, ``python``, ...) is output, a file or an example
  and never a command. A fence without a tag is an error, so nothing slips past untagged.

Each command found must be declared below, in exactly the form the doc shows it, under whoever
runs it:

- ``FAST``: run here, in the fast suite, through ``feddistill.cli.main`` (the ``feddistill``
  entry point), expecting the exit code given; a ``console`` block's output lines must appear
  in what the command printed.
- ``SLOW``: run here by a slow-marked test, in this order, in one scratch folder, as
  subprocesses of this environment's executables (for the README's default run and what
  follows from it; expensive benchmarks are shown as prose instead).
- ``CI``: the install and test steps, each of which ``.ci/run`` runs as the line given.
- docs/deploy.md's commands: rendered from the templates the deployment tests run
  (``tests/deploy/federation.py``).
- ``ELSEWHERE``: run by another test, named ``path::function``, exactly as written.

To document a new command, add it here in one of these (and make sure it is really run), or
show it as ``text`` if it is an example no test runs.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from feddistill.cli import main
from tests.deploy.federation import rendered_commands

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
COMMAND_TAGS = {"sh", "bash"}

FAST: dict[str, int] = {
    "feddistill --help": 0,
    "feddistill simulate --help": 0,
    "feddistill config": 0,
    "feddistill simulate --alpha 0": 2,
}
SLOW: list[str] = [
    "feddistill simulate --out runs/default",
    "feddistill export runs/default/student --out runs/default/export",
    'feddistill predict --model runs/default/export "the striker scored twice as the team won '
    'the league final" "shares of the bank fell after weak quarterly profits"',
    "feddistill bench-codec",
    "feddistill bench-codec --block 8",
]
CI: dict[str, str] = {
    "pip install torch==2.13.0": "python -m pip install -q torch==2.13.0",
    "pip install -e . -c constraints.txt": "python -m pip install -q -e . -c constraints.txt",
    'pip install -e ".[dev]" -c constraints.txt': (
        'python -m pip install -q -e ".[dev]" -c constraints.txt'
    ),
    'pip install -e ".[tracking]" -c constraints.txt': (
        'python -m pip install -q -e ".[tracking]" -c constraints.txt'
    ),
    'pip install -e ".[onnx]" -c constraints.txt': (
        'python -m pip install -q -e ".[onnx]" -c constraints.txt'
    ),
    "pytest": "pytest",
}
_ONNX_DOC = "tests/test_onnx.py::test_doc_commands_run_as_written"
# Run with the values swapped for loopback ones (127.0.0.1, free ports, 1 CPU, a tiny config)
# and Ray's isolation flags appended; test_every_doc_command_is_one_the_cluster_test_runs
# checks every command of the page has such a template.
_RAY_DOC = "tests/test_ray_cluster.py::test_tiny_federation_on_a_two_node_ray_cluster"
ELSEWHERE: dict[str, str] = {
    "feddistill simulate --strategy bulyan": (
        "tests/test_robust.py::test_doc_commands_print_what_the_doc_shows"
    ),
    "feddistill export feddistill-out/student --out feddistill-out/serve --onnx": _ONNX_DOC,
    'feddistill predict --model feddistill-out/serve --onnx "shares fell after the bank '
    'results"': _ONNX_DOC,
    'feddistill predict --model feddistill-out/serve --onnx --json "the team won the final" '
    '"new chip released"': _ONNX_DOC,
    "nice feddistill bench-serve --teacher builtin:tiny --out feddistill-out/bench-serve-tiny": (
        _ONNX_DOC
    ),
    "nice feddistill bench-serve --teacher offline:all-minilm-l6-v2 --out "
    "feddistill-out/bench-serve-minilm": _ONNX_DOC,
    "feddistill report runs/demo": (
        "tests/test_report.py::test_the_commands_of_docs_report_md_run_as_written"
    ),
    "export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 "
    "FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0": _RAY_DOC,
    "feddistill simulate --ray-address 10.0.0.1:6379 --num-clients 100 --clients-per-round 10 "
    "--rounds 20 --out runs/ray1 --set cache-dir=/shared/feddistill/cache --teacher "
    "offline:all-minilm-l6-v2 --set data.max-length=64": _RAY_DOC,
    "ray start --address 10.0.0.1:6379 --node-ip-address 10.0.0.2 --num-cpus 8 --block": _RAY_DOC,
    "ray start --head --node-ip-address 10.0.0.1 --port 6379 --num-cpus 8 "
    "--include-dashboard=false --block": _RAY_DOC,
    "ray status --address 10.0.0.1:6379": _RAY_DOC,
}


def _normal(command: str) -> str:
    return " ".join(command.split())


def fenced_blocks(text: str, where: str) -> list[tuple[str, list[str]]]:
    """(tag, lines) of every fenced block; an untagged opening fence is an error."""
    blocks: list[tuple[str, list[str]]] = []
    tag: str | None = None
    lines: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.fullmatch(r"```(\S*)\s*", line)
        if fence is None:
            if tag is not None:
                lines.append(line)
            continue
        if tag is None:
            tag = fence.group(1)
            if not tag:
                raise AssertionError(
                    f"{where}:{number}: a fenced block without a tag; tag it sh or console if "
                    "it holds commands, text (or toml, json, ...) if it does not"
                )
            lines = []
        else:
            blocks.append((tag, lines))
            tag = None
    return blocks


def _join_continuations(lines: list[str]) -> list[str]:
    out: list[str] = []
    pending = ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
        else:
            out.append(pending + line)
            pending = ""
    if pending:
        out.append(pending)
    return out


def doc_commands() -> list[tuple[str, str, list[str]]]:
    """(page, command, output lines shown) for every command in README.md and docs/."""
    found: list[tuple[str, str, list[str]]] = []
    for page in PAGES:
        found += commands_in(page.read_text(), str(page.relative_to(REPO)))
    return found


def commands_in(text: str, where: str) -> list[tuple[str, str, list[str]]]:
    """(where, command, output lines shown) for every command of one page's text."""
    found: list[tuple[str, str, list[str]]] = []
    for tag, lines in fenced_blocks(text, where):
        if tag in COMMAND_TAGS:
            for line in _join_continuations(lines):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                assert "<<" not in line, f"{where}: no heredocs in commands: {line}"
                for part in line.split(" && "):
                    found.append((where, _normal(part), []))
        elif tag == "console":
            joined = _join_continuations(lines)
            for i, line in enumerate(joined):
                if line.startswith("$ "):
                    output = []
                    for rest in joined[i + 1 :]:
                        if rest.startswith("$ "):
                            break
                        output.append(rest)
                    found.append((where, _normal(line[2:]), output))
    return found


def test_parser_reads_sh_and_console_blocks_and_refuses_untagged_fences() -> None:
    # Prepare
    page = (
        "```sh\n# a comment\nfeddistill a \\\n  --b && pytest\n```\n"
        "```console\n$ feddistill c\nprinted\n```\n"
        "```text\nfeddistill not-a-command\n```\n"
    )

    # Execute
    found = [(cmd, out) for _, cmd, out in commands_in(page, "page.md")]

    # Assert
    assert found == [("feddistill a --b", []), ("pytest", []), ("feddistill c", ["printed"])]
    with pytest.raises(AssertionError, match="without a tag"):
        commands_in("```\nfeddistill sneaky\n```\n", "page.md")


def _declared() -> set[str]:
    return {*FAST, *map(_normal, SLOW), *CI, *ELSEWHERE, *map(_normal, rendered_commands())}


def test_every_documented_command_is_declared_with_who_runs_it() -> None:
    # Prepare
    declared = _declared()

    # Execute
    untested = sorted({f"{page}: {cmd}" for page, cmd, _ in doc_commands() if cmd not in declared})

    # Assert
    assert not untested, (
        "commands in the docs that no test runs (declare each in tests/test_doc_commands.py "
        "with the test that runs it, or show it in a ```text block as an example):\n"
        + "\n".join(untested)
    )


def test_no_declared_command_is_missing_from_the_docs() -> None:
    # Prepare: the deployment templates are checked both ways by tests/deploy/.
    shown = {cmd for _, cmd, _ in doc_commands()}
    ours = {*FAST, *map(_normal, SLOW), *CI, *ELSEWHERE}

    # Execute
    stale = sorted(ours - shown)

    # Assert
    assert not stale, f"declared in tests/test_doc_commands.py but in no doc: {stale}"


def test_ci_runs_the_install_and_test_steps() -> None:
    # Prepare
    lines = {line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()}

    # Execute
    missing = sorted(line for line in CI.values() if line not in lines)

    # Assert
    assert not missing, f".ci/run no longer runs: {missing}"


def test_commands_run_elsewhere_name_an_existing_test() -> None:
    for command, node in ELSEWHERE.items():
        path, _, function = node.partition("::")
        source = REPO / path
        assert source.exists(), f"{command!r}: {path} does not exist"
        assert f"def {function}(" in source.read_text(), f"{command!r}: no {node}"


def _shown_output(command: str) -> list[str]:
    return [line for _, cmd, out in doc_commands() if cmd == command for line in out]


@pytest.mark.parametrize("command", sorted(FAST))
def test_cheap_documented_command_runs(
    command: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Prepare
    argv = shlex.split(command)
    assert argv[0] == "feddistill"

    # Execute
    try:
        rc = main(argv[1:])
    except SystemExit as stop:  # argparse's --help
        rc = int(stop.code or 0)
    captured = capsys.readouterr()

    # Assert
    assert rc == FAST[command], captured.err
    printed = (captured.out + captured.err).splitlines()
    for line in _shown_output(command):
        assert line in printed, f"the docs show {line!r} for `{command}`; it printed {printed}"


@pytest.mark.slow
def test_slow_documented_commands_run_in_order(tmp_path: Path) -> None:
    # Prepare
    env = {
        **os.environ,
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": str(REPO),
    }

    for command in SLOW:
        argv = shlex.split(command)
        argv[0] = str(BIN / argv[0])

        # Execute
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)

        # Assert
        assert done.returncode == 0, f"`{command}` failed:\n{done.stdout[-3000:]}{done.stderr}"
    assert (tmp_path / "runs" / "default" / "results.json").is_file()
    assert (tmp_path / "runs" / "default" / "export" / "export.json").is_file()
