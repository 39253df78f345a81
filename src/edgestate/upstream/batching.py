"""One batching window of the pool: deduplication and merging into getMultipleAccounts.

Callers' calls (:class:`Call`) are collected in a :class:`Window`; ``build()`` turns them
into wire items (:class:`Wire`): identical calls are asked once, and single-account reads
(getAccountInfo, getBalance) with compatible configs become getMultipleAccounts calls of
at most 100 keys, each caller getting a result shaped as its own method returns it.
All plain synchronous code: testable without an event loop.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import trio
from solders.pubkey import Pubkey

from ..errors import EdgeStateError, RpcError, UpstreamError
from .ratelimit import Priority

GMA_MAX = 100  # getMultipleAccounts accepts at most 100 keys
_MERGE_CONFIG_KEYS = frozenset({"commitment", "encoding", "dataSlice", "minContextSlot"})
_BALANCE_SLICE = {"encoding": "base64", "dataSlice": {"offset": 0, "length": 0}}
ErrSpec = tuple[type[EdgeStateError], str]
_ID_DIGITS = 12  # request ids stay below 10**12 for 30 years at 1,000 calls/s
_ID_PLACEHOLDER = 10**_ID_DIGITS - 1


def pack(
    wires: list[Wire], *, max_items: int, max_bytes: int, per_method: Mapping[str, int] | None = None
) -> list[list[Wire]]:
    """Split ``wires`` into batches of at most ``max_items`` and ``max_bytes`` of JSON body.

    A batch body is ``[item,item,...]``: its items plus the brackets and commas. An item
    bigger than ``max_bytes`` alone goes out alone (the provider may still refuse it: a
    413 for one call fails that call). ``per_method`` caps the items of one method in a
    batch (a provider counting getProgramAccounts at 5/s sees a batch of 15 as 15 in one
    second). Order is kept within each method.
    """
    caps = per_method or {}
    batches: list[list[Wire]] = []
    current: list[Wire] = []
    counts: dict[str, int] = {}
    used = 1  # "["
    for wire in wires:
        extra = wire.size + 1  # the item and its "," or "]"
        cap = caps.get(wire.method)
        if current and (
            len(current) >= max_items or used + extra > max_bytes or (cap is not None and counts.get(wire.method, 0) >= cap)
        ):
            batches.append(current)
            current, used, counts = [], 1, {}
        current.append(wire)
        counts[wire.method] = counts.get(wire.method, 0) + 1
        used += extra
    if current:
        batches.append(current)
    return batches


class Call:
    """One caller's request and its one-shot result slot."""

    __slots__ = ("method", "params", "priority", "deadline", "done", "result", "error", "gone")

    def __init__(self, method: str, params: list[Any] | None, priority: Priority, deadline: float) -> None:
        self.method, self.params, self.priority, self.deadline = method, params, priority, deadline
        self.done = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.gone = False  # the caller timed out or was cancelled: drop its result

    @property
    def waiting(self) -> bool:
        return not self.gone and not self.done.is_set()

    def resolve(self, result: Any = None, error: BaseException | None = None) -> None:
        if not self.done.is_set():
            self.result, self.error = result, error
            self.done.set()


class Wire:
    """One JSON-RPC item on the wire, answering one or more calls.

    ``keys`` is set for a merged getMultipleAccounts; each waiter then carries the
    index of its key and the shape it expects back.
    """

    __slots__ = ("method", "params", "waiters", "keys", "_size")

    def __init__(self, method: str, params: list[Any] | None, keys: list[str] | None = None) -> None:
        self.method, self.params, self.keys = method, params, keys
        self.waiters: list[tuple[Call, int, str]] = []
        self._size: int | None = None

    @property
    def size(self) -> int:
        """Bytes of this item's JSON on the wire (with an id of up to ``_ID_DIGITS`` digits)."""
        if self._size is None:
            item = {"jsonrpc": "2.0", "id": _ID_PLACEHOLDER, "method": self.method, "params": self.params or []}
            self._size = len(json.dumps(item, separators=(",", ":")).encode())
        return self._size

    def alive(self) -> bool:
        return any(c.waiting for c, _, _ in self.waiters)

    def deliver(self, result: Any) -> None:
        if self.keys is None:
            for call, _, _ in self.waiters:
                call.resolve(result)
            return
        ok = (
            isinstance(result, dict)
            and isinstance(result.get("value"), list)
            and len(result["value"]) == len(self.keys)
        )
        for call, idx, kind in self.waiters:
            acct = result["value"][idx] if ok else None
            if not ok or not (acct is None or isinstance(acct, dict)):
                call.resolve(error=UpstreamError(f"{call.method}: unexpected getMultipleAccounts reply shape"))
            elif kind == "getBalance":
                lamports = 0 if acct is None else acct.get("lamports")  # Solana answers 0 for no account
                if isinstance(lamports, int) and not isinstance(lamports, bool):
                    call.resolve({"context": result.get("context"), "value": lamports})
                else:
                    call.resolve(error=UpstreamError(f"getBalance: no lamports in merged reply: {lamports!r}"))
            else:
                call.resolve({"context": result.get("context"), "value": acct})

    def fail(self, spec: ErrSpec | RpcError) -> None:
        for call, _, _ in self.waiters:
            if isinstance(spec, RpcError):  # a fresh instance per caller: tracebacks stay apart
                err: EdgeStateError = RpcError(spec.code, spec.rpc_message, spec.data)
            else:
                err = spec[0](spec[1])
            call.resolve(error=err)


class Window:
    """The calls of one batching window, deduped and merged (pure sync logic)."""

    def __init__(self) -> None:
        self.plain: dict[str, Wire] = {}
        # gMA config (canonical JSON) -> (config, pubkey -> [(call, kind)])
        self.groups: dict[str, tuple[dict[str, Any], dict[str, list[tuple[Call, str]]]]] = {}
        self.calls = 0
        self.wires = 0

    def add(self, call: Call) -> None:
        self.calls += 1
        merge = _merge_target(call)
        if merge is None:
            try:
                key = json.dumps([call.method, call.params], sort_keys=True, separators=(",", ":"))
            except (TypeError, ValueError) as exc:  # a caller bug: fail that caller, not the window
                call.resolve(error=TypeError(f"{call.method}: params are not JSON-serializable: {exc}"))
                return
            if key not in self.plain:
                self.plain[key] = Wire(call.method, call.params)
                self.wires += 1
            self.plain[key].waiters.append((call, 0, call.method))
            return
        gkey, config, pubkey = merge
        group = self.groups.setdefault(gkey, (config, {}))[1]
        if pubkey not in group:
            if len(group) % GMA_MAX == 0:
                self.wires += 1
            group[pubkey] = []
        group[pubkey].append((call, call.method))

    def build(self) -> tuple[list[Wire], int]:
        """The wire items of this window and how many calls were merged."""
        wires = list(self.plain.values())
        merged = 0
        for config, group in self.groups.values():
            entries = list(group.items())
            if len(entries) == 1 and len({kind for _, kind in entries[0][1]}) == 1:
                first = entries[0][1][0][0]  # one key, one shape: send the call as it came
                wire = Wire(first.method, first.params)
                wire.waiters = [(c, 0, k) for c, k in entries[0][1]]
                wires.append(wire)
                continue
            for start in range(0, len(entries), GMA_MAX):
                chunk = entries[start : start + GMA_MAX]
                keys = [pk for pk, _ in chunk]
                wire = Wire("getMultipleAccounts", [keys, config] if config else [keys], keys)
                wire.waiters = [(c, i, k) for i, (_, waiters) in enumerate(chunk) for c, k in waiters]
                merged += len(wire.waiters)
                wires.append(wire)
        return wires, merged


def _merge_target(call: Call) -> tuple[str, dict[str, Any], str] | None:
    """(group key, getMultipleAccounts config, pubkey) when ``call`` can be merged."""
    if call.method not in ("getAccountInfo", "getBalance"):
        return None
    p = call.params
    if not isinstance(p, list) or not 1 <= len(p) <= 2 or not isinstance(p[0], str):
        return None
    config = p[1] if len(p) == 2 else {}
    if not isinstance(config, dict) or not set(config) <= _MERGE_CONFIG_KEYS:
        return None
    try:
        Pubkey.from_string(p[0])
    except ValueError:
        return None  # sent alone, so its -32602 fails only this caller
    if call.method == "getBalance":
        if set(config) - {"commitment", "minContextSlot"}:
            return None
        config = {**config, **_BALANCE_SLICE}  # lamports only: no account data travels
    return json.dumps(config, sort_keys=True), config, p[0]
