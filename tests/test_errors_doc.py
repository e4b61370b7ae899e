"""docs/errors.md stays true: every test it names exists (with its parametrized case), and every quoted message
excerpt is still produced by the code (or by argparse, for invalid choices)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = [REPO / "train_dp_ldm.py", *sorted((REPO / "dp_diffusers").rglob("*.py")), *(REPO / "examples").glob("*.py")]


def rows() -> list[tuple[str, str]]:
    """``(message excerpts, test id)`` of every catalogue row."""
    found = []
    for line in (REPO / "docs" / "errors.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].isdigit():
            found.append((cells[1], cells[3].strip("`")))
    return found


def test_the_catalogue_has_at_least_25_entries_each_with_a_test():
    assert len(rows()) >= 25
    assert len({test for _, test in rows()}) >= 25


def test_every_named_test_exists():
    for _, test in rows():
        path, _, name = test.partition("::")
        function, _, case = name.partition("[")
        source = (REPO / path).read_text()
        assert re.search(rf"^def {re.escape(function)}\(", source, re.M), test
        if case:
            assert f'"{case.rstrip("]")}":' in source, test


def _joined(text: str) -> str:
    return " ".join(text.replace('"\n', "").replace('" "', "").split())  # implicitly concatenated strings joined


def test_every_quoted_message_is_still_produced_or_asserted():
    """Each excerpt is in the code that raises it, or asserted by its test (messages built from flag tables)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_dp_ldm_for_errors_doc", REPO / "train_dp_ldm.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    from dp_diffusers.errors import cli_message, parser_flags

    flags = parser_flags(script.build_parser(), **script.RENAMED_PARAMETERS)
    # Library messages name parameters (`max_grad_norm`); the catalogue quotes what the script prints.
    code = cli_message(_joined("\n".join(p.read_text() for p in SOURCES)), flags)
    for message, test in rows():
        asserted = _joined((REPO / test.partition("::")[0]).read_text())
        for excerpt in re.findall(r"`([^`]+)`", message):
            if "invalid choice" in excerpt:  # argparse's own wording
                continue
            for part in (p.strip() for p in excerpt.split("...") if p.strip()):
                assert part in code or part in asserted, (part, test)
