"""Built-in merging methods: importing this package registers every public module in it.

One module per method; modules whose name starts with ``_`` hold helpers of this package only (the
numeric building blocks that the engine and others share are in :mod:`mergelab.ops`).
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_") and _info.name != "registry":
        importlib.import_module(f"{__name__}.{_info.name}")
