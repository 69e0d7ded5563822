"""The one exception a receiver sees for a payload it cannot trust."""

from __future__ import annotations


class PayloadError(ValueError):
    """A received payload failed validation; nothing from it was used.

    A bad client reply is a domain error, not a crash: the server catches this, drops that
    reply and keeps the round going.

    Attributes:
        check: short stable name of the failed check ("magic", "version", "schema",
            "truncated", "index-range", "count", "scale-finite", "value-finite", "size-limit",
            "dtype", "trailing-bytes", "mode", "header", "padding", "value-code",
            "rice-param", "positions", "chunk", "scale-range"; for the chained downlink
            "chain-header", "chain-version", "chain-segments", "chain-digest"), for metrics and
            tests.
    """

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"[{check}] {message}")
        self.check = check
