"""Round progress: a Grid wrapper that sees each reply as it arrives, and what it reports.

``strategy.start`` blocks inside ``grid.send_and_receive`` for a whole training (or evaluation)
phase, so the only place that can tell "7 of 10 clients done" is the Grid. :class:`WatchedGrid`
delegates every Grid method to the real grid and re-implements ``send_and_receive`` with the very
loop of Flower's ``InMemoryGrid``/``HttpGrid`` (push, then pull every ``pull_interval``
until every reply arrived or ``timeout`` ran out: the same timeout semantics), reporting each
pulled batch to a :class:`RoundWatch`; only the in-memory grid is polled more often (20 ms).
The loop calls only the public ``Grid.push_messages``/``pull_messages``; which Grid class it
faces and how long that class waits between pulls come from :mod:`feddistill.flower_compat`,
which checks at import that Flower's loops still wait that way. For any other Grid, Flower's own
``send_and_receive`` runs. The round loop itself stays Flower's.

:class:`RoundWatch` keeps the per-round facts the run record wants (each training reply's
``state-bytes``) and, when asked, draws progress: round i of N, clients done, ETA, on one
rewritten line on a terminal, or at most one line per round otherwise (logs, CI).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Iterable
from typing import TextIO

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from feddistill import flower_compat, keys
from feddistill.server.grids import DelegatingGrid

# The simulation's InMemoryGrid polls every 0.1 s (its constructor's default); a pull there is a
# dictionary lookup, and a shorter wait takes up to 0.1 s off each phase of every round.
IN_MEMORY_PULL_INTERVAL = 0.02


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class RoundWatch:
    """Collects per-round reply facts; draws progress when ``display`` is ``tty`` or ``lines``.

    ``display``: ``"off"`` (record only), ``"tty"`` (one line rewritten in place) or
    ``"lines"`` (one line when a round's training phase ends), ``"auto"`` picks ``tty`` when
    ``stream`` is a terminal, else ``lines``.
    """

    def __init__(self, num_rounds: int, display: str = "off", stream: TextIO | None = None):
        self.num_rounds = num_rounds
        self.stream = stream if stream is not None else sys.stderr
        if display == "auto":
            display = "tty" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        if display not in ("off", "tty", "lines"):
            raise ValueError(f"display must be 'off', 'tty', 'lines' or 'auto', got {display!r}")
        self.display = display
        self.state_bytes: dict[int, list[float]] = {}
        self.round_seconds: dict[int, float] = {}
        self._round = 0
        self._round_started = 0.0
        self._phase = ""
        self._expected = 0
        self._done = 0
        self._drawn_at = 0.0
        self._line_shown = False

    # -- called by WatchedGrid ----------------------------------------------------------------
    def begin(self, messages: list[Message]) -> None:
        phase = messages[0].metadata.message_type.split(".")[0] if messages else ""
        server_round = self._round_of(messages)
        if not server_round:  # no "server-round" in the config: count training phases
            server_round = self._round + (phase == "train")
        now = time.monotonic()
        if phase == "train" and server_round != self._round:
            if self._round:
                self.round_seconds[self._round] = now - self._round_started
            self._round, self._round_started = server_round, now
        self._phase, self._expected, self._done = phase, len(messages), 0
        self._draw(force=True)

    def replies(self, replies: Iterable[Message]) -> None:
        for msg in replies:
            self._done += 1
            if self._phase == "train" and not msg.has_error():
                metrics = msg.content.metric_records.get(keys.METRICS)
                value = None if metrics is None else metrics.get(keys.STATE_BYTES)
                # Read before admission control: a hostile NaN must not reach results.json.
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.state_bytes.setdefault(self._round, []).append(float(value))
        self._draw()

    def end(self) -> None:
        if self.display == "tty" and self._line_shown:
            # Clear the line: the round's log line is printed next, by the server.
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._line_shown = False
        elif self.display == "lines" and self._phase == "train" and self._expected:
            self.stream.write(self._line() + "\n")
            self.stream.flush()

    # -- what the run record reads ------------------------------------------------------------
    def state_bytes_summary(self, server_round: int) -> dict[str, float | None]:
        """Mean and max ``state-bytes`` over the round's successful training replies."""
        values = self.state_bytes.get(server_round, [])
        return {
            "state_bytes_mean": statistics.fmean(values) if values else None,
            "state_bytes_max": max(values) if values else None,
        }

    # -- drawing ------------------------------------------------------------------------------
    @staticmethod
    def _round_of(messages: list[Message]) -> int:
        if not messages:
            return 0
        content: RecordDict = messages[0].content
        for record in content.config_records.values():
            value = record.get(keys.SERVER_ROUND)
            if isinstance(value, int):
                return value
        return 0

    def eta_seconds(self) -> float | None:
        """Seconds left at the pace of finished rounds after the first (round 1 also pays for
        start-up), else of this round's finished clients, else of round 1; None before that."""
        in_round = time.monotonic() - self._round_started
        later = [s for r, s in self.round_seconds.items() if r > 1]
        if later:
            per_round = statistics.fmean(later)
        elif self._phase == "train" and self._done:
            per_round = in_round * self._expected / self._done
        elif self.round_seconds:
            per_round = statistics.fmean(self.round_seconds.values())
        else:
            return None
        return max(per_round * (self.num_rounds - self._round + 1) - in_round, 0.0)

    def _line(self) -> str:
        eta = self.eta_seconds()
        phase = "training" if self._phase == "train" else "evaluating"
        return (
            f"round {self._round}/{self.num_rounds}  {phase}: {self._done}/{self._expected} "
            f"clients done  {_fmt_duration(time.monotonic() - self._round_started)} in round  "
            f"ETA {'--' if eta is None else _fmt_duration(eta)}"
        )

    def _draw(self, force: bool = False) -> None:
        if self.display != "tty" or not self._expected:
            return
        now = time.monotonic()
        if not force and now - self._drawn_at < 0.5:
            return
        self._drawn_at = now
        self.stream.write("\r\033[K" + self._line())
        self.stream.flush()
        self._line_shown = True


class WatchedGrid(DelegatingGrid):
    """Delegates to ``inner``; ``send_and_receive`` reports replies to ``watch`` as they come."""

    def __init__(self, inner: Grid, watch: RoundWatch) -> None:
        super().__init__(inner)
        self.watch = watch

    def _pull_interval(self) -> float | None:
        if flower_compat.is_in_memory_grid(self.inner):
            return min(flower_compat.in_memory_pull_interval(self.inner), IN_MEMORY_PULL_INTERVAL)
        if flower_compat.is_http_grid(self.inner):
            return flower_compat.HTTP_GRID_PULL_INTERVAL
        return None  # a grid we do not know the loop of: let it run its own

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        self.watch.begin(messages)
        interval = self._pull_interval()
        try:
            if interval is None:
                replies = list(self.inner.send_and_receive(messages, timeout=timeout))
                self.watch.replies(replies)
                return replies
            # Flower's loop (1.42), unchanged but for the report after each pull.
            msg_ids = set(self.push_messages(messages))
            del messages
            end_time = time.time() + (timeout if timeout is not None else 0.0)
            ret: list[Message] = []
            while timeout is None or time.time() < end_time:
                res_msgs = list(self.pull_messages(msg_ids))
                ret.extend(res_msgs)
                msg_ids.difference_update({msg.metadata.reply_to_message_id for msg in res_msgs})
                self.watch.replies(res_msgs)
                if len(msg_ids) == 0:
                    break
                time.sleep(interval)
            return ret
        finally:
            self.watch.end()
