"""The shared state: one snapshot, versioned, serialized once per change.

Writers (the refresher's pollers and the PubSub subscription) call :meth:`SharedState.update`
with a value and the slot it was read at. An update older than the slot held is dropped,
so a slow poll never overwrites a newer push. A new :class:`Snapshot` is published only
when a field really changes; its JSON bytes are built once and then serve /api/state,
the WebSocket ``stateUpdate`` frame and the ETag alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from .config import Config

log = logging.getLogger("edgestate.state")

FIELDS = ("tokenPrice", "jackpot", "participants")
LAMPORTS_PER_SOL = 1_000_000_000


@dataclass(frozen=True, slots=True)
class FieldValue:
    """One field of the state as last confirmed from upstream."""

    value: Any
    slot: int  # slot the value was read at (0 when the source has none, e.g. prices)
    confirmed_at: float  # trio time of the last upstream confirmation (change or not)
    source: str  # "push" or "poll"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An immutable published state; ``body`` is the GET /api/state JSON."""

    version: int
    token_price: float | None
    jackpot_lamports: int | None
    participants: int | None
    slot: int
    last_update_ms: int
    stale: bool
    body: bytes
    etag: str

    @property
    def jackpot(self) -> float | None:
        return None if self.jackpot_lamports is None else self.jackpot_lamports / LAMPORTS_PER_SOL


def etag_of(payload: bytes) -> str:
    """The strong ETag of a response body (the one ETag function of the server)."""
    return '"' + hashlib.blake2b(payload, digest_size=10).hexdigest() + '"'


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


class SharedState:
    """The current lottery state and its subscribers.

    All mutation happens in plain synchronous methods, so an update and its publication
    are atomic with respect to other Trio tasks.
    """

    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg
        self._fields: dict[str, FieldValue | None] = dict.fromkeys(FIELDS)
        self._callbacks: list[Callable[[Snapshot], None]] = []
        self._changed = trio.Event()
        self._updates = 0
        self._dropped_older = 0
        self._confirmations = 0
        self._by_source = {"push": 0, "poll": 0}
        self._snapshot = self._build(version=0, stale=True)

    # -- reading -----------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def field(self, name: str) -> FieldValue | None:
        return self._fields[name]

    def stale_fields(self) -> list[str]:
        """Fields never confirmed, or not confirmed within ``state.max_staleness``."""
        now = trio.current_time()
        limit = self._cfg.state.max_staleness
        return [
            name
            for name, fv in self._fields.items()
            if fv is None or now - fv.confirmed_at > limit
        ]

    def ready(self) -> tuple[bool, str]:
        """(True, "") when every field is fresh, else (False, a reason naming the fields)."""
        stale = self.stale_fields()
        if not stale:
            return True, ""
        never = [n for n in stale if self._fields[n] is None]
        old = [n for n in stale if self._fields[n] is not None]
        parts = []
        if never:
            parts.append(f"no upstream data yet for {', '.join(never)}")
        if old:
            parts.append(
                f"{', '.join(old)} older than state.max_staleness ({self._cfg.state.max_staleness:g}s)"
            )
        return False, "; ".join(parts)

    # -- writing -----------------------------------------------------------------

    def update(self, name: str, value: Any, *, slot: int = 0, source: str = "poll", force: bool = False) -> bool:
        """Record a value read from upstream; publish a snapshot if it changed.

        Returns True when a new snapshot was published. A value read at an older slot
        than the one held is dropped (a slow poll racing a newer push), unless ``force``
        (a feed adopting a new parent's state: its slot is taken as is).
        """
        return self.update_many({name: value}, slot=slot, source=source, force=force)

    def update_many(
        self, values: Mapping[str, Any], *, slot: int = 0, source: str = "poll", force: bool = False
    ) -> bool:
        """:meth:`update` for several fields read together (a parent's ``stateUpdate``).

        At most one snapshot is published for all of them.
        """
        for name in values:
            if name not in self._fields:
                raise KeyError(name)
        now = trio.current_time()
        recorded = changed = False
        for name, value in values.items():
            held = self._fields[name]
            if not force and held is not None and slot and held.slot and slot < held.slot:
                self._dropped_older += 1
                continue
            kept = slot if force else max(slot, held.slot if held else 0)
            self._fields[name] = FieldValue(value, kept, now, source)
            self._by_source[source] = self._by_source.get(source, 0) + 1
            recorded = True
            if held is not None and held.value == value:
                self._confirmations += 1  # unchanged: fresher, nothing to publish for it
            else:
                changed = True
        if changed:
            self._publish()
            return True
        # Nothing changed: publish only if the stale flag flips.
        return self.refresh_staleness() if recorded else False

    def refresh_staleness(self) -> bool:
        """Republish if the ``stale`` flag of the snapshot no longer holds (called periodically)."""
        if self._snapshot.stale == bool(self.stale_fields()):
            return False
        self._publish()
        return True

    def _publish(self) -> None:
        self._updates += 1
        self._snapshot = self._build(version=self._snapshot.version + 1, stale=bool(self.stale_fields()))
        changed, self._changed = self._changed, trio.Event()
        changed.set()
        for callback in list(self._callbacks):
            try:
                callback(self._snapshot)
            except Exception:  # one bad subscriber must not stop the others
                log.exception("state subscriber %r failed", callback)

    def _build(self, *, version: int, stale: bool) -> Snapshot:
        def value(name: str) -> Any:
            fv = self._fields[name]
            return None if fv is None else fv.value

        lamports = value("jackpot")
        slot = max((fv.slot for fv in self._fields.values() if fv is not None), default=0)
        last_update_ms = int(time.time() * 1000)
        state = {
            "tokenPrice": value("tokenPrice"),
            "jackpot": None if lamports is None else lamports / LAMPORTS_PER_SOL,
            "participants": value("participants"),
            "lastUpdate": last_update_ms,
            "version": version,
            "slot": slot,
            "stale": stale,
        }
        body = _dumps(state)
        return Snapshot(
            version=version,
            token_price=state["tokenPrice"],
            jackpot_lamports=lamports,
            participants=state["participants"],
            slot=slot,
            last_update_ms=last_update_ms,
            stale=stale,
            body=body,
            etag=etag_of(body),
        )

    # -- subscribing ---------------------------------------------------------------

    def subscribe(self, callback: Callable[[Snapshot], None]) -> Callable[[], None]:
        """Call ``callback(snapshot)`` synchronously on every publication.

        Returns the function that unsubscribes. Callbacks must not block or raise.
        """
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            try:
                self._callbacks.remove(callback)
            except ValueError:
                pass

        return unsubscribe

    async def updates(self, *, since: int = -1) -> AsyncIterator[Snapshot]:
        """Yield the newest snapshot whenever its version passes ``since``.

        A slow consumer skips intermediate versions (latest-value semantics). Leaving the
        loop early: wrap it in ``contextlib.aclosing(state.updates())``.
        """
        seen = since
        while True:
            snap = self._snapshot
            if snap.version > seen:
                seen = snap.version
                yield snap
            else:
                await self._changed.wait()

    # -- observability -------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        now = trio.current_time()
        fields = {}
        for name, fv in self._fields.items():
            fields[name] = (
                None
                if fv is None
                else {"value": fv.value, "age_s": round(now - fv.confirmed_at, 3), "slot": fv.slot, "source": fv.source}
            )
        ready, reason = self.ready()
        return {
            "version": self._snapshot.version,
            "ready": ready,
            "not_ready_reason": reason or None,
            "fields": fields,
            "updates_published": self._updates,
            "confirmations_unchanged": self._confirmations,
            "dropped_older_slot": self._dropped_older,
            "writes_by_source": dict(self._by_source),
            "subscribers": len(self._callbacks),
        }
