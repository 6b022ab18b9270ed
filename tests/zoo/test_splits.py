"""The hash split rule (docs/data.md §3), hand-checked against hashlib, plus its invariants."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from mergelab.zoo.splits import cap_per_class, first_per_class, split, text_hash


def h(text: str, salt: str = "mergelab:") -> int:
    return int(hashlib.sha256((salt + text).encode("utf-8")).hexdigest(), 16)


def test_rule_matches_the_written_formula() -> None:
    rows = [(f"text {i}", "a" if i % 3 else "b") for i in range(50)]
    train, test = split(rows, None, None)
    assert [t for t, _ in test] == sorted((t for t, _ in rows if h(t) % 5 == 0), key=h)
    assert [t for t, _ in train] == sorted((t for t, _ in rows if h(t) % 5 != 0), key=h)
    assert text_hash("x") == h("x") and text_hash("x", "mergelab-cap:") == h("x", "mergelab-cap:")


texts = st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=40, unique=True)


@settings(max_examples=40, deadline=None)
@given(texts, st.integers(0, 40), st.integers(0, 40))
def test_split_is_a_disjoint_order_free_prefix(items: list[str], n_train: int, n_test: int) -> None:
    rows = [(t, "c") for t in items]
    train, test = split(rows, None, None)
    assert sorted(train + test) == sorted(rows)  # a partition
    small_train, small_test = split(list(reversed(rows)), n_train, n_test)
    assert small_train == train[:n_train] and small_test == test[:n_test]  # input order does not matter


def test_cap_uses_the_salted_hash() -> None:
    rows = [(f"w{i}", "a") for i in range(20)] + [(f"v{i}", "b") for i in range(3)]
    capped = cap_per_class(rows, 5)
    kept_a = [t for t, c in capped if c == "a"]
    assert kept_a == sorted((t for t, c in rows if c == "a"), key=lambda t: h(t, "mergelab-cap:"))[:5]
    assert sum(c == "b" for _, c in capped) == 3


def test_first_per_class() -> None:
    rows = [("1", "a"), ("2", "b"), ("3", "a"), ("4", "a"), ("5", "c")]
    assert first_per_class(rows, ["a", "b"], 2) == [("1", "a"), ("2", "b"), ("3", "a")]
