"""The `relay` command's parser: every command and option explains itself,
and `relay` alone (or a command group alone) lists what there is to run."""

from __future__ import annotations

import argparse

import pytest

from relay import cli


def walk(parser: argparse.ArgumentParser, path: str = "relay"):
    """(command path, action, its help) for every option, argument and
    subcommand of the tree, -h/--help left out."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield path, f"command {name}", helps.get(name)
                yield from walk(sub, f"{path} {name}")
        else:
            yield path, "/".join(action.option_strings) or action.dest, action.help


def test_every_command_and_flag_has_help_text():
    entries = list(walk(cli.build_parser()))
    assert len(entries) > 100  # the whole tree was walked
    missing = [(path, what) for path, what, text in entries if not (text and text.strip())]
    assert missing == []


def group_commands(parser: argparse.ArgumentParser, *path: str) -> list[str]:
    for name in path:
        [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = sub.choices[name]
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return list(sub.choices)


@pytest.mark.parametrize("argv", [[], ["archive"], ["db"], ["seller"], ["report"]])
def test_a_command_group_alone_prints_usage_and_its_commands(argv, capsys):
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"usage: relay {' '.join(argv)}".rstrip() + " ")
    commands = group_commands(cli.build_parser(), *argv)
    assert commands
    for name in commands:
        assert f"\n    {name} " in err or f"\n    {name}\n" in err, name


def test_a_bad_command_is_still_one_line(capsys):
    assert cli.main(["nosuch"]) == 2
    _, err = capsys.readouterr()
    assert err.startswith("relay: argument COMMAND: invalid choice: 'nosuch'") and err.count("\n") == 1
