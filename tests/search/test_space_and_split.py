"""Search spaces (parsing, grid order, checks against the registry) and the validation split (docs/data.md §3)."""

from __future__ import annotations

import pytest

from mergelab.errors import MergelabError
from mergelab.search.space import check_space, default_space, grid, parse_dim, parse_space
from mergelab.zoo.splits import split, text_hash, validation


def test_range_choices_and_integer_dimensions() -> None:
    assert parse_dim("scaling", "0.1:0.5:0.1").values() == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert parse_dim("k", "1:7:3").values() == [1, 4, 7]
    assert parse_dim("density", "0.1,0.2,abc").values() == [0.1, 0.2, "abc"]
    assert parse_dim("lambdas", [[0.5, 1.0], [0.2]]).values() == [[0.5, 1.0], [0.2]]
    assert parse_dim("x", {"low": 1e-3, "high": 1.0, "log": True}).log
    with pytest.raises(MergelabError, match="a grid needs choices or a range with a step"):
        parse_dim("scaling", "0.1:1.0").values()


@pytest.mark.parametrize("spec, message", [
    ("0.5:0.1:0.1", "low <= high"), ("0.1:1:0", "step must be positive"), ("0:1:log", "0 < low"),
    ("1:2:3:4", "LOW:HIGH"), ({"low": 0, "high": 1, "stride": 1}, "unknown key"), ([], "no choices"),
    ("a:b:0.1", "finite number"),
])
def test_bad_dimensions_are_one_line_errors(spec: object, message: str) -> None:
    with pytest.raises(MergelabError, match=message):
        parse_dim("scaling", spec)


def test_grid_varies_scaling_fastest() -> None:
    space = parse_space({"scaling": [0.5, 1.0], "density": [0.1, 0.2]})
    assert grid(space) == [{"density": 0.1, "scaling": 0.5}, {"density": 0.1, "scaling": 1.0},
                           {"density": 0.2, "scaling": 0.5}, {"density": 0.2, "scaling": 1.0}]


def test_default_space_is_weight_weavings_lambda_range() -> None:
    assert default_space("ties")["scaling"].values() == [round(0.1 * i, 1) for i in range(1, 16)]
    assert default_space("task_arithmetic")["scaling"].values()[-1] == 1.0
    with pytest.raises(MergelabError, match="has no scaling"):
        default_space("weight_average")


def test_space_values_are_checked_by_the_method() -> None:
    check_space("ties", {"density": 0.2}, parse_space({"scaling": "0.1:1:0.1"}), 3)
    with pytest.raises(MergelabError, match="search space densty=0.1: method 'ties' has no hyperparameter"):
        check_space("ties", {}, parse_space({"densty": [0.1]}), 3)
    with pytest.raises(MergelabError, match="merge_func='median'"):
        check_space("ties", {}, parse_space({"merge_func": ["mean", "median"]}), 3)
    with pytest.raises(MergelabError, match="both fixed"):
        check_space("ties", {"scaling": 1.0}, parse_space({"scaling": [0.5]}), 3)


ROWS = [(f"text {i}", "ab"[i % 2]) for i in range(60)]


def test_validation_rows_follow_the_training_rows_in_hash_order() -> None:
    train, test = split(ROWS, 10, 5)
    val = validation(ROWS, 10, 6)
    pool = [row for row in sorted(ROWS, key=lambda r: text_hash(r[0])) if text_hash(row[0]) % 5 != 0]
    assert val == pool[10:16]  # by hand: the training split in h order, after the first n_train rows
    assert not set(val) & set(train) and not set(val) & set(test)
    assert all(text_hash(t) % 5 != 0 for t, _ in val)  # never a test row
    assert split(ROWS, 10, 5) == (train, test)  # train and test rows unchanged
    assert validation(ROWS, None, 6) == []  # every training row is trained on: nothing left


def test_per_class_validation_rows() -> None:
    val = validation(ROWS, 3, 2, classes=["a", "b"])
    pool = [row for row in sorted(ROWS, key=lambda r: text_hash(r[0])) if text_hash(row[0]) % 5 != 0]
    expected = [r for r in pool if r[1] == "a"][3:5] + [r for r in pool if r[1] == "b"][3:5]
    assert sorted(val) == sorted(expected)
