"""What the command-line tools share: a bad command line is one `error:` line and exit status 2.

absl prints a bad flag as 'FATAL Flags parsing error' (exit 1), and an unknown config field
(`--config.data.rot=X`) escapes it as a 50-line ml_collections traceback; `parse_flags` turns
both, and a config file that cannot be loaded, into one line naming the flag. `ArgumentParser`
does the same for the argparse tools (explain, plot).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import traceback
from typing import Any, NoReturn

from absl import flags

EXIT_REFUSED = 2  # refused before any compute
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C
EXIT_PEER_FAILED = 5  # another process of the multi-process run failed or was killed


def refuse(message: object) -> NoReturn:
    """Prints `error: message` to stderr and exits with `EXIT_REFUSED`."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_REFUSED)


def stopped(error: BaseException, left: str) -> str:
    """The one line of a command stopped by `error` (whose message says why and what to do),
    followed by `left`, what the run left to resume from, as a sentence of its own."""
    return f"error: {error} {left[:1].upper()}{left[1:]}"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose refusals are one `error:` line with exit status 2 (no usage block), as
    the absl CLIs' (`parse_flags`). A file whose name starts with '-' (Kinetics ids often do:
    `-abc_000010_000020.mp4`) is read by argparse as a flag; the refusal then says how to
    write it."""

    _argv: tuple[str, ...] = ()

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        """argparse's parse, keeping the command line for `error`."""
        self._argv = tuple(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        """argparse's hook for a bad command line: `refuse(message)`."""
        argv = self._argv[: self._argv.index("--")] if "--" in self._argv else self._argv
        dashed = [
            a
            for a in argv
            if a.startswith("-")
            and a.split("=")[0] not in self._option_string_actions
            and os.path.exists(a)
        ]
        if dashed:
            message += (
                f"; {dashed[0]} was read as a flag, as its name starts with '-': write it as "
                f"./{dashed[0]} (or put -- before it)"
            )
        refuse(message)


def _innermost_text(error: BaseException) -> str:
    """The text of an exception that wraps others as its argument (ml_collections does)."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    if error.args and isinstance(error.args[0], str):
        return error.args[0]
    return str(error)


def _config_fields_named(config: Any, name: str, prefix: str = "") -> list[str]:
    """The dotted paths of the fields of `config` (nested) whose own name is `name`."""
    try:
        items = list(config.items())
    except (AttributeError, TypeError):  # no config loaded, or not a ConfigDict
        return []
    found = []
    for key, value in items:
        path = f"{prefix}{key}"
        if key == name:
            found.append(path)
        if hasattr(value, "items") and not isinstance(value, str):
            found += _config_fields_named(value, name, f"{path}.")
    return found


def _fields_at(config: Any, flag: str) -> str | None:
    """The fields of the config node that `flag` (--config.a.b.name) sets a field of, listed."""
    node = config
    for part in flag.split(".")[1:-1]:
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return None
    try:
        names = sorted(node.keys())
    except AttributeError:
        return None
    parent = flag.rsplit(".", 1)[0]
    return f"The fields of {parent} are {', '.join(names)}."


def flag_error_message(error: BaseException, argv: list[str], config: Any = None) -> str:
    """One line saying which flag is wrong and how, from an error raised while parsing `argv`
    (`config`: the loaded run config, to list the valid fields where no close one is found)."""
    text = _innermost_text(error)
    if "Traceback (most recent call last)" in text:  # a config file that raised
        head = text.split("Traceback")[0].strip().rstrip(":")
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        if "get_config() takes 0 positional arguments" in last:  # FILE.py:ARG, no ARG taken
            flag = re.search(r"flag --config=(\S+?):([^\s:]*):", head)
            if flag:
                return (
                    f"--config={flag.group(1)}:{flag.group(2)}: {flag.group(1)} has one run and "
                    f"takes no ':{flag.group(2)}'; write --config={flag.group(1)}."
                )
        return f"{head}: {last}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Failed loading config file" in text:  # a missing or unreadable --config file
        return f"cannot load the --config file: {lines[-1]}"
    if isinstance(error, KeyError | AttributeError) and lines:
        # ml_collections: "'rot'" then 'Did you mean "root" instead of "rot"?'.
        field = lines[0].strip("'\"")
        used = [
            a.split("=", 1)[0]
            for a in argv[1:]
            if a.startswith("--config.") and field in a.split("=", 1)[0].split(".")
        ]
        where = f" ({used[0]})" if used else ""
        hint = f" {' '.join(lines[1:])}" if len(lines) > 1 else ""
        if not hint and used and config is not None:
            fields = _fields_at(config, used[0])
            hint = f" {fields}" if fields else ""
        return f"unknown config field {field!r}{where}.{hint}"
    return " ".join(lines) or type(error).__name__


def _flag_list(flag_values: flags.FlagValues) -> str:
    """The program's own flags (not absl's, nor the config's fields), as `--a, --b`."""
    own = sorted(
        flag.name
        for module, module_flags in flag_values.flags_by_module_dict().items()
        if not module.startswith("absl.")
        for flag in module_flags
        if "." not in flag.name
    )
    return ", ".join(f"--{name}" for name in dict.fromkeys(own))


def _config_spec(argv: list[str]) -> str | None:
    """The `FILE[:ARG]` of `--config` in `argv` (None without one)."""
    spec = None
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
    return spec or None


def _load_config_file(spec: str) -> Any:
    """Runs `FILE[:ARG]`'s `get_config(ARG)`, as ml_collections does (its errors raised)."""
    path, _, arg = spec.partition(":")
    loader = importlib.util.spec_from_file_location("_stam_run_config", path)
    if loader is None:
        raise OSError(f"not a Python file: {path}")
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise _NoGetConfig(path)
    return module.get_config(arg) if arg else module.get_config()


class _NoGetConfig(Exception):
    """A --config file that defines no `get_config()`."""


def _config_file_default(argv: list[str]) -> Any:
    """The run config that `--config FILE[:ARG]` in `argv` defines, before any override (None
    if there is none or it does not load): what an unknown field's message lists from."""
    spec = _config_spec(argv)
    if not spec:
        return None
    try:
        return _load_config_file(spec)
    except Exception:  # reported by the parse itself
        return None


# The configs' own package, for the fields every run config has (None where it cannot be
# imported: stam-jax installed without its repository).
def _base_fields() -> set[str] | None:
    """Every field's dotted name of a run config built on `configs.common.base_config`."""
    try:
        from configs.common import base_config
    except ImportError:
        return None
    return set(_flat_names(base_config("stam_16")))


def _flat_names(config: Any, prefix: str = "") -> list[str]:
    """The dotted names of a ConfigDict's leaf fields."""
    names = []
    for key, value in config.items():
        if hasattr(value, "keys") and not isinstance(value, dict):
            names += _flat_names(value, f"{prefix}{key}.")
        else:
            names.append(f"{prefix}{key}")
    return names


def config_file_problem(argv: list[str]) -> str | None:
    """Why the `--config` file in `argv` cannot be a run config, as one line (None when it
    loads and has every field; a missing or unreadable file, and a TypeError or ValueError
    raised in it, are left to the flag parse, which names them).

    A file that does not compile or raises (a NameError, an ImportError, ...) is named with
    the line that raised; one that defines no `get_config()`, or whose `get_config()`
    returns something else than a ConfigDict, is named as such; one that lacks fields every
    run config has (written for an older stam-jax, or from scratch) lists them and how to
    build it on `configs.common.base_config`, which sets them all.
    """
    spec = _config_spec(argv)
    if not spec:
        return None
    path = spec.partition(":")[0]
    flag = f"--config={spec}"
    fix = "(configs/stam_16.py shows the form)"
    try:
        config = _load_config_file(spec)
    except (OSError, TypeError, ValueError):
        return None
    except _NoGetConfig:
        return (
            f"{flag} defines no get_config(); a run config file defines get_config() "
            f"returning the run config (an ml_collections.ConfigDict) {fix}."
        )
    except SyntaxError as e:
        return f"{flag} does not compile: {e.msg} (line {e.lineno}); fix it {fix}."
    except Exception as e:
        frames = [
            frame
            for frame in traceback.extract_tb(e.__traceback__)
            if os.path.realpath(frame.filename) == os.path.realpath(path)
        ]
        if not frames:  # raised elsewhere than in the file: the parse reports it
            return None
        where = f"line {frames[-1].lineno}"
        if isinstance(e, ImportError) and e.name == "configs":
            return (
                f"{flag} imports {e.name} ({where}), which Python finds from the "
                "repository's root: run the command there, or put the root on PYTHONPATH."
            )
        return f"{flag} raised {type(e).__name__}: {e} ({where}); fix it {fix}."
    if not hasattr(config, "keys") or isinstance(config, dict):
        return (
            f"{flag}: its get_config() returned "
            f"{'None' if config is None else type(config).__name__}, not a run "
            f"config (an ml_collections.ConfigDict); return the config it builds {fix}."
        )
    base = _base_fields()
    missing = sorted(base - set(_flat_names(config))) if base else []
    if missing:
        shown = ", ".join(missing[:12]) + (f" and {len(missing) - 12} more" if missing[12:] else "")
        return (
            f"{flag}: the run config lacks fields every stam-jax run config has: {shown}; "
            "build it on configs.common.base_config(MODEL), which sets each to its default, "
            "and change only what differs (as configs/stam_16.py does)."
        )
    return None


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """An absl `flags_parser` for `app.run`: a bad flag exits 2 with one `error:` line.

    Also loads the `--config` file now, so that one that cannot be loaded is reported the same
    way, and refuses stray positional arguments (all options are --flags).

    Args:
      argv: the command line, program name first.
      flag_values: the flags to parse into (absl's global `FLAGS` for the CLIs).

    Returns:
      The arguments left after the flags (the program name).
    """
    if "config" in flag_values:
        problem = config_file_problem(argv)
        if problem:
            refuse(problem)
    try:
        rest = flag_values(argv)
        if "config" in flag_values:
            config = flag_values["config"].value  # config_flags loads the file lazily
            if config is not None:
                config.keys()  # one that failed to load raises on first use, not before
    except (flags.Error, AttributeError, KeyError, OSError, TypeError, ValueError) as e:
        missing = re.search(r"Flag --(\w+) must have a value other than None", str(e))
        if missing and missing.group(1) in flag_values:  # absl: "flag --x=None: Flag --x must..."
            name = missing.group(1)
            refuse(f"--{name} is required: {flag_values[name].help} (--{name}=...).")
        early = re.search(r"Found (--config\.[\w.]+)\S* in argv before a value for", str(e))
        if early:
            refuse(f"{early.group(1)} comes before --config: name the config file first.")
        unknown = re.search(r"Unknown command line flag '([\w.-]+)'", str(e))
        if unknown and "config" in flag_values:
            name = unknown.group(1)
            if name.startswith("config.") and flag_values["config"].value is None:
                refuse(
                    f"--{name} sets a field of the run config, but no --config was given: "
                    f"name it first, e.g. --config configs/stam_16.py --{name}=..."
                )
            if not name.startswith("config."):
                config = flag_values["config"].value
                fields = _config_fields_named(config, name)
                if config is None:
                    hint = "after --config, e.g. --config configs/stam_16.py"
                elif fields:
                    hint = f"did you mean {' or '.join(f'--config.{f}' for f in fields)}?"
                else:
                    hint = f"the run config has no field named {name!r}"
                refuse(
                    f"unknown flag --{name}; the flags are {_flag_list(flag_values)}, and the "
                    f"run config's fields are set as --config.FIELD ({hint})."
                )
        refuse(flag_error_message(e, argv, _config_file_default(argv)))
    if len(rest) > 1:
        refuse(f"unexpected arguments {rest[1:]}; every option is a flag (--name=value).")
    return rest
