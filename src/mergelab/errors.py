"""The one error type users see: a single line naming the file and tensor at fault."""

from __future__ import annotations


class MergelabError(Exception):
    """Bad input or configuration. The CLI prints ``str(err)`` and exits with status 2.

    Args:
        message: what is wrong, in one line.
        file: the file (or input name) at fault, if any.
        tensor: the tensor name at fault, if any.
    """

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None):
        self.message = message
        self.file = file
        self.tensor = tensor
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = []
        if self.file:
            where.append(str(self.file))
        if self.tensor:
            where.append(f"tensor '{self.tensor}'")
        prefix = ": ".join(where)
        text = f"{prefix}: {self.message}" if prefix else self.message
        return " ".join(text.split())  # always one line
