"""`ddm --help`: every flag of every command has a help line, every default shows, and `--version` works."""
import argparse

import pytest

import ddm
from frontends.cli import COMMANDS, build_parser, main


def command_parsers():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_flag_has_help_and_shows_its_default(name, capsys):
    p = command_parsers()[name]
    assert issubclass(p.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    missing = [a.option_strings or a.dest for a in p._actions if not a.help]
    assert not missing, f"ddm {name}: flags without a help line: {missing}"
    text = p.format_help()
    for a in p._actions:
        if a.option_strings and a.default not in (None, False, argparse.SUPPRESS) and "default" not in a.help:
            assert f"default: {a.default}" in " ".join(text.split()), f"ddm {name} {a.option_strings[0]}: default not shown"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"ddm {ddm.__version__}"
