"""What the benchmark scripts' command lines share: options checked as they are read.

Each factory below returns an argparse action (`parser.add_argument("--videos",
action=whole(1))`) that turns the option's text into its value, or refuses it through
`parser.error` (with `stam_jax.cli.ArgumentParser`, one `error:` line and exit status 2) as
`--flag=TEXT: what to use`, before the script writes or computes anything. Defaults are not
checked: they are the script's own.

A script imports this module as it imports the other files of this folder (`from _args import
whole`): `python benchmarks/x.py` puts the folder first on the path.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

# The compute dtypes a stam-jax model is built with (`stam_jax.variants.parse_dtype`'s names).
MODEL_DTYPES = ("float32", "bfloat16", "float16")


class _Checked(argparse.Action):
    """An option whose text `_parse` turns into its value; a `ValueError` from it (saying what
    to use) is refused as `--flag=TEXT: message`."""

    _parse: Callable[[str], Any]
    _metavar: str | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("metavar", self._metavar)
        super().__init__(*args, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        """Stores the parsed value, or refuses the text naming the option."""
        try:
            value = type(self)._parse(values)
        except ValueError as e:
            parser.error(f"{self.option_strings[-1]}={values}: {e}")
        setattr(namespace, self.dest, value)


def checked(parse: Callable[[str], Any], metavar: str | None = None) -> type[argparse.Action]:
    """An argparse action that stores `parse(text)`; `parse` raises `ValueError(what to use)`
    for a text it refuses. `metavar`: the value's name in the help (default: the option's)."""
    return type("Checked", (_Checked,), {"_parse": staticmethod(parse), "_metavar": metavar})


def _whole(text: str, minimum: int, fix: str) -> int:
    """`text` as an int >= `minimum`, else `ValueError(fix)`."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(fix) from None
    if value < minimum:
        raise ValueError(fix)
    return value


def whole(minimum: int = 1) -> type[argparse.Action]:
    """A whole number >= `minimum` (a count: videos, repeats, a batch, a size)."""
    fix = f"use a whole number >= {minimum}"
    return checked(lambda text: _whole(text, minimum, fix))


def whole_list(minimum: int = 1) -> type[argparse.Action]:
    """A comma list of whole numbers >= `minimum` (`--batches 1,8`); stored as the text."""
    fix = f"use a comma list of whole numbers >= {minimum}"

    def parse(text: str) -> str:
        for item in text.split(","):
            _whole(item, minimum, fix)
        return text

    return checked(parse)


def even_side() -> type[argparse.Action]:
    """A side of a written H.264 video in pixels: even (the encoder's 4:2:0 needs it), >= 2."""
    fix = "use an even whole number of pixels >= 2 (H.264 needs even sides)"

    def parse(text: str) -> int:
        value = _whole(text, 2, fix)
        if value % 2:
            raise ValueError(fix)
        return value

    return checked(parse)


def number(
    minimum: float = 0.0, *, inclusive: bool = False, below: float | None = None, what: str = ""
) -> type[argparse.Action]:
    """A finite number above `minimum` (or at it, `inclusive`), and under `below` if given;
    `what` says what it counts ('seconds'), for the refusal."""
    if below is None:
        span = f"{'>=' if inclusive else '>'} {minimum:g}"
    else:
        span = f"in {'[' if inclusive else '('}{minimum:g}, {below:g})"
    fix = f"use a number {span}" + (f" ({what})" if what else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(fix) from None
        low_ok = value >= minimum if inclusive else value > minimum
        if not (math.isfinite(value) and low_ok and (below is None or value < below)):
            raise ValueError(fix)
        return value

    return checked(parse)


def one_of(choices: Iterable[str]) -> type[argparse.Action]:
    """One of `choices` (listed in the refusal in the order given)."""
    choices = tuple(choices)
    fix = f"use one of {', '.join(choices)}"

    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(fix)
        return text

    return checked(parse, "{" + ",".join(choices) + "}")


def one_of_list(choices: Iterable[str] | Callable[[], Iterable[str]]) -> type[argparse.Action]:
    """A comma list of `choices` (or of what `choices()` returns, asked only when the option
    is given); stored as the text."""

    def parse(text: str) -> str:
        known = tuple(choices() if callable(choices) else choices)
        unknown = [item for item in text.split(",") if item not in known]
        if unknown:
            raise ValueError(
                f"{', '.join(repr(u) for u in unknown)} not known; use a comma list of "
                f"{', '.join(known)}"
            )
        return text

    return checked(parse)


def _registered() -> tuple[str, ...]:
    """The registered model variants' names (imports JAX: called only for a given option)."""
    from stam_jax.variants import VARIANTS

    return tuple(VARIANTS)


def variant() -> type[argparse.Action]:
    """A registered model variant's name (`stam_jax.VARIANTS`)."""

    def parse(text: str) -> str:
        names = _registered()
        if text not in names:
            raise ValueError(f"not a registered model; use one of {', '.join(names)}")
        return text

    return checked(parse)


def variants() -> type[argparse.Action]:
    """A comma list of registered model variants' names; stored as the text."""
    return one_of_list(_registered)


def workers(allow_zero: bool = True, why_not_zero: str = "") -> type[argparse.Action]:
    """A count of decoding processes as the library takes `--config.data.workers`: -1 (one per
    core; `stam_jax.data.loader.worker_count` resolves it), 0 (in this process) or a number;
    with `allow_zero=False`, 0 is refused too (`why_not_zero` says why)."""

    def parse(text: str) -> int:
        from stam_jax.data.loader import WORKERS_RULE

        rule = WORKERS_RULE
        if not allow_zero:
            rule = "use -1 (one process per core) or a number of processes >= 1"
            rule += f" ({why_not_zero})" if why_not_zero else ""
        try:
            value = int(text)
        except ValueError:
            raise ValueError(rule) from None
        if value < -1 or (value == 0 and not allow_zero):
            raise ValueError(rule)
        return value

    return checked(parse)


def existing(kind: str = "file") -> type[argparse.Action]:
    """The path of an existing `kind` ('file' or 'folder'), stored absolute (the scripts run
    their children elsewhere). A run config's `FILE:ARG` keeps its `:ARG`."""

    def parse(text: str) -> str:
        path, colon, arg = text.partition(":") if kind == "file" else (text, "", "")
        found = Path(path).is_file() if kind == "file" else Path(path).is_dir()
        if not found:
            raise ValueError(f"no such {kind}; name an existing {kind}")
        return str(Path(path).resolve()) + colon + arg

    return checked(parse)


def cache_folder() -> type[argparse.Action]:
    """JAX's persistent compilation cache folder: one this process can create or write into,
    or '' (no cache)."""

    def parse(text: str) -> str:
        from stam_jax.paths import unwritable

        why = text and unwritable(os.path.expanduser(text), into=True)
        if why:
            raise ValueError(
                f"cannot be written: {why}; name a folder this process can write to, or '' to "
                "compile without the persistent cache"
            )
        return text

    return checked(parse)


def add_triton_gemm(parser: argparse.ArgumentParser) -> None:
    """`--triton-gemm`: compile stam-jax with XLA's Triton GEMMs (XLA's default) rather than as
    run_eval.py and run_train.py compile by default (`config.triton_gemm=False`: cuBLAS for
    every matmul on GPU; no difference elsewhere)."""
    parser.add_argument(
        "--triton-gemm",
        action="store_true",
        help="compile stam-jax with XLA's Triton GEMMs (XLA's default; run_eval.py and "
        "run_train.py turn them off on GPU by default, config.triton_gemm=False)",
    )


def fill_unset(args: argparse.Namespace, values: dict[str, Any]) -> None:
    """Sets each option of `values` (by its dest) that the command line left unset (None):
    options given explicitly win over the defaults and `--smoke`'s sizes alike."""
    for name, value in values.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def default_help(defaults: dict[str, Any], smoke: dict[str, Any], name: str, what: str = "") -> str:
    """The help of the option `name` (its dest) that `fill_unset` fills: `what` it is, then
    'default: D; with --smoke: S'."""
    text = f"{what}; " if what else ""
    text += f"default: {defaults[name]}"
    return text + (f"; with --smoke: {smoke[name]}" if name in smoke else "")


_SPEC_FLAGS = {
    "num_frames": "--frames",
    "frame_rate": "--frame-rate",
    "resize": "--resize",
    "crop": "--crop",
}


def clip_spec(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Any:
    """The `ClipSpec` of `--frames`, `--frame-rate`, `--resize`, `--crop`; a combination it
    refuses (a crop larger than the resize, a size or rate past its limits) is refused through
    `parser.error`, naming the flags."""
    from stam_jax.data.video import ClipSpec

    if args.crop > args.resize:
        parser.error(
            f"--crop={args.crop} is larger than --resize={args.resize}; use a --crop of at "
            "most --resize"
        )
    try:
        return ClipSpec(args.frames, args.frame_rate, resize=args.resize, crop=args.crop)
    except ValueError as e:
        fields = "|".join(_SPEC_FLAGS)
        parser.error(re.sub(rf"\b({fields})=", lambda m: f"{_SPEC_FLAGS[m[1]]}=", str(e)))
