"""docs/configuration.md is generated from feddistill/config.py and must stay equal to it."""

from __future__ import annotations

from pathlib import Path

import pytest

from feddistill.cli import main
from feddistill.config import DESCRIPTIONS, known_keys, reference, reference_markdown

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
REGENERATE = "regenerate it with: feddistill config --markdown > docs/configuration.md"


def test_every_key_has_one_description_and_no_description_is_stale() -> None:
    # Prepare
    keys = set(known_keys())

    # Execute
    missing = sorted(keys - set(DESCRIPTIONS))
    stale = sorted(set(DESCRIPTIONS) - keys)

    # Assert
    assert not missing, f"add a line for each to feddistill.config.DESCRIPTIONS: {missing}"
    assert not stale, f"DESCRIPTIONS names keys that no longer exist: {stale}"


def test_reference_reads_allowed_values_from_the_validators() -> None:
    # Execute
    rows = {row["key"]: row for row in reference()}

    # Assert
    assert rows["data.partitioning"]["allowed"] == "`iid`, `dirichlet`, `shards`"
    assert rows["data.alpha"]["allowed"] == "(0, inf]"
    assert rows["rounds"]["type"] == "int" and rows["rounds"]["default"] == "30"
    assert rows["data.source"]["allowed"].startswith("'embedded'")
    assert rows["data.text-column"]["allowed"] == "any string"
    assert "topk:F" in rows["compression.uplink"]["allowed"]


def test_docs_configuration_md_equals_the_generated_reference() -> None:
    # Execute
    generated = reference_markdown()

    # Assert
    assert DOC.exists(), f"docs/configuration.md is missing; {REGENERATE}"
    assert DOC.read_text() == generated, (
        f"docs/configuration.md differs from the code; {REGENERATE}"
    )


def test_config_markdown_command_prints_the_reference(capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    rc = main(["config", "--markdown"])

    # Assert
    assert rc == 0
    assert capsys.readouterr().out == reference_markdown()
