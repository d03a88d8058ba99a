"""MLflow filters are built from checked values only: nothing a user types can end a string literal."""

import pytest

from sweeper.job.names import is_filter_value, is_safe_name, match


def test_match_builds_an_and_of_equalities():
    assert match({"bgad.role": "sweep", "bgad.sweep_id": "quickstart-95c09134"}, run_name="quickstart") == (
        "tags.`bgad.role` = 'sweep' and tags.`bgad.sweep_id` = 'quickstart-95c09134' and run_name = 'quickstart'"
    )


@pytest.mark.parametrize("value", ["bob's-sweep", "x' OR '1'='1", 'a"b', "back\\", "new\nline", "", "a" * 257])
def test_match_refuses_values_that_could_leave_the_literal(value):
    assert not is_filter_value(value)
    with pytest.raises(ValueError, match="MLflow filter value"):
        match({"bgad.sweep_id": value})


def test_match_refuses_keys_that_could_leave_the_backticks():
    with pytest.raises(ValueError, match="MLflow filter key"):
        match({"bgad.role` = 'sweep' or `x": "y"})


def test_safe_names():
    assert all(is_safe_name(n) for n in ("quickstart", "mtd_benchmark", "01", "bgad-sweeper", "v1.2", "a" * 64))
    assert not any(is_safe_name(n) for n in ("", "-x", ".hidden", "a b", "a/b", "bob's", "a" * 65))
