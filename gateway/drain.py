"""Graceful drain on SIGTERM or Ctrl-C: finish what is in flight, refuse what is new, exit 0.

```
signal ──▶ DrainingServer.handle_exit ──▶ Drain.start()       new requests: `refuse` (503)
uvicorn's tick (every 0.1 s): nothing in flight, or drain_timeout_s passed
        ──▶ uvicorn's shutdown: close the sockets, GRACE_S for the last bytes, lifespan exit
a second signal: uvicorn's own handling (GRACE_S for the last bytes, then stop)
```

While draining, `DrainMiddleware` answers new work with `refuse`:
- the gateway: every request but `/health` and `/metrics` gets OpenAI's 503
  `server_shutting_down` with `connection: close` (`/ready` too, so a load balancer stops
  sending traffic);
- a replica: new generations and warm-ups get its protocol's overloaded error (gateways answer
  a 503 `engine_overloaded`); stats, aborts and the rest still answer, so gateways keep the
  replica's open streams (their liveness probe reads its stats). Its stats and heartbeat say
  `draining`, and gateways then route new requests to other replicas.
A stream still open at the deadline is cut when uvicorn cancels it (its client sees the
connection close); its quota is settled as for a client that went away.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import cast

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("prefixgate.drain")

GRACE_S = 2  # uvicorn's own graceful shutdown, after the drain: the last bytes go out
DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
GATEWAY_ANSWERED = frozenset({"/health", "/metrics"})  # paths a draining gateway still serves


class Drain:
    """The HTTP requests in flight, and whether (and until when) the process is draining."""

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self.in_flight = 0
        self.deadline: float | None = None  # set once, by `start`
        self._clock = clock

    def hold(self, n: int) -> None:
        """Count `n` more (or, negative, fewer) in flight: work that outlives the HTTP request
        that started it (a replica's generations, whose deltas go to a channel)."""
        self.in_flight += n

    @property
    def draining(self) -> bool:
        return self.deadline is not None

    def start(self) -> None:
        """Begin draining (a second call changes nothing)."""
        if self.deadline is None:
            self.deadline = self._clock() + self.timeout_s
            log.warning(
                "draining: %d requests in flight, new ones get 503; exit within %gs",
                self.in_flight,
                self.timeout_s,
            )

    def done(self) -> bool:
        """Draining, and nothing left in flight or the deadline passed."""
        if self.deadline is None:
            return False
        return self.in_flight == 0 or self._clock() >= self.deadline


class DrainMiddleware:
    """Counts HTTP requests in flight; while draining, answers those whose path `answered`
    refuses with `refuse`."""

    def __init__(
        self, app: ASGIApp, drain: Drain, refuse: ASGIApp, answered: Callable[[str], bool]
    ) -> None:
        self.app = app
        self.drain = drain
        self.refuse = refuse
        self.answered = answered

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.answered(scope["path"]):
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            await self.refuse(scope, receive, send)
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


class DrainingServer(uvicorn.Server):
    """uvicorn's server, draining on the first SIGTERM or SIGINT (see the module docstring).

    A drained run returns normally (the process exits 0); uvicorn re-raises a signal only when
    a second one cut the drain short."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig in DRAIN_SIGNALS and not self.drain.draining:
            self.drain.start()
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain.done():
            self.should_exit = True
        return await super().on_tick(counter)


def draining_server(
    config: uvicorn.Config, drain: Drain, refuse: ASGIApp, answered: Callable[[str], bool]
) -> DrainingServer:
    """A `DrainingServer` over `config`'s app wrapped in `DrainMiddleware`."""
    config.app = DrainMiddleware(cast(ASGIApp, config.app), drain, refuse, answered)
    config.timeout_graceful_shutdown = GRACE_S
    return DrainingServer(config, drain)
