"""Shell completion scripts generated from an argparse parser, so they never drift from it."""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SHELLS = ("bash", "zsh")
COMPLETION_HELP = "print a completion script for SHELL: add `source <(PROGRAM completion SHELL)` to ~/.bashrc or ~/.zshrc"


@dataclass(frozen=True)
class CommandShape:
    """What completion needs from one parser: its options, which of them take a value (with the
    choices of that value, if fixed), and the words its positional arguments may be."""

    options: tuple[str, ...]
    value_options: Mapping[str, tuple[str, ...]]
    positional_words: tuple[str, ...]


def _words(choices: object) -> tuple[str, ...]:
    return tuple(str(choice) for choice in choices) if choices is not None else ()  # type: ignore[attr-defined]


def command_shape(parser: argparse.ArgumentParser, extra_words: Sequence[str] = ()) -> CommandShape:
    options: list[str] = []
    value_options: dict[str, tuple[str, ...]] = {}
    positional_words: list[str] = list(extra_words)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            positional_words.extend(action.choices)
            continue
        if action.option_strings:
            if action.help is argparse.SUPPRESS:
                continue
            options.extend(action.option_strings)
            if action.nargs != 0:
                for option in action.option_strings:
                    value_options[option] = _words(action.choices)
        else:
            positional_words.extend(_words(action.choices))
    return CommandShape(tuple(options), value_options, tuple(dict.fromkeys(positional_words)))


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _quote_words(words: Sequence[str]) -> str:
    return shlex.quote(" ".join(words))


def _function_name(program: str) -> str:
    return "_" + re.sub(r"[^A-Za-z0-9_]", "_", program) + "_complete"


def bash_script(parser: argparse.ArgumentParser, program: str, positional_words: Mapping[str, Sequence[str]] | None = None) -> str:
    """A bash completion script for `program`: its commands, each command's options, the fixed
    choices of option values and positional arguments, and `positional_words` for a command's
    positionals (e.g. scenario names). Anything else completes file names (complete -o default)."""
    extra = positional_words or {}
    top = command_shape(parser)
    commands = {name: command_shape(sub, extra.get(name, ())) for name, sub in subcommands(parser).items()}
    function = _function_name(program)
    lines = [
        f"# {program} completion for bash, generated from its argument parser by `{program} completion bash`.",
        f"{function}() {{",
        "    local cur prev command word index options words",
        '    cur="${COMP_WORDS[COMP_CWORD]}"',
        '    prev=""',
        '    (( COMP_CWORD > 0 )) && prev="${COMP_WORDS[COMP_CWORD-1]}"',
        '    command=""',
        "    for (( index = 1; index < COMP_CWORD; index++ )); do",
        '        word="${COMP_WORDS[index]}"',
        '        case "$word" in',
    ]
    if top.value_options:
        # A value of an option before the command is not the command, even if it looks like one.
        lines.append(f"            {'|'.join(shlex.quote(option) for option in top.value_options)}) (( index++ )) ;;")
    if commands:
        lines.append(f"            {'|'.join(shlex.quote(name) for name in commands)}) command=\"$word\"; break ;;")
    lines += [
        "        esac",
        "    done",
        '    case "$command" in',
        f"        '') options={_quote_words(top.options)}; words={_quote_words(top.positional_words)} ;;",
    ]
    for name, shape in commands.items():
        lines.append(f"        {shlex.quote(name)}) options={_quote_words(shape.options)}; words={_quote_words(shape.positional_words)} ;;")
    lines += ["    esac", '    case "$command|$prev" in']
    for name, shape in [("", top), *commands.items()]:
        for option, choices in shape.value_options.items():
            # A value with fixed choices offers them; any other value offers nothing (file names).
            reply = f'COMPREPLY=( $(compgen -W {_quote_words(choices)} -- "$cur") )' if choices else "COMPREPLY=()"
            lines.append(f"        {shlex.quote(f'{name}|{option}')}) {reply}; return 0 ;;")
    lines += [
        "    esac",
        '    if [[ "$cur" == -* ]]; then',
        '        COMPREPLY=( $(compgen -W "$options" -- "$cur") )',
        "    else",
        '        COMPREPLY=( $(compgen -W "$words" -- "$cur") )',
        "    fi",
        "    return 0",
        "}",
        f"complete -o default -F {function} {shlex.quote(program)}",
        "",
    ]
    return "\n".join(lines)


def zsh_script(parser: argparse.ArgumentParser, program: str, positional_words: Mapping[str, Sequence[str]] | None = None) -> str:
    """The bash script run by zsh's bashcompinit (part of zsh): the same completions, one generator."""
    return "\n".join(
        [
            f"# {program} completion for zsh, generated from its argument parser by `{program} completion zsh`.",
            "# Load it after compinit, e.g. in ~/.zshrc:  source <(" + program + " completion zsh)",
            "autoload -U +X bashcompinit && bashcompinit",
            bash_script(parser, program, positional_words),
        ]
    )


def completion_script(shell: str, parser: argparse.ArgumentParser, program: str, positional_words: Mapping[str, Sequence[str]] | None = None) -> str:
    if shell == "bash":
        return bash_script(parser, program, positional_words)
    if shell == "zsh":
        return zsh_script(parser, program, positional_words)
    raise ValueError(f"no completion for shell {shell!r} (known: {', '.join(SHELLS)})")


def add_completion_command(commands: argparse._SubParsersAction, program: str) -> argparse.ArgumentParser:
    completion = commands.add_parser(
        "completion",
        help="print a shell completion script (bash or zsh)",
        description=COMPLETION_HELP.replace("PROGRAM", program),
    )
    completion.add_argument("shell", choices=SHELLS, help="the shell to complete for: bash or zsh")
    return completion
