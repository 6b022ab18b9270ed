"""Every `--help` screen has examples (an epilog running `mergelab ...`) and every option a help text."""

from __future__ import annotations

import argparse

import pytest

from mergelab.cli.main import build_parser, main


def parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """The top-level parser and every subcommand's, recursively, with their command lines."""
    out = []
    todo = [("mergelab", build_parser())]
    while todo:
        name, parser = todo.pop()
        out.append((name, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += [(f"{name} {sub}", p) for sub, p in action.choices.items()]
    return out


def test_every_option_has_help_and_every_subcommand_examples() -> None:
    found = parsers()
    assert len(found) >= 14  # mergelab, merge, plan, methods, continual (+4), zoo (+2), eval, experiment, report
    for name, parser in found:
        for action in parser._actions:
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help text"
        if isinstance(parser, argparse.ArgumentParser) and not any(
                isinstance(a, argparse._SubParsersAction) for a in parser._actions):
            assert parser.epilog and parser.epilog.count(f"  {name}") >= 2, f"{name}: fewer than 2 examples"
            assert parser.formatter_class is argparse.RawDescriptionHelpFormatter, name


@pytest.mark.parametrize("argv", [["merge", "--help"], ["continual", "add", "--help"], ["zoo", "list", "--help"]])
def test_help_screens_show_the_examples(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "examples:\n  mergelab " + " ".join(argv[:-1]) in out
