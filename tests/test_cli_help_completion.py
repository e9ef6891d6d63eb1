"""The three command lines explain every argument, and their completion scripts are generated from
the same parsers: every command and option is in them, bash accepts them, and they complete."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from collections.abc import Callable, Iterator

import pytest

from client import cli as client_cli
from client.completion import bash_script, completion_script, subcommands, zsh_script
from node import cli as node_cli
from node import scenario_cli
from node.scenarios import scenario_names

PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "ledger-client": client_cli.build_parser,
    "ledger-node": node_cli.build_parser,
    "ledger-scenario": scenario_cli.build_parser,
}
MAINS = {"ledger-client": client_cli.main, "ledger-node": node_cli.main, "ledger-scenario": scenario_cli.main}


def walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for name, sub in subcommands(parser).items():
        yield from walk(sub, f"{path} {name}")


def actions_without_help(parser: argparse.ArgumentParser, path: str) -> list[str]:
    missing = []
    for action in parser._actions:
        name = "/".join(action.option_strings) or action.dest
        if not action.help:
            missing.append(f"{path}: {name}")
        if isinstance(action, argparse._SubParsersAction):
            missing += [f"{path} {choice.dest}: (the command's help)" for choice in action._choices_actions if not choice.help]
    return missing


@pytest.mark.parametrize("program", PARSERS)
def test_every_argument_of_every_command_has_a_help_text(program: str) -> None:
    missing = [item for path, parser in walk(PARSERS[program](), program) for item in actions_without_help(parser, path)]
    assert not missing, "arguments without help:\n" + "\n".join(missing)


@pytest.mark.parametrize("program", PARSERS)
def test_the_bash_script_names_every_command_and_option_and_bash_accepts_it(program: str) -> None:
    parser = PARSERS[program]()
    script = bash_script(parser, program)
    for path, sub in walk(parser, program):
        assert path.split()[-1] in script, path
        for action in sub._actions:
            for option in action.option_strings:
                assert option in script, f"{path}: {option}"
    checked = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True, check=False)
    assert checked.returncode == 0, checked.stderr


def complete(script: str, words: list[str]) -> list[str]:
    """What bash offers with the cursor at the end of `words` (the last one being typed)."""
    quoted = " ".join(f"'{word}'" for word in words)
    program = f"{script}\nCOMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}\n" + (
        f"$(complete -p {words[0]} | sed 's/.*-F \\([^ ]*\\).*/\\1/')\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n"
    )
    result = subprocess.run(["bash", "-c", program], text=True, capture_output=True, check=True)
    return [line for line in result.stdout.splitlines() if line]


@pytest.mark.parametrize(
    ("program", "words", "expected"),
    [
        ("ledger-client", ["ledger-client", "tr"], ["transfer"]),
        ("ledger-client", ["ledger-client", "-c", "net/client.toml", "tx", "--sa"], ["--save"]),
        ("ledger-client", ["ledger-client", "check"], ["check-receipt"]),
        # "status" is the value of -c here, not the command.
        ("ledger-client", ["ledger-client", "-c", "status", "b"], ["balance", "block"]),
        ("ledger-client", ["ledger-client", "completion", ""], ["bash", "zsh"]),
        ("ledger-node", ["ledger-node", "--log-level", ""], ["debug", "info", "warning", "error"]),
        ("ledger-node", ["ledger-node", "simulate", "--adv"], ["--adversarial"]),
        ("ledger-scenario", ["ledger-scenario", "run", "--replicas", ""], ["4", "7"]),
        ("ledger-scenario", ["ledger-scenario", "show", "equivocating-p"], ["equivocating-primary"]),
    ],
)
def test_the_bash_script_completes(program: str, words: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert MAINS[program](["completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert complete(script, words) == expected


@pytest.mark.parametrize("program", PARSERS)
def test_the_zsh_script_is_the_bash_one_through_bashcompinit(program: str) -> None:
    parser = PARSERS[program]()
    script = zsh_script(parser, program)
    assert "bashcompinit" in script and bash_script(parser, program) in script
    if shutil.which("zsh"):
        checked = subprocess.run(["zsh", "-n"], input=script, text=True, capture_output=True, check=False)
        assert checked.returncode == 0, checked.stderr


def test_scenario_names_complete_for_run_and_show() -> None:
    names = scenario_names()
    script = completion_script("bash", scenario_cli.build_parser(), "ledger-scenario", {"run": names, "show": names})
    assert all(name in script for name in names)
