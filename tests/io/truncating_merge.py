"""``python truncating_merge.py VICTIM TENSOR REPORT MERGELAB-ARGS...``: run ``mergelab`` with the input
file VICTIM truncated to zero bytes, as another process might, just after TENSOR of it is handed to the
merge -- between the source's size check and the read of the tensor's pages, which then faults
(SIGBUS). Before truncating, REPORT gets the names of the files in the temporary output folders beside
``--out`` (what a clean exit must remove). Run in a subprocess by ``test_truncated_while_read.py``:
the fault ends the process."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from mergelab.cli.main import main
from mergelab.io import sources

victim, tensor_name, report = os.path.abspath(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
argv = sys.argv[4:]
out_parent = Path(argv[argv.index("--out") + 1]).parent


def truncating(get):
    def wrapper(self, name, into=None):
        tensor = get(self, name, into)
        if name == tensor_name and os.path.abspath(self.file_of(name)) == victim and os.path.getsize(victim) > 0:
            temporaries = [p for p in out_parent.iterdir() if "mergelab-tmp" in p.name]
            report.write_text(json.dumps(sorted(f.name for t in temporaries for f in t.iterdir())))
            os.truncate(victim, 0)
        return tensor

    return wrapper


sources.SafetensorsSource.get = truncating(sources.SafetensorsSource.get)
sources.TorchSource.get = truncating(sources.TorchSource.get)
sys.exit(main(argv))
