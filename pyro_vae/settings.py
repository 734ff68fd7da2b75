"""One declaration per setting: its type, range and help text, from which the ``pyro-vae``
flags, the checks of a TOML config file and the checks of ``TrainConfig(...)`` all follow.

A ``TrainConfig`` field is declared with ``setting(default, help, ...)``; ``check`` validates a
value against the declaration (the same function behind the flag's parser and the dataclass's
``__post_init__``), and ``add_flags`` generates the argparse flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyro_vae.errors import ConfigError

KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a table of options"}


@dataclass(frozen=True)
class Setting:
    """What one setting accepts.

    ``kind`` is the type of the value (or of each item, with ``many``); ``at_least``/``above``/
    ``at_most`` bound numbers (items, for lists); ``choices`` is a tuple of allowed strings or a
    function returning them (so registries can be read lazily); ``optional`` admits None
    (unset); ``import_path`` also admits ``package.module:Name``. ``resumable`` settings may change on ``--resume``; ``flag=False`` marks values that
    training fills in from the data (not user settings)."""

    help: str
    kind: type = str
    many: bool = False
    length: int | None = None
    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    choices: tuple | Callable[[], Sequence[str]] | None = None
    optional: bool = False
    import_path: bool = False
    resumable: bool = False
    flag: bool = True
    metavar: str | None = None

    def allowed(self) -> str:
        """What the setting accepts, in words: "an integer >= 1", "one of mlp, conv", ..."""
        what = KINDS[self.kind]
        if self.choices is not None:
            what = "one of " + ", ".join(self._choices()) + (" or package.module:Name" if self.import_path else "")
        bounds = [f">= {self.at_least:g}" if self.at_least is not None else None,
                  f"> {self.above:g}" if self.above is not None else None,
                  f"<= {self.at_most:g}" if self.at_most is not None else None]
        bounds = [b for b in bounds if b]
        if self.kind is float:
            what = "a finite number"
        if bounds:
            what += " " + " and ".join(bounds)
        if self.many:
            count = f"{self.length} " if self.length else ""
            what = f"a list of {count}{what.replace('an integer', 'integers').replace('a finite number', 'numbers')}"
        return what + (" (or unset)" if self.optional else "")

    def _close(self, value) -> str:
        """"; did you mean 'vae'?" for a near miss among the choices."""
        if self.choices is None or not isinstance(value, str):
            return ""
        close = difflib.get_close_matches(value, self._choices(), 1)
        return f"; did you mean {close[0]!r}?" if close else ""

    def _choices(self) -> Sequence[str]:
        return self.choices() if callable(self.choices) else self.choices

    def check(self, name: str, value: Any) -> Any:
        """``value`` if it is allowed (ints widen to float), else ConfigError naming the key,
        the value and what is allowed."""
        if value is None and self.optional:
            return None
        items = value if self.many and isinstance(value, (list, tuple)) else [value]
        widened = [self._widen(v) for v in items]
        if (value is None or (self.many and not isinstance(value, (list, tuple)))
                or (self.many and self.length is not None and len(items) != self.length)
                or not all(self._allowed(v) for v in widened)):
            raise ConfigError(f"{name} = {value!r}: must be {self.allowed()}{self._close(value)}")
        return widened if self.many else widened[0]

    def _widen(self, value: Any) -> Any:
        """An int where a float is declared becomes that float (TOML's ``lr = 1``)."""
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value

    def _allowed(self, value: Any) -> bool:
        """One value (an item, for lists) against the kind, the bounds and the choices."""
        if not isinstance(value, self.kind) or (self.kind is int and isinstance(value, bool)):
            return False
        if self.kind is float and not math.isfinite(value):
            return False
        if self.kind in (int, float) and not ((self.at_least is None or value >= self.at_least)
                                              and (self.above is None or value > self.above)
                                              and (self.at_most is None or value <= self.at_most)):
            return False
        return self.choices is None or value in self._choices() or (self.import_path and ":" in value)

    def parse(self) -> Callable[[str], Any]:
        """The argparse ``type`` of the flag: text to a checked value (argparse then prints
        ``argument --flag: must be ...``)."""
        def convert(text: str):
            try:
                value = self.kind(text) if self.kind in (int, float) else text
            except ValueError:
                raise argparse.ArgumentTypeError(f"{text!r} is not {KINDS[self.kind]}: must be {self.allowed()}") \
                    from None
            if not self._allowed(value):
                raise argparse.ArgumentTypeError(f"{text!r}: must be {self.allowed()}{self._close(text)}")
            return value

        convert.__name__ = KINDS[self.kind]
        return convert


def setting(default: Any, help: str, **declaration) -> Any:
    """A dataclass field with its declaration (``Setting``) in the metadata."""
    spec = Setting(help, **declaration)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"setting": spec})
    return field(default=default, metadata={"setting": spec})


def declarations(cls) -> dict[str, Setting]:
    """{field name: Setting} of a dataclass declared with ``setting``."""
    return {f.name: f.metadata["setting"] for f in dataclasses.fields(cls) if "setting" in f.metadata}


def check_all(obj) -> None:
    """Check every declared field of a dataclass instance (numbers widened in place)."""
    for name, spec in declarations(type(obj)).items():
        setattr(obj, name, spec.check(name, getattr(obj, name)))


def flag_name(name: str, spec: Setting | None = None) -> str:
    """``z_dim`` -> ``--z-dim``; a table of options (``model_options``) -> ``--model-option``."""
    if spec is not None and spec.kind is dict:
        name = name.removesuffix("s")
    return "--" + name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, cls, skip: Sequence[str] = ()) -> list[str]:
    """One flag per declared field (default None: "not given", so a config file or a resumed
    run supplies the value); returns the field names that got a flag."""
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)}  # read, not built: building checks (and imports) names
    names = []
    for name, spec in declarations(cls).items():
        if not spec.flag or name in skip or spec.kind is dict:
            continue
        text = spec.help if "(default:" in spec.help else f"{spec.help} (default: {defaults[name]})"
        if spec.kind is bool:
            parser.add_argument(flag_name(name), action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            nargs = (spec.length or "+") if spec.many else None
            metavar = spec.metavar or ("N" if spec.kind in (int, float) else None)
            if metavar and spec.length:
                metavar = tuple(metavar.split())
            parser.add_argument(flag_name(name), type=spec.parse(), nargs=nargs, default=None,
                                help=text, metavar=metavar)
        names.append(name)
    return names
