"""Client-supplied generation options, read and range-checked once for every API.

The native WebSocket protocol, the Ollama-compatible ``options`` object and the
OpenAI-compatible request body all go through :func:`parse_options`, so a value the
upstream must not see (a negative ``max_tokens``, a ``temperature`` of 7, a ``seed`` too
large for 64 bits) is refused the same way everywhere, with a message naming the field
and its allowed range, before any request reaches the upstream.

Names accepted (native, Ollama and OpenAI alike)::

    temperature                      a number from 0 to 2
    top_p                            a number from 0 to 1
    max_completion_tokens            an integer from 1 to 2**31-1; when several of these
    max_tokens                         three are given, the first one listed here wins
    num_predict                      Ollama's: also -2, -1 or 0, meaning "no limit"
    num_ctx                          an integer from 1 to 2**31-1
    seed                             an integer in the signed 64-bit range
    stop                             a string, or a list of at most 16 non-empty strings,
                                     each of at most 256 characters
    frequency_penalty                a number from -2 to 2
    presence_penalty                 a number from -2 to 2
    top_k                            an integer from 1 to 2**31-1

Numbers must be JSON numbers: ``true`` or ``"5"`` is refused, and an integer field takes
a float only when it is integral and exact (``5.0`` is 5; ``1e30`` is refused, as is any
float beyond 2**53, which may be a rounded larger integer). ``null`` means unset. Other
names in Ollama's ``options`` (``repeat_penalty``, ``num_gpu``, ``mirostat``…) are kept as
they are by :func:`parse_ollama_options` and passed to an Ollama upstream only.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from chatgate.vocabulary import GenerationOptions

TEMPERATURE_MIN, TEMPERATURE_MAX = 0.0, 2.0
TOP_P_MIN, TOP_P_MAX = 0.0, 1.0
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: Ollama's ``num_predict``: -1 is "infinite", -2 "fill the context"; 0 sets no limit either.
NUM_PREDICT_MIN = -2
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
#: The names of the maximum answer length, in order of precedence.
MAX_TOKENS_NAMES = ("max_completion_tokens", "max_tokens", "num_predict")
#: Every name :func:`parse_options` reads.
OPTION_NAMES = (
    "temperature", "top_p", *MAX_TOKENS_NAMES, "num_ctx", "seed", "stop",
    "frequency_penalty", "presence_penalty", "top_k",
)
PENALTY_MIN, PENALTY_MAX = -2.0, 2.0
#: How many of Ollama's other options one request may carry, and how long a name may be.
MAX_OLLAMA_EXTRA = 64
MAX_OPTION_NAME_CHARS = 64
#: A float stands for an integer only up to here: beyond, it is already rounded (a JSON
#: parser reads an integer too large for 64 bits as a float: -2**63-1 arrives as -2**63).
MAX_EXACT_FLOAT = 2**53
_SHOWN_CHARS = 40


class OptionError(ValueError):
    """A client's option is malformed or out of range; ``field`` names it as the client
    spelled it (``options.max_tokens``, or ``max_tokens`` for a top-level field)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def parse_options(data: Mapping[str, Any] | None, *, where: str = "options") -> GenerationOptions:
    """The options of ``data`` (``None`` or empty: none), or :class:`OptionError` for the
    first bad one. ``where`` prefixes the field names in errors (``""`` for none)."""
    if data is None:
        return GenerationOptions()
    if not isinstance(data, Mapping):
        raise OptionError(where or "options", f"{where or 'options'} must be an object, not {_shown(data)}")

    def name(key: str) -> str:
        return f"{where}.{key}" if where else key

    max_tokens: int | None = None
    for key in MAX_TOKENS_NAMES:
        low = NUM_PREDICT_MIN if key == "num_predict" else 1
        value = _integer(data, key, name(key), low, INT32_MAX)
        if key == "num_predict" and value is not None and value <= 0:
            value = None  # Ollama's "no limit"
        if max_tokens is None:
            max_tokens = value
    return GenerationOptions(
        temperature=_number(data, "temperature", name("temperature"), TEMPERATURE_MIN, TEMPERATURE_MAX),
        max_tokens=max_tokens,
        num_ctx=_integer(data, "num_ctx", name("num_ctx"), 1, INT32_MAX),
        top_p=_number(data, "top_p", name("top_p"), TOP_P_MIN, TOP_P_MAX),
        stop=_stop(data.get("stop"), name("stop")),
        seed=_integer(data, "seed", name("seed"), INT64_MIN, INT64_MAX),
        frequency_penalty=_number(data, "frequency_penalty", name("frequency_penalty"), PENALTY_MIN, PENALTY_MAX),
        presence_penalty=_number(data, "presence_penalty", name("presence_penalty"), PENALTY_MIN, PENALTY_MAX),
        top_k=_integer(data, "top_k", name("top_k"), 1, INT32_MAX),
    )


def parse_ollama_options(data: Mapping[str, Any] | None) -> GenerationOptions:
    """Ollama's ``options``: the common ones as :func:`parse_options` reads them, and the
    others kept, as JSON scalars, for an Ollama upstream."""
    options = parse_options(data)
    if not data:
        return options
    extra = [(key, value) for key, value in data.items() if key not in OPTION_NAMES]
    if len(extra) > MAX_OLLAMA_EXTRA:
        raise OptionError("options", f"options holds more than {MAX_OLLAMA_EXTRA} settings")
    for key, value in extra:
        if len(key) > MAX_OPTION_NAME_CHARS or not (
            value is None or isinstance(value, bool | int | float) or (isinstance(value, str) and len(value) <= MAX_STOP_CHARS)
        ):
            raise OptionError(f"options.{key[:MAX_OPTION_NAME_CHARS]}", f"options.{key[:MAX_OPTION_NAME_CHARS]} must be a number, a boolean or a short string")
    return dataclasses.replace(options, ollama_extra=tuple((k, v) for k, v in extra if v is not None))


def _number(data: Mapping[str, Any], key: str, field: str, low: float, high: float) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    # Comparing first keeps huge integers exact; NaN fails every comparison.
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise OptionError(field, f"{field} must be a number from {low:g} to {high:g}, not {_shown(value)}")
    return float(value)


def _integer(data: Mapping[str, Any], key: str, field: str, low: int, high: int) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer() and abs(value) <= MAX_EXACT_FLOAT:
        number = int(value)
    if number is None or not low <= number <= high:
        allowed = f"{field} must be an integer from {low} to {high}"
        if key == "num_predict":
            allowed += " (-2, -1 and 0 mean no limit)"
        raise OptionError(field, f"{allowed}, not {_shown(value)}")
    return number


def _stop(value: Any, field: str) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        sequences: list[Any] = [value]
    elif isinstance(value, list | tuple) and len(value) <= MAX_STOP_SEQUENCES:
        sequences = list(value)
    else:
        sequences = [None]
    if not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in sequences):
        raise OptionError(
            field,
            f"{field} must be a string or a list of at most {MAX_STOP_SEQUENCES} strings, "
            f"each non-empty and at most {MAX_STOP_CHARS} characters long",
        )
    return tuple(sequences)


def _shown(value: Any) -> str:
    """``value`` as the client wrote it, shortened: for error messages."""
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "a list"
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):  # not JSON, or an integer too long to print
        text = type(value).__name__
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 1] + "…"
