import pytest

from moa_search.errors import MoaSearchError
from moa_search.search.budget import Budget, parse_budget, parse_budgets, parse_length


def test_fraction_and_percent():
    assert parse_budget("memory=0.25") == [Budget("memory", fraction=0.25)]
    assert parse_budget("bandwidth=20%") == [Budget("bandwidth", fraction=0.2)]


def test_absolute_with_length_and_batch():
    (b,) = parse_budget("memory=8GiB@32k,batch=8")
    assert b.total_bytes == 8 * 2**30 and b.length == 32768 and b.batch == 8
    assert b.cap(123.0) == 2**30  # per sequence, independent of dense
    assert parse_budget(b.text()) == [b]


def test_two_kinds_in_one_string():
    kinds = [b.kind for b in parse_budget("memory=0.25,bandwidth=0.2")]
    assert kinds == ["memory", "bandwidth"]


def test_lengths():
    assert parse_length("4096") == 4096
    assert parse_length("32k") == 32768
    with pytest.raises(MoaSearchError):
        parse_length("3.5")


@pytest.mark.parametrize(
    "text",
    [
        "memory=1.5",
        "memory=0",
        "memory=abc",
        "speed=0.2",
        "memory=0.2@4k",
        "batch=2",
        "memory=0.2,batch=2",
        "memory=8XB",
        "memory",
        "",
    ],
)
def test_bad_budgets_are_one_line_errors(text):
    with pytest.raises(MoaSearchError) as err:
        parse_budget(text)
    assert "\n" not in str(err.value)


def test_kind_given_twice():
    with pytest.raises(MoaSearchError, match="given 2 times"):
        parse_budgets(["memory=0.2", "memory=0.3"])
