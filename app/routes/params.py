"""Request parameters, declared once: the routes validate with these definitions and ``app.routes.openapi``
documents them from the same objects, so a parameter added here is checked and documented together.

A ``Param`` says a parameter's name, type, bounds or choices, where its default comes from (a
``Settings`` field or a constant) and what it means; ``Params`` is the set one route accepts, with
the recognised parameters it does not implement. ``Params.parse`` reads them from the form or the
query string and refuses unknown names and bad values with 422 ``invalid_parameter``, the message
starting with the parameter's name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from flask import request

from app.config import Settings
from app.engines import fallback
from app.errors import ApiError

TRUE = ("true", "1", "yes", "on")
FALSE = ("false", "0", "no", "off")


class ParamError(ApiError):
    """A bad request parameter: 422 ``invalid_parameter``, with the parameter's name."""

    def __init__(self, param: str | None, message: str, status: int = 422):
        super().__init__(status, "invalid_parameter", f"{param}: {message}" if param else message)
        self.param = param


@dataclass(frozen=True)
class Param:
    """One request parameter.

    ``type`` is the OpenAPI type (``string``, ``integer``, ``number``, ``boolean``, ``array`` of
    strings); ``setting`` names the ``Settings`` field that holds the default, else ``default`` is it.
    A value that depends on the loaded model (a language) is checked by the route after parsing.
    """

    name: str
    type: str
    description: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    max_length: int | None = None
    default: Any = None
    setting: str | None = None
    aliases: tuple[str, ...] = ()   # other names for the same values (OpenAI's `timestamp_granularities`)

    def default_for(self, settings: Settings) -> Any:
        return getattr(settings, self.setting) if self.setting else self.default

    def parse(self, settings: Settings) -> Any:
        default = self.default_for(settings)
        if self.type == "array":
            return self._array(default)
        raw = param(self.name)
        if self.type == "boolean":
            return boolean(self.name, default, raw)
        if self.type == "integer":
            return integer(self.name, int(self.minimum), int(self.maximum), default, raw)
        if self.type == "number":
            return number(self.name, self.minimum, self.maximum, default, raw)
        if self.choices:
            return choice(self.name, self.choices, default, raw)
        text = param(self.name, default or "")  # given empty stays empty: "" can mean something (detect)
        if self.max_length is not None and len(text) > self.max_length:
            raise ParamError(self.name, f"must be at most {self.max_length} characters, not {len(text)}")
        return text

    def _array(self, default: tuple[str, ...]) -> tuple[str, ...]:
        values = [v for name in (self.name, *self.aliases)
                  for v in request.form.getlist(name) + request.args.getlist(name)]
        for value in values:
            if value not in self.choices:
                raise ParamError(self.name, f"must be {' or '.join(self.choices)}, not {value[:40]!r}")
        return tuple(values) or tuple(default)

    def schema(self, settings: Settings) -> dict:
        """The parameter's JSON Schema, as OpenAPI 3.0 writes it."""
        if self.type == "array":
            schema: dict = {"type": "array", "items": {"type": "string", "enum": list(self.choices)}}
        else:
            schema = {"type": self.type}
            if self.choices:
                schema["enum"] = list(self.choices)
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.maximum is not None:
            schema["maximum"] = self.maximum
        if self.max_length is not None:
            schema["maxLength"] = self.max_length
        default = self.default_for(settings)
        if default not in (None, "", ()):
            schema["default"] = list(default) if isinstance(default, tuple) else default
        return schema


@dataclass(frozen=True)
class Params:
    """The parameters one route accepts.

    ``unsupported``: recognised names this service does not implement -> the one value that asks for
    nothing (accepted), any other value is refused. ``ignore``: names that are not parameters (the
    upload's fields).
    """

    params: tuple[Param, ...]
    unsupported: dict[str, str] = field(default_factory=dict)
    ignore: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def __getitem__(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)

    def parse(self, settings: Settings) -> dict[str, Any]:
        """Every parameter's value (its default when not given); unknown names refused first."""
        known = self.names + tuple(a for p in self.params for a in p.aliases)
        check_names(known, self.unsupported, ignore=self.ignore, listed=self.names)
        return {p.name: p.parse(settings) for p in self.params}


# Parameters more than one route shares ---------------------------------------------------------

# As OpenAI's API defines it ("0: the model uses log probability to increase the temperature until
# certain thresholds are hit") and as faster-whisper decodes by default; a single value above 0 is
# what faster-whisper does with one temperature given: that one, no fallback.
TEMPERATURE = Param("temperature", "number", minimum=0.0, maximum=1.0, default=0.0, description=(
    f"0: beam search, and a 30 s window whose text loops or is unlikely (gzip compression ratio above "
    f"{fallback.COMPRESSION_RATIO_THRESHOLD:g}, average log-probability below {fallback.LOG_PROB_THRESHOLD:g}) "
    f"is decoded again at {', '.join(f'{t:g}' for t in fallback.LADDER[1:])} in turn until it passes "
    f"({fallback.BEST_OF} samples, the likeliest kept), as faster-whisper's defaults; above 0: "
    "sampling at that temperature only. Qwen3-ASR, or the setting temperature_fallback = false: 0 decodes "
    "without sampling and without fallback."))


# Reading and checking one value ----------------------------------------------------------------

def param(name: str, default: str = "") -> str:
    """A form field, else a query parameter, else ``default``; stripped."""
    value = request.form.get(name)
    if value is None:
        value = request.args.get(name)
    return (default if value is None else value).strip()


def check_names(known: tuple[str, ...], unsupported: dict[str, str], ignore: tuple[str, ...] = (),
                listed: tuple[str, ...] | None = None) -> None:
    """Refuse unknown parameters, and recognised ones this service does not implement unless they
    carry the one value that asks for nothing (``unsupported``: name -> that value)."""
    for name in list(request.args) + list(request.form):
        if name in known or name in ignore:
            continue
        if name in unsupported:
            if param(name).lower() != unsupported[name]:
                raise ParamError(name, "not supported by this service")
            continue
        raise ParamError(name, f"unknown parameter (accepted: {', '.join(listed or known)})")


def boolean(name: str, default: bool, raw: str | None = None) -> bool:
    raw = (param(name) if raw is None else raw).lower()
    if not raw:
        return default
    if raw in TRUE:
        return True
    if raw in FALSE:
        return False
    raise ParamError(name, f"must be true or false, not {raw[:40]!r}")


def choice(name: str, allowed: tuple[str, ...], default: str, raw: str | None = None) -> str:
    value = (param(name) if raw is None else raw).lower() or default
    if value not in allowed:
        raise ParamError(name, f"must be one of {', '.join(allowed)}, not {value[:40]!r}")
    return value


def integer(name: str, low: int, high: int, default: int, raw: str | None = None) -> int:
    raw = param(name) if raw is None else raw
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ParamError(name, f"must be an integer from {low} to {high}, not {raw[:40]!r}") from None
    if not low <= value <= high:
        raise ParamError(name, f"must be from {low} to {high}, not {value}")
    return value


def number(name: str, low: float, high: float, default: float, raw: str | None = None) -> float:
    raw = param(name) if raw is None else raw
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and low <= value <= high):
        raise ParamError(name, f"must be a number from {low:g} to {high:g}, not {raw[:40]!r}")
    return value
