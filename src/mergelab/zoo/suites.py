"""The zoo's suites: which tasks, which classes and label names, how many rows (docs/data.md §4-5).

* ``mt8``: 8 text classification tasks, 2,000 train / 1,000 test each (docs/data.md §4);
* ``noun-ci-N-seq`` / ``noun-ci-N-ind`` (N = 2, 5, 10): class-incremental noun senses, 20 classes in
  ``h(name)`` order cut into N tasks, 300 train / 100 test per class, experts fine-tuned sequentially
  (task t starts from expert t-1) or independently from the base; scored with one joint 20-way head;
  ``pkg-ci-N-*`` is the same on pkg_section's 20 sections;
* ``vader-domains``: sentiment on VADER's 4 domains, 2,000 train each, the whole test split.

``quick=True`` (or a ``-quick`` suffix) gives a small version for tests and the demo.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from mergelab.errors import MergelabError
from mergelab.zoo import sources
from mergelab.zoo.splits import cap_per_class, text_hash

Example = tuple[str, str]


@dataclass(frozen=True)
class TaskSpec:
    """One task's data recipe. ``classes`` are raw labels in head order, ``names`` their prompt names."""

    name: str
    source: str  # key of SOURCES, or a user file (see mergelab.zoo.user)
    classes: tuple[str, ...]
    names: tuple[str, ...]
    n_train: int | None = 2000
    n_test: int | None = 1000
    per_class: bool = False  # n_train / n_test count per class (class-incremental suites)
    eval_classes: tuple[str, ...] | None = None  # joint head for scoring (class-incremental), else `classes`
    eval_names: tuple[str, ...] | None = None
    options: tuple[tuple[str, str], ...] = ()  # reader options of a user's file (format, text and label fields)


@dataclass(frozen=True)
class Suite:
    name: str
    tasks: tuple[TaskSpec, ...]
    sequential: bool = False  # expert t is fine-tuned from expert t-1 instead of from the base


def _noun_sense() -> list[Example]:
    return [e for e in sources.wordnet("noun") if e[1] not in ("Tops", "motive")]


def _top20_debian() -> list[Example]:
    return sources.debian_section()


SOURCES: dict[str, Callable[[], list[Example]]] = {
    **{f"vader_{d}": (lambda d=d: sources.vader(d)) for d in sources.VADER_FILES},  # type: ignore[misc]
    "wordnet_noun": _noun_sense,
    "wordnet_verb": lambda: sources.wordnet("verb"),
    "wordnet_modifier": lambda: sources.wordnet("adj", "adv", keep_pos=True, drop=("adj_ppl",)),
    "debian_section": _top20_debian,
    "fortune_lang": sources.fortune_lang,
    "fortune_topic": sources.fortune_topic,
    "word_lang": lambda: cap_per_class(sources.word_lang(), 3000),
}

LANGUAGES = {
    "en": "English", "fr": "French", "it": "Italian", "es": "Spanish", "de": "German", "nl": "Dutch",
    "sv": "Swedish", "da": "Danish", "nb": "Norwegian Bokmal", "nn": "Norwegian Nynorsk", "pl": "Polish",
    "pt": "Portuguese", "ca": "Catalan", "gl": "Galician", "fo": "Faroese", "ga": "Irish", "eo": "Esperanto",
    "bg": "Bulgarian", "uk": "Ukrainian", "gv": "Manx", "ru": "Russian", "cs": "Czech",
}
NOUN_CLASSES = tuple(
    "artifact person plant animal act communication state location attribute cognition substance group food "
    "body object quantity event possession time process phenomenon relation feeling shape".split()
)
VERB_CLASSES = tuple(
    "change contact communication motion social possession stative cognition creation body competition "
    "perception emotion consumption weather".split()
)
MODIFIERS = {"adj_all": "a quality", "adj_pert": "relating to something", "adv_all": "a manner or degree"}
SECTIONS = {
    "libs": "shared libraries", "libdevel": "library development files", "python": "Python", "doc": "documentation",
    "perl": "Perl", "utils": "utilities", "devel": "software development", "haskell": "Haskell", "net": "networking",
    "rust": "Rust", "golang": "the Go language", "javascript": "JavaScript", "java": "Java", "science": "science",
    "ruby": "Ruby", "admin": "system administration", "gnu-r": "the R language", "games": "games",
    "x11": "the X window system", "text": "text processing",
}
TOPICS = {t: t for t in sources.FORTUNE_TOPICS} | {
    "men-women": "men and women", "songs-poems": "songs and poems", "bofh-excuses": "excuses for computer failures",
}
TEXT_LANGS = ("ru", "de", "en", "es", "it", "pl", "cs", "pt", "eo")


def _task(name: str, source: str, names: dict[str, str], **kw: object) -> TaskSpec:
    return TaskSpec(name, source, tuple(names), tuple(names.values()), **kw)  # type: ignore[arg-type]


MT8 = (
    _task("sentiment", "vader_movie", {"positive": "positive", "negative": "negative"}),
    _task("noun_sense", "wordnet_noun", {c: c for c in NOUN_CLASSES}),
    _task("verb_sense", "wordnet_verb", {c: c for c in VERB_CLASSES}),
    _task("modifier_type", "wordnet_modifier", MODIFIERS),
    _task("pkg_section", "debian_section", SECTIONS),
    _task("text_lang", "fortune_lang", {c: LANGUAGES[c] for c in TEXT_LANGS}),
    _task("quote_topic", "fortune_topic", TOPICS),
    _task("word_lang", "word_lang", {c: LANGUAGES[c] for c in sources.WORD_LISTS}),
)
QUICK_MT8 = ("sentiment", "noun_sense", "pkg_section")
QUICK_ROWS = (300, 200)  # train, test rows per task in quick suites
QUICK_PER_CLASS = (20, 10)


def class_incremental(prefix: str, source: str, names: dict[str, str], n_tasks: int, sequential: bool) -> Suite:
    """20 classes ordered by ``h(name)``, cut into ``n_tasks`` consecutive tasks; one joint 20-way head for scoring."""
    order = sorted(names, key=text_hash)
    size = len(order) // n_tasks
    joint = tuple(order)
    tasks = tuple(
        TaskSpec(f"task{t + 1}", source, tuple(chunk), tuple(names[c] for c in chunk), 300, 100, per_class=True,
                 eval_classes=joint, eval_names=tuple(names[c] for c in joint))
        for t, chunk in enumerate(order[i: i + size] for i in range(0, len(order), size))
    )
    return Suite(f"{prefix}-ci-{n_tasks}-{'seq' if sequential else 'ind'}", tasks, sequential)


def _vader_domains() -> Suite:
    binary = {"positive": "positive", "negative": "negative"}
    return Suite("vader-domains", tuple(_task(d, f"vader_{d}", binary, n_test=None) for d in sources.VADER_FILES))


def suite_names() -> list[str]:
    names = ["mt8", "vader-domains"]
    names += [f"{p}-ci-{n}-{m}" for p in ("noun", "pkg") for n in (2, 5, 10) for m in ("seq", "ind")]
    return names


def get_suite(name: str, quick: bool = False) -> Suite:
    """The built-in suite ``name`` (``NAME-quick`` is the same as ``quick=True``)."""
    if name.endswith("-quick"):
        name, quick = name[: -len("-quick")], True
    ci = re.fullmatch(r"(noun|pkg)-ci-(2|5|10)-(seq|ind)", name)
    if name == "mt8":
        suite = Suite("mt8", MT8)
    elif name == "vader-domains":
        suite = _vader_domains()
    elif ci:
        top20 = {c: c for c in NOUN_CLASSES[:20]} if ci[1] == "noun" else SECTIONS
        source = "wordnet_noun" if ci[1] == "noun" else "debian_section"
        suite = class_incremental(ci[1], source, top20, int(ci[2]), ci[3] == "seq")
    else:
        raise MergelabError(f"unknown suite {name!r}; built-in suites: {', '.join(suite_names())} (or a suite YAML file)")
    return quick_version(suite) if quick else suite


def quick_version(suite: Suite) -> Suite:
    """Fewer rows (and for mt8 three tasks): what the tests and `make demo` build."""
    tasks = [t for t in suite.tasks if suite.name != "mt8" or t.name in QUICK_MT8]
    small = [replace(t, n_train=(QUICK_PER_CLASS if t.per_class else QUICK_ROWS)[0],
                     n_test=(QUICK_PER_CLASS if t.per_class else QUICK_ROWS)[1]) for t in tasks]
    return Suite(f"{suite.name}-quick", tuple(small), suite.sequential)
