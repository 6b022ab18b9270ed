"""Help screens: every subcommand's ``--help`` ends with a few example command lines."""

from __future__ import annotations

import argparse
from typing import Any


def examples(*lines: str) -> dict[str, Any]:
    """``add_parser`` keyword arguments for an epilog of example command lines, printed as written."""
    return {"epilog": "examples:\n" + "\n".join(f"  {line}" for line in lines),
            "formatter_class": argparse.RawDescriptionHelpFormatter}
