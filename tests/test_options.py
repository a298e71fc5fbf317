"""parse_options: the one reader and range check of client-supplied generation options."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatgate.options import (
    INT32_MAX,
    INT64_MAX,
    INT64_MIN,
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    OPTION_NAMES,
    OptionError,
    parse_ollama_options,
    parse_options,
)
from chatgate.vocabulary import GenerationOptions


def refused(data: Any, where: str = "options") -> OptionError:
    with pytest.raises(OptionError) as raised:
        parse_options(data, where=where)
    return raised.value


# Empty and unknown ---------------------------------------------------------------------


@pytest.mark.parametrize("data", [None, {}, {"temperature": None, "seed": None, "stop": None}])
def test_nothing_set_is_the_default(data: Any) -> None:
    assert parse_options(data) == GenerationOptions()


def test_unknown_options_are_ignored() -> None:
    data = {"repeat_penalty": 1.1, "num_gpu": -1, "mirostat": "x", "temperature": 0.5}
    assert parse_options(data) == GenerationOptions(temperature=0.5)


def test_ollamas_other_options_are_kept_for_an_ollama_upstream() -> None:
    data = {"top_k": 20, "repeat_penalty": 1.1, "num_gpu": -1, "mirostat": None, "temperature": 0.5}
    assert parse_ollama_options(data) == GenerationOptions(
        temperature=0.5, top_k=20, ollama_extra=(("repeat_penalty", 1.1), ("num_gpu", -1))
    )
    with pytest.raises(OptionError) as raised:
        parse_ollama_options({"num_gpu": {"nested": 1}})
    assert raised.value.field == "options.num_gpu"


def test_penalties_are_checked() -> None:
    assert parse_options({"frequency_penalty": -2, "presence_penalty": 1.5}) == GenerationOptions(
        frequency_penalty=-2.0, presence_penalty=1.5
    )
    with pytest.raises(OptionError) as raised:
        parse_options({"presence_penalty": 3})
    assert raised.value.field == "options.presence_penalty"


@pytest.mark.parametrize("data", [[], [1], "hot", 5, True])
def test_options_that_are_not_an_object_are_refused(data: Any) -> None:
    error = refused(data)
    assert error.field == "options" and "options must be an object" in str(error)


def test_an_option_error_is_a_value_error_naming_the_field() -> None:
    error = refused({"max_tokens": -5})
    assert isinstance(error, ValueError)
    assert error.field == "options.max_tokens"
    assert str(error) == error.message
    assert str(error).startswith("options.max_tokens must be an integer from 1 to 2147483647")


def test_where_prefixes_field_names() -> None:
    assert refused({"seed": "x"}, where="body").field == "body.seed"
    top_level = refused({"seed": "x"}, where="")
    assert top_level.field == "seed" and str(top_level).startswith("seed must be")


# Numbers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "low", "high"), [("temperature", 0, 2), ("top_p", 0, 1)]
)
def test_float_options_accept_their_range(name: str, low: int, high: int) -> None:
    for value in (low, high, float(low), float(high), (low + high) / 2, 0.25):
        parsed = getattr(parse_options({name: value}), name)
        assert parsed == value and isinstance(parsed, float)


@pytest.mark.parametrize(
    ("name", "high"), [("temperature", 2), ("top_p", 1)]
)
@pytest.mark.parametrize("bad", ["above", -0.001, -1, 1e30, 2**70, math.nan, math.inf, -math.inf, True, False, "0.5", [0.5], {"v": 1}])
def test_float_options_refuse_what_is_not_a_number_in_range(name: str, high: int, bad: Any) -> None:
    value = high + 0.001 if bad == "above" else bad
    error = refused({name: value})
    assert error.field == f"options.{name}"
    assert str(error).startswith(f"options.{name} must be a number from 0 to {high}, not ")


INTEGERS = [
    ("max_tokens", 1, INT32_MAX),
    ("max_completion_tokens", 1, INT32_MAX),
    ("num_ctx", 1, INT32_MAX),
    ("seed", INT64_MIN, INT64_MAX),
]


def _value_of(options: GenerationOptions, name: str) -> Any:
    return options.max_tokens if name == "max_completion_tokens" else getattr(options, name)


@pytest.mark.parametrize(("name", "low", "high"), INTEGERS)
def test_integer_options_accept_their_range(name: str, low: int, high: int) -> None:
    for value in (low, high, 5):
        assert _value_of(parse_options({name: value}), name) == value
    parsed = _value_of(parse_options({name: 5.0}), name)
    assert parsed == 5 and type(parsed) is int


@pytest.mark.parametrize(("name", "low", "high"), INTEGERS)
def test_integer_options_refuse_what_is_not_an_integer_in_range(name: str, low: int, high: int) -> None:
    for bad in (low - 1, high + 1, 2**70, -(2**70), 1e30, -1e30, 5.5, math.nan, math.inf, True, "5", [5]):
        error = refused({name: bad})
        assert error.field == f"options.{name}", bad
        assert str(error).startswith(f"options.{name} must be an integer from {low} to {high}, not "), bad


def test_floats_stand_for_integers_only_while_exact() -> None:
    assert parse_options({"seed": float(2**53)}).seed == 2**53
    assert parse_options({"seed": -float(2**53)}).seed == -(2**53)
    # A JSON parser reads -2**63-1 as the float -2**63: in range, but not what was sent.
    for rounded in (float(2**53 + 2), -float(2**63), float(2**62)):
        assert refused({"seed": rounded}).field == "options.seed"
    assert parse_options({"seed": -(2**63)}).seed == -(2**63)


def test_zero_and_negative_lengths_are_refused() -> None:
    for name in ("max_tokens", "max_completion_tokens", "num_ctx"):
        assert refused({name: 0}).field == f"options.{name}"
        assert refused({name: -5}).field == f"options.{name}"


def test_error_messages_show_the_value_shortened() -> None:
    assert str(refused({"max_tokens": -5})).endswith(", not -5")
    assert str(refused({"max_tokens": 1e30})).endswith(", not 1e+30")
    assert str(refused({"temperature": True})).endswith(", not true")
    assert str(refused({"temperature": "hot"})).endswith(', not "hot"')
    assert str(refused({"temperature": {"a": 1}})).endswith(", not an object")
    assert str(refused({"temperature": [1]})).endswith(", not a list")
    long = str(refused({"seed": "x" * 10_000}))
    assert len(long) < 200 and long.endswith("…")
    assert str(refused({"seed": 10**5000})).endswith(", not int")  # too long even to print


# max_tokens and its other names ------------------------------------------------------


def test_num_predict_is_max_tokens() -> None:
    assert parse_options({"num_predict": 9}).max_tokens == 9
    assert parse_options({"num_predict": INT32_MAX}).max_tokens == INT32_MAX


@pytest.mark.parametrize("unlimited", [-1, -2, 0, -1.0])
def test_ollamas_num_predict_without_limit_is_unset(unlimited: Any) -> None:
    assert parse_options({"num_predict": unlimited}) == GenerationOptions()


@pytest.mark.parametrize("bad", [-3, INT32_MAX + 1, 1e30, True, "-1", 2.5])
def test_num_predict_refuses_other_values(bad: Any) -> None:
    error = refused({"num_predict": bad})
    assert error.field == "options.num_predict"
    assert "from -2 to 2147483647" in str(error) and "no limit" in str(error)


def test_max_tokens_names_in_order_of_precedence() -> None:
    both = {"max_tokens": 7, "max_completion_tokens": 3, "num_predict": 9}
    assert parse_options(both).max_tokens == 3
    assert parse_options({"max_tokens": 7, "num_predict": 9}).max_tokens == 7
    assert parse_options({"max_tokens": 7, "num_predict": -1}).max_tokens == 7
    assert parse_options({"max_tokens": None, "num_predict": 9}).max_tokens == 9


def test_every_given_max_tokens_name_is_checked() -> None:
    assert refused({"max_completion_tokens": 3, "max_tokens": -5}).field == "options.max_tokens"
    assert refused({"max_tokens": 3, "num_predict": -7}).field == "options.num_predict"


# stop ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        ("END", ("END",)),
        (["a", "b"], ("a", "b")),
        ([], ()),
        ("", ()),
        (None, ()),
        ("x" * MAX_STOP_CHARS, ("x" * MAX_STOP_CHARS,)),
        (["s"] * MAX_STOP_SEQUENCES, ("s",) * MAX_STOP_SEQUENCES),
        ("\n", ("\n",)),
    ],
)
def test_stop_shapes(stop: Any, expected: tuple[str, ...]) -> None:
    assert parse_options({"stop": stop}).stop == expected


@pytest.mark.parametrize(
    "stop",
    [
        "x" * (MAX_STOP_CHARS + 1),
        ["x" * (MAX_STOP_CHARS + 1)],
        ["s"] * (MAX_STOP_SEQUENCES + 1),
        [""],
        ["ok", 5],
        [None],
        [["nested"]],
        5,
        True,
        {"a": "b"},
    ],
)
def test_bad_stops_are_refused(stop: Any) -> None:
    error = refused({"stop": stop})
    assert error.field == "options.stop"
    assert str(error) == (
        f"options.stop must be a string or a list of at most {MAX_STOP_SEQUENCES} strings, "
        f"each non-empty and at most {MAX_STOP_CHARS} characters long"
    )


# All at once -------------------------------------------------------------------------


def test_all_options_together() -> None:
    data = {
        "temperature": 0.2,
        "num_predict": 6,
        "num_ctx": 2048,
        "top_p": 0.9,
        "stop": ["END"],
        "seed": -7,
        "top_k": 20,
    }
    assert parse_options(data) == GenerationOptions(
        temperature=0.2, max_tokens=6, num_ctx=2048, top_p=0.9, stop=("END",), seed=-7, top_k=20
    )


# Property: valid options or OptionError, nothing else ----------------------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=300)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=20) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=30,
)
INTERESTING = {
    "temperature": st.floats(-1, 3) | JSON_VALUES,
    "top_p": st.floats(-1, 2) | JSON_VALUES,
    "max_tokens": st.integers(-3, 2**32) | JSON_VALUES,
    "max_completion_tokens": st.integers(-3, 2**32) | JSON_VALUES,
    "num_predict": st.integers(-3, 2**32) | st.floats(-3, 2**32) | JSON_VALUES,
    "num_ctx": st.integers(-3, 2**32) | JSON_VALUES,
    "seed": st.integers(-(2**64), 2**64) | JSON_VALUES,
    "stop": st.lists(st.text(max_size=300), max_size=20) | JSON_VALUES,
}
OPTION_MAPPINGS = st.fixed_dictionaries(
    {}, optional={**INTERESTING, "top_k": JSON_VALUES, "": JSON_VALUES}
) | st.dictionaries(st.sampled_from([*OPTION_NAMES, "top_k"]) | st.text(max_size=8), JSON_VALUES)


def _in_range(options: GenerationOptions) -> None:
    for value, low, high in [(options.temperature, 0, 2), (options.top_p, 0, 1)]:
        assert value is None or (type(value) is float and low <= value <= high)
    for value, low, high in [
        (options.max_tokens, 1, INT32_MAX),
        (options.num_ctx, 1, INT32_MAX),
        (options.seed, INT64_MIN, INT64_MAX),
    ]:
        assert value is None or (type(value) is int and low <= value <= high)
    assert isinstance(options.stop, tuple) and len(options.stop) <= MAX_STOP_SEQUENCES
    assert all(type(s) is str and 0 < len(s) <= MAX_STOP_CHARS for s in options.stop)


@settings(max_examples=500, deadline=None)
@given(data=OPTION_MAPPINGS | JSON_VALUES)
def test_parse_options_returns_valid_options_or_raises_option_error(data: Any) -> None:
    try:
        options = parse_options(data)
    except OptionError as exc:
        assert exc.field == "options" or exc.field.removeprefix("options.") in OPTION_NAMES
        assert str(exc).startswith(exc.field + " must be ")
        return
    assert isinstance(options, GenerationOptions)
    _in_range(options)
