"""Suite definitions: MT8's tasks and label names, class-incremental cuts, quick versions."""

from __future__ import annotations

import pytest

from mergelab.errors import MergelabError
from mergelab.zoo.splits import text_hash
from mergelab.zoo.suites import NOUN_CLASSES, get_suite, suite_names


def test_mt8_tasks_and_classes() -> None:
    suite = get_suite("mt8")
    sizes = {t.name: len(t.classes) for t in suite.tasks}
    assert sizes == {"sentiment": 2, "noun_sense": 24, "verb_sense": 15, "modifier_type": 3, "pkg_section": 20,
                     "text_lang": 9, "quote_topic": 12, "word_lang": 20}
    assert all(t.n_train == 2000 and t.n_test == 1000 for t in suite.tasks)
    names = {t.name: dict(zip(t.classes, t.names, strict=True)) for t in suite.tasks}
    assert names["pkg_section"]["x11"] == "the X window system" and names["word_lang"]["nb"] == "Norwegian Bokmal"
    assert names["modifier_type"] == {"adj_all": "a quality", "adj_pert": "relating to something",
                                      "adv_all": "a manner or degree"}


@pytest.mark.parametrize("n", [2, 5, 10])
def test_class_incremental_cuts_20_classes_in_hash_order(n: int) -> None:
    suite = get_suite(f"noun-ci-{n}-seq")
    assert suite.sequential and len(suite.tasks) == n
    order = [c for t in suite.tasks for c in t.classes]
    assert order == sorted(NOUN_CLASSES[:20], key=text_hash)
    assert all(t.per_class and t.n_train == 300 and t.n_test == 100 and t.eval_classes == tuple(order)
               for t in suite.tasks)
    assert not get_suite(f"noun-ci-{n}-ind").sequential


def test_quick_versions() -> None:
    quick = get_suite("mt8", quick=True)
    assert quick.name == "mt8-quick" and [t.name for t in quick.tasks] == ["sentiment", "noun_sense", "pkg_section"]
    assert get_suite("mt8-quick") == quick and all(t.n_train == 300 for t in quick.tasks)
    assert all(t.n_train == 20 for t in get_suite("pkg-ci-5-ind-quick").tasks)


def test_unknown_suite() -> None:
    with pytest.raises(MergelabError, match="unknown suite 'mt9'"):
        get_suite("mt9")
    assert "vader-domains" in suite_names()
