"""Built-in merging methods: importing this package registers every public module in it.

One module per method; modules whose name starts with ``_`` hold shared helpers only.
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_") and _info.name != "registry":
        importlib.import_module(f"{__name__}.{_info.name}")
