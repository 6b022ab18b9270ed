"""The fixed hash split of every zoo task (docs/data.md §3).

``h(text) = int(sha256("mergelab:" + text), 16)``; test = ``h % 5 == 0`` (about 20 %), train = the rest.
Each split is sorted by ``h`` and its first N rows taken, so sub-samples are fixed too. A per-class cap
applied before splitting uses a differently salted hash, else the capped classes crowd the first test rows.
The validation rows (:func:`validation`, for tuning merges) are the training split's rows that follow the
first N train rows: never trained on, never tested on, and train / test rows stay what they were.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence

Example = tuple[str, str]
SALT = "mergelab:"
CAP_SALT = "mergelab-cap:"


def text_hash(text: str, salt: str = SALT) -> int:
    return int(hashlib.sha256((salt + text).encode("utf-8")).hexdigest(), 16)


def split(examples: Iterable[Example], n_train: int | None, n_test: int | None) -> tuple[list[Example], list[Example]]:
    """``(train, test)``: the first ``n_train`` / ``n_test`` rows of each split in ``h`` order (None: all)."""
    keyed = sorted((text_hash(text), text, label) for text, label in examples)
    train = [(text, label) for h, text, label in keyed if h % 5 != 0]
    test = [(text, label) for h, text, label in keyed if h % 5 == 0]
    return train[:n_train], test[:n_test]


def cap_per_class(examples: Iterable[Example], cap: int) -> list[Example]:
    """At most ``cap`` examples per class, the first in ``CAP_SALT``-hash order (applied before :func:`split`)."""
    by_class: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for text, label in examples:
        by_class[label].append((text_hash(text, CAP_SALT), text))
    return [(text, label) for label, rows in by_class.items() for _, text in sorted(rows)[:cap]]


def first_per_class(rows: Sequence[Example], classes: Iterable[str], n: int | None) -> list[Example]:
    """The first ``n`` rows of each class in ``rows``' order (rows already in ``h`` order), classes in ``classes`` only."""
    wanted = set(classes)
    taken: dict[str, int] = defaultdict(int)
    out = []
    for text, label in rows:
        if label in wanted and (n is None or taken[label] < n):
            taken[label] += 1
            out.append((text, label))
    return out


def validation(examples: Iterable[Example], n_train: int | None, n_val: int | None,
               classes: Iterable[str] | None = None) -> list[Example]:
    """The validation rows: the training split's rows after the first ``n_train`` (those the experts train
    on), the first ``n_val`` of them in ``h`` order (None: all). With ``classes`` (per-class tasks),
    ``n_train`` and ``n_val`` count per class, as :func:`first_per_class` does for train and test."""
    keyed = sorted((text_hash(text), text, label) for text, label in examples)
    pool = [(text, label) for h, text, label in keyed if h % 5 != 0]
    if classes is None:
        return [] if n_train is None else pool[n_train:][:n_val]
    wanted = list(classes)
    taken = set(first_per_class(pool, wanted, n_train)) if n_train is not None else set(pool)
    return first_per_class([row for row in pool if row not in taken], wanted, n_val)
