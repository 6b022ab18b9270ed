"""Freeze the debian_section task's data: `apt-cache dumpavail` -> top-20 sections TSV (gzip) + sha256.

Run once (the archive index changes with point releases, so CI never rebuilds it):
    .venv/bin/python scripts/freeze_debian_tsv.py src/mergelab/zoo/data/debian_section.tsv.gz
then paste the printed sha256 into DEBIAN_TSV_SHA256 in src/mergelab/zoo/sources.py.
"""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import sys
from collections import Counter

from mergelab.zoo.sources import debian_records


def main(out: str) -> None:
    dump = subprocess.run(["apt-cache", "dumpavail"], check=True, capture_output=True, text=True).stdout
    examples = debian_records(dump)
    counts = Counter(label for _, label in examples)
    top = {label for label, _ in counts.most_common(20)}
    rows = sorted(f"{text}\t{label}" for text, label in examples if label in top and "\t" not in text)
    data = gzip.compress(("\n".join(rows) + "\n").encode("utf-8"), compresslevel=9, mtime=0)
    with open(out, "wb") as handle:
        handle.write(data)
    print(f"{len(examples)} records, {len(counts)} sections; top 20: {len(rows)} rows")
    print(f"sha256 {hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    main(sys.argv[1])
