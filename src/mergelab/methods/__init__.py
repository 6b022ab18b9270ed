"""Built-in merging methods; importing this package registers them all."""

from mergelab.methods import (  # noqa: F401
    task_arithmetic,
    ties,
    weight_average,
)
