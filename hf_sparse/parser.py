"""The command line of a recipe script (`recipes/squad_24.py`): an `HfArgumentParser` whose defaults come from
YAML/JSON files of arguments, as trl's `TrlParser` reads `--config`, and the check that what must come from the Hub
can, made before anything runs.

The defaults, lowest first: a preset (`--preset NAME`, a file the recipe ships), then a config file given as the
first argument (its values over the preset's); with neither, the recipe's default file (which may depend on the flags
given). The command line's flags override them all. Every key and value of a file is checked against the flags.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

__all__ = ["RecipeParser", "check_hub_sources"]

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The script's docstring as written, and every argument's default."""


class RecipeParser(HfArgumentParser):
    """`HfArgumentParser` with defaults from a preset, a config file and the recipe's default file.

    Args:
        dataclass_types: the recipe's argument dataclasses (one of them with a `preset` field).
        presets: preset name -> YAML/JSON file of arguments.
        default_file: with neither preset nor config file, the file of defaults for the flags given (a mapping of
            argument name to value, as parsed from the command line).
        linked: pairs (leaders, followers) of argument names whose values belong together, e.g. the dense
            fine-tuning's length and the recovery's: where a file or the command line sets a leader and no follower,
            the followers a lower layer set are reset to None.
        description, epilog: the `--help` text (the defaults shown are those in effect for the command line).

    Example:

    ```python
    >>> parser = RecipeParser((RecipeArguments, TrainingArguments), presets={"tutorial": HERE / "tutorial.yaml"},
    ...                       default_file=lambda given: HERE / "offline.yaml", description=__doc__)
    >>> args, training_args = parser.parse(sys.argv[1:])
    ```
    """

    def __init__(
        self,
        dataclass_types: Sequence[type],
        *,
        presets: Mapping[str, Path],
        default_file: Callable[[dict[str, Any]], Path],
        linked: Sequence[tuple[Sequence[str], Sequence[str]]] = (),
        description: str | None = None,
        epilog: str | None = None,
    ):
        super().__init__(dataclass_types, description=description, epilog=epilog, formatter_class=_HelpFormatter)
        self._types, self.presets, self.default_file = tuple(dataclass_types), dict(presets), default_file
        self.linked = tuple(linked)

    def given(self, argv: Sequence[str]) -> dict[str, Any]:
        """The arguments `argv` sets explicitly, by the parser's own rules (`--flag=value`, `--flag-name`, ...)."""
        probe, unset = HfArgumentParser(self._types), object()
        probe.set_defaults(**{a.dest: unset for a in probe._actions if a.dest != argparse.SUPPRESS})
        namespace, _ = probe.parse_known_args([a for a in argv if a not in ("-h", "--help")])
        return {name: value for name, value in vars(namespace).items() if value is not unset}

    def read_config(self, path: Path) -> dict[str, Any]:
        """The arguments of a YAML/JSON file, every key and value checked against the flags."""
        with open(path) as f:
            values = yaml.safe_load(f) if path.suffix in (".yaml", ".yml") else json.load(f)
        if not isinstance(values, dict):
            raise SystemExit(f"{path}: a config file holds one mapping of argument names to values.")
        if "preset" in values:
            raise SystemExit(f"{path}: 'preset' cannot be used in a config file; write the values out instead.")
        actions = {a.dest: a for a in self._actions if a.dest not in (argparse.SUPPRESS, "help")}
        for key, value in values.items():
            if key not in actions:
                close = difflib.get_close_matches(str(key), actions, n=3, cutoff=0.6)
                hint = (
                    f"did you mean {' or '.join(map(repr, close))}?" if close else "it is no argument of the recipe."
                )
                raise SystemExit(
                    f"{path}: unknown key {key!r}: {hint} Keys are the recipe's flags without the leading dashes "
                    f"({Path(sys.argv[0]).name} --help lists them)."
                )
            _check_value(path, actions[key], value)
        return values

    def defaults(self, argv: list[str]) -> dict[str, Any]:
        """The defaults in effect for `argv` (from which a leading config file is taken), lowest first: the preset,
        the config file, or else the default file; then the linked values that `argv`'s flags reset."""
        config = Path(argv.pop(0)).resolve() if argv and argv[0].endswith(CONFIG_SUFFIXES) else None
        given = self.given(argv)
        preset = given.get("preset")
        if preset is not None and preset not in self.presets:
            raise SystemExit(f"--preset {preset!r} is unknown; choose one of {list(self.presets)} or leave it out.")
        files = [f for f in (self.presets.get(preset), config) if f is not None] or [self.default_file(given)]
        defaults: dict[str, Any] = {}
        for path in files:
            defaults = self._over(defaults, self.read_config(path))
        return self._over(defaults, given)

    def _over(self, lower: dict[str, Any], upper: dict[str, Any]) -> dict[str, Any]:
        """`upper`'s values over `lower`'s, and the followers of a leader `upper` sets alone reset to None."""
        merged = {**lower, **upper}
        for leaders, followers in self.linked:
            if any(k in upper for k in leaders) and not any(k in upper for k in followers):
                merged.update(dict.fromkeys(followers))
        return merged

    def parse(self, argv: Sequence[str] | None = None) -> tuple:
        """The dataclasses of `argv` (default `sys.argv[1:]`): its flags over the defaults in effect."""
        argv = list(sys.argv[1:] if argv is None else argv)
        self.set_defaults(**self.defaults(argv))
        return self.parse_args_into_dataclasses(argv)


def _check_value(path: Path, action: argparse.Action, value: Any) -> None:
    """Fails naming the file and the key when `value` is not one the flag accepts."""
    values = value if isinstance(value, list) and action.nargs in ("+", "*") else [value]
    for item in values:
        if item is None:
            continue
        try:
            converted = action.type(item if isinstance(item, str) else str(item)) if action.type else item
        except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
            raise SystemExit(f"{path}: {action.dest}: {item!r} is not a valid value ({err}).") from None
        if action.choices is not None and converted not in action.choices:
            choices = [getattr(c, "value", c) for c in action.choices]
            raise SystemExit(f"{path}: {action.dest}: {item!r} is not one of {choices}.")


def check_hub_sources(needed: Sequence[tuple[str, str]], advice: str) -> None:
    """Fails at once, before anything runs, when sources that must come from the Hub cannot (offline, or the Hub
    unreachable) and are not in the local cache.

    Args:
        needed: (what, name) of each source, e.g. `("model", "bert-base-cased")` or `("dataset", "squad")`; a name
            that is a local path is never needed from the Hub and is passed over.
        advice: what to pass instead, appended to the error.
    """
    needed = [(what, name) for what, name in needed if name and not os.path.exists(name)]
    if not needed:
        return
    from huggingface_hub import constants

    reason = None
    if constants.HF_HUB_OFFLINE:
        reason = "HF_HUB_OFFLINE is set"
    else:
        import socket
        from urllib.parse import urlparse

        host = urlparse(constants.ENDPOINT).hostname
        try:
            socket.create_connection((host, 443), timeout=5).close()
        except OSError as err:
            reason = f"{host} cannot be reached ({err})"
    if reason is None:
        return
    missing = [(what, name) for what, name in needed if what == "dataset" or not _cached_model(name)]
    if missing:
        listed = ", ".join(f"{what} '{name}'" for what, name in missing)
        raise SystemExit(f"{listed} must come from the Hub, but {reason}. {advice}")


def _cached_model(name: str) -> bool:
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name, local_files_only=True)
    except OSError:
        return False
    return True
