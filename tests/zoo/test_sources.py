"""Dataset recipes (docs/data.md §2) on small synthetic files laid out like the real ones."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from mergelab.errors import MergelabError
from mergelab.zoo import sources


@pytest.fixture()
def roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for env, sub in (("MERGELAB_DATA", "data"), ("MERGELAB_WORDNET_DIR", "wordnet"),
                     ("MERGELAB_FORTUNES_DIR", "fortunes"), ("MERGELAB_DICT_DIR", "dict")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(env, str(tmp_path / sub))
    return tmp_path


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_vader_sdist(folder: Path, movie: str) -> None:
    """The sdist layout: vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz holding the TSVs."""
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as archive:
        for domain, name in sources.VADER_FILES.items():
            _add(archive, f"hutto_ICWSM_2014/{name}", (movie if domain == "movie" else "1\t1.0\tok text").encode())
    with tarfile.open(folder / sources.VADER_SDIST, "w:gz") as outer:
        _add(outer, "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz", inner.getvalue())


def test_vader_keeps_strong_scores_and_quotes(roots: Path) -> None:
    # |score| < 0.5 dropped; '"' kept as is (csv would alter it); no final newline (like the amazon file)
    movie = '1\t2.5\ta "great" film \n2\t-0.3\tmeh\n3\t-1.2\tdull\n4\t0.5\tfine'
    write_vader_sdist(roots / "data", movie)
    assert sources.vader("movie") == [('a "great" film', "positive"), ("dull", "negative"), ("fine", "positive")]


def test_wordnet_gloss_label_and_header(roots: Path) -> None:
    lines = [
        "  1 This software and database is being provided ...",  # licence header: two spaces
        "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which exists; \"a living entity\"",
        "00002137 06 n 02 thing 0 | an artifact; \"a small thing\"; \"another\"",
        "00002200 04 n 01 act 0 | an artifact",  # same gloss, other label: dropped
        "00002300 16 n 01 why 0 | a reason",
    ]
    (roots / "wordnet" / "data.noun").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert sources.wordnet("noun") == [("that which exists", "Tops"), ("a reason", "motive")]
    assert sources.wordnet("noun", keep_pos=True)[0] == ("that which exists", "noun_Tops")
    assert sources.wordnet("noun", drop=("motive",)) == [("that which exists", "Tops")]


def test_fortunes_split_filter_and_skips(roots: Path) -> None:
    base = roots / "fortunes"
    long_one = "x" * 401
    (base / "de").mkdir()
    (base / "de" / "sprueche").write_text("Ein  Spruch,\n der lang genug ist.\n%\nkurz\n%\n" + long_one + "\n",
                                          encoding="utf-8")
    (base / "de" / "sprueche.dat").write_bytes(b"\x00binary")
    (base / "de" / "alias").symlink_to(base / "de" / "sprueche")
    for name in sources.FORTUNE_ENGLISH + list(sources.FORTUNE_PORTUGUESE):
        (base / name).write_text("", encoding="utf-8")
    (base / "people").write_text("People are strange when you are a stranger.\n%\n", encoding="utf-8")
    for lang in sources.FORTUNE_LANG_DIRS:
        (base / lang).mkdir(exist_ok=True)
    rows = sources.fortune_lang()
    assert ("Ein Spruch, der lang genug ist.", "de") in rows and len(rows) == 2  # symlink and .dat skipped
    for topic in sources.FORTUNE_TOPICS:
        (base / topic).touch()
    assert sources.fortune_topic() == [("People are strange when you are a stranger.", "people")]


def test_word_lists_length_apostrophe_and_latin1(roots: Path) -> None:
    for name, encoding in sources.WORD_LISTS.values():
        (roots / "dict" / name).write_text("", encoding=encoding)
    (roots / "dict" / "swedish").write_bytes("hus\nb\u00e5tar\nkatt's\nhimmel\n".encode("iso-8859-1"))
    assert sources.word_lang() == [("b\u00e5tar", "sv"), ("himmel", "sv")]


def test_debian_records_and_the_frozen_tsv() -> None:
    dump = "Package: a\nSection: libs\nDescription: A lib\n\nPackage: b\nDescription: no section\n\n" \
           "Package: c\nSection: contrib/net\nDescription: A tool\n continued\n"
    assert sources.debian_records(dump) == [("A lib", "libs"), ("A tool", "net")]
    rows = sources.debian_section()  # the shipped file, checked against its sha256 on every read
    assert len(rows) == 48676 and len({label for _, label in rows}) == 20


def test_frozen_tsv_hash_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "DEBIAN_TSV_SHA256", hashlib.sha256(b"other").hexdigest())
    with pytest.raises(MergelabError, match="sha256 mismatch"):
        sources.debian_section()


def test_missing_file_names_the_install_command(roots: Path) -> None:
    with pytest.raises(MergelabError, match="apt-get install wordnet-base") as err:
        sources.wordnet("verb")
    assert "data.verb" in str(err.value) and "make zoo-data" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(MergelabError, match="vaderSentiment==3.3.2"):
        sources.vader("nyt")
    with pytest.raises(MergelabError, match="apt-get install wamerican"):
        sources.word_lang()


def test_dedupe_keeps_first_and_drops_clashes() -> None:
    rows = [("a", "x"), ("b", "x"), ("a", "x"), ("b", "y"), ("c", "z")]
    assert sources.dedupe(rows) == [("a", "x"), ("c", "z")]


def test_frozen_tsv_is_gzip_of_tab_rows() -> None:
    from importlib import resources

    data = resources.files("mergelab.zoo").joinpath("data").joinpath(sources.DEBIAN_TSV).read_bytes()
    first = gzip.decompress(data).decode("utf-8").split("\n")[0]
    assert first.count("\t") == 1
