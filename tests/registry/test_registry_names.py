"""Tenant/adapter name rules and model reference parsing."""

import pytest

from registry import InvalidName, ModelRef, RegistryError, parse_model_ref, validate_name


@pytest.mark.parametrize("name", ["acme", "a", "0", "spam-v2", "legal_router", "x.y.z", "a" * 64])
def test_valid_names_are_returned(name: str) -> None:
    assert validate_name("tenant", name) == name
    assert validate_name("adapter", name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        "../etc",
        "a/../b",
        "a..b",
        "acme/spam",
        "/abs",
        "a\\b",
        "..\\windows",
        "spam@3",
        "Acme",
        "SPAM",
        "-spam",
        "_spam",
        ".hidden",
        "a b",
        "spam\n",
        "naïve",
        "a" * 65,
    ],
)
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidName) as raised:
        validate_name("adapter", name)
    assert "adapter" in str(raised.value)
    assert repr(name) in str(raised.value)


def test_invalid_name_is_both_a_registry_error_and_a_value_error() -> None:
    with pytest.raises(ValueError):
        validate_name("tenant", "Bad")
    with pytest.raises(RegistryError):
        validate_name("tenant", "Bad")


def test_message_names_the_kind() -> None:
    with pytest.raises(InvalidName, match="tenant"):
        validate_name("tenant", "../x")


def test_non_string_names_are_refused() -> None:
    with pytest.raises(InvalidName):
        validate_name("tenant", None)  # type: ignore[arg-type]


def test_unknown_kind_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="kind"):
        validate_name("user", "acme")


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("spam", ModelRef(None, "spam", None)),
        ("spam@3", ModelRef(None, "spam", 3)),
        ("acme/spam", ModelRef("acme", "spam", None)),
        ("acme/spam@3", ModelRef("acme", "spam", 3)),
        ("acme/spam.v2@12", ModelRef("acme", "spam.v2", 12)),
    ],
)
def test_model_refs_parse(ref: str, expected: ModelRef) -> None:
    parsed = parse_model_ref(ref)
    assert parsed == expected
    assert str(parsed) == ref


@pytest.mark.parametrize(
    "ref",
    [
        "",
        "@3",
        "spam@",
        "spam@0",
        "spam@-1",
        "spam@+1",
        "spam@1.5",
        "spam@x",
        "spam@ 3",
        "spam@3 ",
        "spam@1@2",
        "spam@\u0663",  # an Arabic-Indic digit: int() would accept it
        "spam@" + "9" * 19,
        "/spam",
        "acme/",
        "acme/spam/x",
        "Acme/spam",
        "acme/Spam",
        "../spam",
        "acme/..",
        "acme\\spam",
    ],
)
def test_bad_model_refs_are_refused(ref: str) -> None:
    with pytest.raises(InvalidName, match="model reference"):
        parse_model_ref(ref)


def test_bad_ref_message_says_what_is_wrong() -> None:
    with pytest.raises(InvalidName, match="tenant name 'Acme'"):
        parse_model_ref("Acme/spam")
    with pytest.raises(InvalidName, match="positive integer"):
        parse_model_ref("acme/spam@0")


@pytest.mark.parametrize("ref", ["A" * 100_000, "acme/" + "b" * 100_000, "spam@" + "9" * 100_000])
def test_a_huge_refused_value_is_shown_cut(ref: str) -> None:
    """The message echoes the value it refuses, cut: the HTTP error carries it back."""
    with pytest.raises(InvalidName) as info:
        parse_model_ref(ref)
    assert len(str(info.value)) < 600 and "characters)" in str(info.value)
