"""``--config FILE``: a command's flags from a YAML or TOML file, overridden by the command line.

The keys are the flags' names, with dashes or underscores (``max-steps`` or ``max_steps``; ``rslora``
or its destination ``use_rslora``); a list gives a flag that takes several values or repeats
(``data: [a.jsonl, b.jsonl]``, ``task: [a=a.txt, b=b.txt]``); ``true``/``false`` give a switch.
Every value is turned back into the flag's own text and checked by the flag's own argparse type,
so a bad value gets the same error as on the command line. Paths are read as on the command line:
relative to the working directory. Only argparse and the standard library here (and PyYAML for a
YAML file), so ``jlora --help`` still loads no JAX.
"""

from __future__ import annotations

import argparse
import difflib
import tomllib
from pathlib import Path

from jlora.core import files

SKIPPED = {"help", "config", "resume"}  # never written into a run's config.yaml


def read(path) -> dict:
    """The mapping a ``.yaml``/``.yml`` or ``.toml`` file holds.

    Raises:
      ValueError: naming the file, when it is missing, unparsable, or not a mapping of keys to values.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ValueError(f"config file {path}: the name must end in .yaml, .yml or .toml, to say how to read it")
    text = files.read_text(path, ValueError)
    try:
        if suffix == ".toml":
            values = tomllib.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as error:  # yaml.YAMLError, tomllib.TOMLDecodeError, a RecursionError
        raise ValueError(f"config file {path} does not parse: {files.reason(error)}") from None
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} holds a {type(values).__name__}; it must be a mapping of flag names to values")
    return values


def apply(command: argparse.ArgumentParser, values: dict, path) -> dict:
    """Makes ``values`` (a config file's mapping) the defaults of ``command``'s flags, so that flags
    on the command line override them.

    Args:
      command: the subcommand's parser (``jlora.cli.parser().commands[name]``).
      values: the file's mapping.
      path: the file, for error messages.

    Returns:
      The values of repeatable flags (``--task``, ``--checkpoint``): a default would be appended
      to rather than replaced, so the caller fills them in only where the command line gave none.

    Raises:
      ValueError: for an unknown key (naming the closest flag), a positional argument, or a value
        its flag's type refuses (with the flag's own message).
    """
    actions = _flags(command)
    late, defaults = {}, {}
    for key, value in values.items():
        action = actions.get(str(key).replace("-", "_"))
        if action is None:
            raise ValueError(_unknown(key, command, actions, path))
        if value is None:
            if action.default is not None:
                raise ValueError(f"{path}: {key}: null is not a value of {action.option_strings[0]}; "
                                 f"leave the key out for its default, {action.default!r}")
            defaults[action.dest] = None
            continue
        parsed = _parse(command, action, _tokens(action, value, key, path), key, path)
        (late if isinstance(action, argparse._AppendAction) else defaults)[action.dest] = parsed
    command.set_defaults(**defaults)
    return late


def dump(args: argparse.Namespace) -> str:
    """Every flag's final value as YAML, in the order ``--help`` lists them: ``--config`` this text
    to run the same command again (``--resume`` is left out: it is what to do, not how).

    Example:
      >>> from jlora.cli import parse
      >>> text = dump(parse(["eval", "--seq-len", "64", "--data", "a.txt", "b.txt"]))
      >>> print(text[text.index("data:"):text.index("batch_size:")], end="")
      data:
      - a.txt
      - b.txt
      seq_len: 64
    """
    import yaml

    from jlora.cli import parser

    command = parser().commands[args.command]
    values = {action.dest: getattr(args, action.dest) for action in command._actions
              if action.option_strings and action.dest not in SKIPPED}
    return yaml.safe_dump(values, sort_keys=False, default_flow_style=False, allow_unicode=True)


def _flags(command: argparse.ArgumentParser) -> dict:
    """Each optional flag by every key that may name it: its destination and its long name."""
    names = {}
    for action in command._actions:
        if action.dest in ("help", "config") or not action.option_strings:
            continue
        for name in [action.dest] + [s.lstrip("-") for s in action.option_strings[:1]]:
            names[name.replace("-", "_")] = action
    return names


def _unknown(key, command, actions, path) -> str:
    if str(key).replace("-", "_") == "config":
        return f"{path}: a config file cannot name another config file"
    positional = {a.dest for a in command._actions if not a.option_strings}
    if key in positional:
        return f"{path}: {key} is given on the command line ({command.prog} ... {key.upper()}), not in a config file"
    optional = sorted(actions)
    close = difflib.get_close_matches(str(key).replace("-", "_"), optional, n=1, cutoff=0.6)
    hint = (f"did you mean {close[0]} ({actions[close[0]].option_strings[0]})?" if close
            else f"the keys of {command.prog} are {', '.join(sorted({a.dest for a in actions.values()}))}")
    return f"{path}: unknown key {key!r}; {hint}"


def _tokens(action, value, key, path) -> list[str]:
    """``value`` as the command-line words that would give it."""
    flag = action.option_strings[0]
    if action.nargs == 0:  # a switch
        if not isinstance(value, bool):
            raise ValueError(f"{path}: {key}: {flag} is a switch; give true or false, not {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return [flag if value else action.option_strings[1]]
        return [flag] if value else []
    if isinstance(value, dict):
        raise ValueError(f"{path}: {key}: {flag} takes a value, not a table of {', '.join(map(str, value))}")
    if isinstance(value, bool):
        raise ValueError(f"{path}: {key}: {flag} takes a value, not {str(value).lower()}")
    many = action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)
    if isinstance(value, list) and not many:
        raise ValueError(f"{path}: {key}: {flag} takes one value, not a list")
    words = [str(v) for v in (value if isinstance(value, list) else [value])]
    if isinstance(action, argparse._AppendAction):
        return [w for word in words for w in (flag, word)]
    if action.nargs == "?" and value == action.const:
        return [flag]
    return [flag, *words]


def _parse(command, action, tokens, key, path):
    """The value ``tokens`` give ``action``, through a parser of that flag alone (its type, choices
    and nargs); its message when they are refused."""
    alone = argparse.ArgumentParser(prog=command.prog, add_help=False, exit_on_error=False)
    alone._add_action(action)
    try:
        parsed, extra = alone.parse_known_args(tokens)
    except argparse.ArgumentError as error:
        raise ValueError(f"{path}: {key}: {error}") from None
    if extra:
        raise ValueError(f"{path}: {key}: {action.option_strings[0]} does not take {' '.join(extra)}")
    return getattr(parsed, action.dest, action.default)
