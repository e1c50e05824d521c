"""`ddm --help`: every flag of every command has a help line, every default shows, and `--version` works."""
import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ddm
from frontends.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]


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


SCRIPTS = sorted((ROOT / "scripts").glob("*.py")) + [ROOT / "app.py"]


def flags_without_help(help_text: str) -> list[str]:
    """Option entries of an argparse --help text that carry no help line."""
    entries, current = [], None
    for line in help_text.splitlines():
        if re.match(r"^  -", line):
            current = [line]
            entries.append(current)
        elif current is not None and re.match(r"^ {3,}\S", line):
            current.append(line)
        else:
            current = None
    return [e[0].strip() for e in entries if len(re.split(r"\s{2,}", e[0].strip())) == 1 and len(e) == 1]


def test_the_checker_finds_a_flag_without_help():
    text = "options:\n  -h, --help  show this\n  --k K\n  --steps STEPS  Euler steps (default: 5)\n"
    assert flags_without_help(text) == ["--k K"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_script_flag_has_help_and_defaults_show(script):
    run = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-1000:]
    assert flags_without_help(run.stdout) == [], f"{script.name}: flags without a help line"
    assert "(default:" in " ".join(run.stdout.split()), f"{script.name}: --help shows no defaults"
