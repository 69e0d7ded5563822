"""docs/deploy.md shows exactly the commands the deployment tests run (no processes started)."""

from __future__ import annotations

from tests.deploy.federation import (
    TEMPLATES,
    command,
    config_toml,
    doc_commands,
    offline_env,
    rendered_commands,
)


def test_every_doc_command_is_one_the_deploy_tests_run() -> None:
    # Each template's doc rendering is in the doc (command() asserts it) ...
    for name in TEMPLATES:
        if name != "env":
            command(name)
    command("run", resume=" resume=true")
    config_toml()
    assert offline_env()["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    # ... and the doc has no command beyond them.
    rendered = rendered_commands()
    untested = [c for c in doc_commands() if c not in rendered]
    assert not untested, f"docs/deploy.md has commands no test runs: {untested}"
