"""Raw (text, label) examples from offline packaged datasets, one recipe per source (docs/data.md §2).

Each reader follows its recipe in docs/data.md §2 and ends with :func:`dedupe` (identical texts kept once,
a text seen with two labels dropped, over the whole source before any class filter). A missing file
raises a one-line :class:`MergelabError` naming the command that installs it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import tarfile
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from mergelab.errors import MergelabError

Example = tuple[str, str]  # (text, label)

INSTALL_HINT = "run `make zoo-data` (or scripts/install_zoo_data.sh)"
FORTUNE_INSTALL = "apt-get install " + " ".join(
    "fortunes fortunes-min fortunes-de fortunes-it fortunes-es fortunes-br fortunes-pl fortunes-ru fortunes-cs "
    "fortunes-eo fortunes-mario fortune-anarchism fortunes-bofh-excuses".split())
VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
VADER_FILES = {
    "movie": "movieReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
}
# lexnames(5WN), in lexicographer file number order
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object "
    "noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
    "noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession "
    "verb.social verb.stative verb.weather adj.ppl"
).split()
FORTUNE_LANG_DIRS = ("de", "es", "it", "pl", "cs", "ru", "eo")
# the top-level files of the Debian packages `fortunes` + `fortunes-min`, minus ascii-art debian pratchett tao translate-me
FORTUNE_ENGLISH = (
    "art computers cookie definitions disclaimer drugs education ethnic food fortunes goedel humorists kids knghtbrd "
    "law linux linuxcookie literature love magic medicine men-women miscellaneous news paradoxum people perl pets "
    "platitudes politics riddles science songs-poems sports startrek wisdom work zippy"
).split()
FORTUNE_PORTUGUESE = ("brasil", "mario.geral", "mario.gauchismos", "mario.computadores", "mario.piadas")
FORTUNE_TOPICS = (
    "people definitions anarchism computers politics work science men-women songs-poems platitudes bofh-excuses art"
).split()
# language -> (word list under /usr/share/dict, encoding); Debian package: DICT_PACKAGES
WORD_LISTS = {
    "en": ("american-english", "utf-8"), "fr": ("french", "utf-8"), "it": ("italian", "utf-8"),
    "es": ("spanish", "utf-8"), "de": ("ngerman", "utf-8"), "nl": ("dutch", "utf-8"),
    "sv": ("swedish", "iso-8859-1"), "da": ("danish", "utf-8"), "nb": ("bokmaal", "iso-8859-1"),
    "nn": ("nynorsk", "iso-8859-1"), "pl": ("polish", "utf-8"), "pt": ("portuguese", "utf-8"),
    "ca": ("catalan", "utf-8"), "gl": ("galician-minimos", "utf-8"), "fo": ("faroese", "utf-8"),
    "ga": ("irish", "utf-8"), "eo": ("esperanto", "utf-8"), "bg": ("bulgarian", "utf-8"),
    "uk": ("ukrainian", "utf-8"), "gv": ("manx", "iso-8859-1"),
}
DICT_PACKAGES = {"american-english": "wamerican", "ngerman": "wngerman", "bokmaal": "wnorwegian",
                 "nynorsk": "wnorwegian", "galician-minimos": "wgalician-minimos"}
DEBIAN_TSV = "debian_section.tsv.gz"
DEBIAN_TSV_SHA256 = "c86459620e5ccc423721d1bed9df43a7bc9eaa4cece4f0e7574ba1b40ada44ea"


def roots() -> dict[str, Path]:
    """Where the readers look; each root can be moved with an environment variable (tests use this)."""
    cache = Path(os.environ.get("MERGELAB_CACHE", Path.home() / ".cache" / "mergelab"))
    return {
        "data": Path(os.environ.get("MERGELAB_DATA", cache / "data")),
        "wordnet": Path(os.environ.get("MERGELAB_WORDNET_DIR", "/usr/share/wordnet")),
        "fortunes": Path(os.environ.get("MERGELAB_FORTUNES_DIR", "/usr/share/games/fortunes")),
        "dict": Path(os.environ.get("MERGELAB_DICT_DIR", "/usr/share/dict")),
    }


def dedupe(examples: Iterable[Example]) -> list[Example]:
    """Identical texts kept once (first label); a text seen with two different labels dropped."""
    first: dict[str, str] = {}
    clash: set[str] = set()
    for text, label in examples:
        if text in first and first[text] != label:
            clash.add(text)
        first.setdefault(text, label)
    return [(text, label) for text, label in first.items() if text not in clash]


def _need(path: Path, install: str) -> Path:
    if not path.exists():
        raise MergelabError(f"dataset file missing; install it with `{install}` or run `make zoo-data`", file=str(path))
    return path


def vader(domain: str) -> list[Example]:
    """VADER ground truth (Hutto & Gilbert 2014) of one domain, |mean score| >= 0.5, read from the sdist."""
    data = roots()["data"]
    sdist = _need(data / VADER_SDIST, f"pip download --no-deps --no-binary :all: -d {data} vaderSentiment==3.3.2")
    with tarfile.open(sdist) as outer:
        inner_bytes = _extract(outer, "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz", sdist)
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        raw = _extract(inner, f"hutto_ICWSM_2014/{VADER_FILES[domain]}", sdist).decode("utf-8")
    out = []
    for line in raw.splitlines():  # not csv: its quote handling alters texts containing '"'
        _id, score, text = line.split("\t")
        if abs(float(score)) >= 0.5:
            out.append((text.strip(), "positive" if float(score) > 0 else "negative"))
    return dedupe(out)


def _extract(archive: tarfile.TarFile, member: str, label: Path) -> bytes:
    handle = archive.extractfile(member) if member in archive.getnames() else None
    if handle is None:
        raise MergelabError(f"{member} not found in the archive; {INSTALL_HINT}", file=str(label))
    return handle.read()


def wordnet(*parts: str, keep_pos: bool = False, drop: tuple[str, ...] = ()) -> list[Example]:
    """WordNet 3.0 glosses labelled by lexicographer file: the part after the dot (``artifact``), or with
    ``keep_pos`` the whole name with ``_`` for the dot (``adj_all``, ``adv_all``: adjective and adverb files share ``all``).
    Labels in ``drop`` are left out before de-duplication (adj.ppl, docs/data.md §2)."""
    out = []
    for part in parts:
        with open(_need(roots()["wordnet"] / f"data.{part}", "apt-get install wordnet-base"), encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("  "):  # the licence header
                    continue
                head, gloss = line.split("|", 1)
                lexname = LEXNAMES[int(head.split()[1])]
                label = lexname.replace(".", "_") if keep_pos else lexname.split(".", 1)[1]
                if label not in drop:
                    out.append((gloss.split('; "')[0].strip(), label))
    return dedupe(out)


def _cookies(path: Path) -> list[str]:
    with open(_need(path, FORTUNE_INSTALL), encoding="utf-8") as handle:
        cookies = [re.sub(r"\s+", " ", c).strip() for c in handle.read().split("\n%\n")]
    return [c for c in cookies if 20 <= len(c) <= 400]


def _cookie_files(folder: Path) -> list[Path]:
    skip = (".dat", ".u8")
    return sorted(p for p in _need(folder, FORTUNE_INSTALL).iterdir()
                  if not p.is_symlink() and p.is_file() and not p.name.endswith(skip) and p.name != "debian-hints")


def fortune_lang() -> list[Example]:
    """Fortune cookies labelled by language (9 languages)."""
    base = roots()["fortunes"]
    out = [(c, "en") for name in FORTUNE_ENGLISH for c in _cookies(base / name)]
    out += [(c, "pt") for name in FORTUNE_PORTUGUESE for c in _cookies(base / name)]
    for lang in FORTUNE_LANG_DIRS:
        out += [(c, lang) for path in _cookie_files(base / lang) for c in _cookies(path)]
    return dedupe(out)


def fortune_topic() -> list[Example]:
    """English fortune cookies labelled by topic file, de-duplicated over all English files, then 12 topics kept."""
    base = roots()["fortunes"]
    files = sorted(set(FORTUNE_ENGLISH) | set(FORTUNE_TOPICS))
    examples = dedupe((c, topic) for topic in files for c in _cookies(base / topic))
    return [(text, label) for text, label in examples if label in FORTUNE_TOPICS]


def word_lang() -> list[Example]:
    """Single words (>= 4 characters, no apostrophe) labelled by the language of their word list."""
    out = []
    for lang, (name, encoding) in WORD_LISTS.items():
        package = DICT_PACKAGES.get(name, "w" + name)
        with open(_need(roots()["dict"] / name, f"apt-get install {package}"), encoding=encoding) as handle:
            out += [(w.strip(), lang) for w in handle if len(w.strip()) >= 4 and "'" not in w]
    return dedupe(out)


def debian_records(dumpavail: str) -> list[Example]:
    """(first Description line, Section without area) of each `apt-cache dumpavail` record having both."""
    out = []
    for record in dumpavail.split("\n\n"):
        desc = re.search(r"^Description: (.*)$", record, re.M)
        section = re.search(r"^Section: (.*)$", record, re.M)
        if desc and section:
            out.append((desc[1], section[1].split("/")[-1]))
    return dedupe(out)


def debian_section() -> list[Example]:
    """The frozen Debian bookworm (amd64, main) description -> section TSV shipped with mergelab."""
    data = resources.files("mergelab.zoo").joinpath("data").joinpath(DEBIAN_TSV).read_bytes()
    if hashlib.sha256(data).hexdigest() != DEBIAN_TSV_SHA256:
        raise MergelabError("sha256 mismatch: the frozen Debian TSV was altered", file=DEBIAN_TSV)
    lines = gzip.decompress(data).decode("utf-8").split("\n")[:-1]
    return [(text, label) for text, label in (line.split("\t") for line in lines)]
