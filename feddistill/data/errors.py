"""The one exception type of :mod:`feddistill.data`."""

from __future__ import annotations


class DataError(ValueError):
    """A data source, column, label set or partitioning setting cannot be used.

    It subclasses ``ValueError`` (a bad argument, in Flower's convention) so callers that only
    know the standard library still catch it; callers that want to tell data problems apart
    from other bad arguments (the CLI, a client reporting a failed precondition) catch this.
    The message names the config option, the value received and what is allowed.
    """
