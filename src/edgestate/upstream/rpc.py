"""Typed Solana reads on top of :class:`Pool` and :class:`Cache`.

Inputs are checked here (bad pubkeys raise ``ValueError`` naming the value, which the
HTTP layer maps to 400); replies are checked shape by shape, so anything unexpected
becomes :class:`UpstreamError`, never ``KeyError`` or a solders panic.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeGuard, TypeVar

import trio
from solders.pubkey import Pubkey
from solders.token.associated import get_associated_token_address

from ..cache import Cache, cache_key
from ..errors import UpstreamError
from .pool import Pool
from .ratelimit import Priority

T = TypeVar("T")

TOKEN_PROGRAM_ID = "TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA"
# The real Token-2022 id (the "TokenzQdBNbQqGUTy..." string in the brief is not a valid key).
TOKEN_2022_PROGRAM_ID = "TokenzQdBNbLqP5VEhdkAS6EPFLC1PHnBqCXEpPxuEb"
_TOKEN_PROGRAMS = frozenset({TOKEN_PROGRAM_ID, TOKEN_2022_PROGRAM_ID})
_MINT_LEN = 82  # SPL mint base layout; Token-2022 mints may be longer (extensions)
_GMA_MAX = 100


@dataclass(frozen=True, slots=True)
class Slotted(Generic[T]):
    """A value read from the chain, with the slot it was read at.

    ``stale`` is True when the cache served a last-good value because upstream failed;
    ``age`` is how many seconds ago it was fetched.
    """

    value: T
    slot: int
    stale: bool = False
    age: float = 0.0


@dataclass(frozen=True, slots=True)
class AccountData:
    """An account as getAccountInfo returns it, data decoded to bytes."""

    lamports: int
    owner: str
    data: bytes
    executable: bool


class InvalidMint(ValueError):
    """The token mint does not exist or is not an SPL Token / Token-2022 mint."""


def _pubkey(value: str | Pubkey, what: str = "pubkey") -> str:
    if isinstance(value, Pubkey):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"invalid {what}: expected a base58 string, got {type(value).__name__}")
    try:
        Pubkey.from_string(value)
    except ValueError:
        raise ValueError(f"invalid {what}: not a base58 32-byte public key: {value[:64]!r}") from None
    return value


def _bad(method: str, detail: str) -> UpstreamError:
    return UpstreamError(f"{method}: unexpected reply shape: {detail}")


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _context(method: str, reply: Any) -> tuple[int, Any]:
    """(slot, value) of a ``{"context": {"slot": N}, "value": ...}`` reply."""
    if not isinstance(reply, dict) or "value" not in reply:
        raise _bad(method, f"expected an object with context and value, got {type(reply).__name__}")
    ctx = reply.get("context")
    slot = ctx.get("slot") if isinstance(ctx, dict) else None
    if not _is_int(slot) or slot < 0:
        raise _bad(method, f"context.slot is {slot!r}")
    return slot, reply["value"]


def parse_account(method: str, raw: Any) -> AccountData | None:
    """Parse one base64-encoded account object (``None`` stays ``None``).

    Raises:
        UpstreamError: the object does not have the getAccountInfo shape.
    """
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _bad(method, f"account is {type(raw).__name__}, not an object")
    lamports, owner, data, executable = (raw.get(k) for k in ("lamports", "owner", "data", "executable"))
    if not _is_int(lamports) or lamports < 0:
        raise _bad(method, f"account lamports is {lamports!r}")
    if not isinstance(owner, str):
        raise _bad(method, f"account owner is {owner!r}")
    try:
        Pubkey.from_string(owner)
    except ValueError:
        raise _bad(method, f"account owner is not a pubkey: {owner[:64]!r}") from None
    if not (isinstance(data, list) and len(data) == 2 and data[1] == "base64" and isinstance(data[0], str)):
        raise _bad(method, f"account data is not [<base64>, 'base64']: {str(data)[:80]}")
    try:
        decoded = base64.b64decode(data[0], validate=True)
    except (binascii.Error, ValueError):
        raise _bad(method, "account data is not valid base64") from None
    if not isinstance(executable, bool):
        raise _bad(method, f"account executable is {executable!r}")
    return AccountData(lamports=lamports, owner=owner, data=decoded, executable=executable)


class SolanaRpc:
    """Typed, cached Solana reads.

    Args:
        pool: the upstream pool (batching, merging, retries).
        cache: shared cache; ``cached=True`` reads are single-flight through it.
        commitment: commitment sent with every read.
    """

    def __init__(self, pool: Pool, cache: Cache, *, commitment: str = "confirmed") -> None:
        self._pool = pool
        self._cache = cache
        self._commitment = commitment

    async def _read(
        self, method: str, params: list[Any], parse: Callable[[Any], Slotted[T]], priority: Priority, cached: bool
    ) -> Slotted[T]:
        """One upstream call, parsed; through the cache (parsed value cached) when asked."""

        async def fetch() -> Slotted[T]:
            return parse(await self._pool.execute(method, params, priority=priority))

        if not cached:
            return await fetch()
        key = cache_key(method, params, self._commitment)
        hit = await self._cache.get_or_fetch(key, fetch, method=method)
        got: Slotted[T] = hit.value
        return Slotted(got.value, got.slot, stale=hit.stale, age=hit.age)

    async def get_balance(
        self, pubkey: str | Pubkey, *, priority: Priority = Priority.USER, cached: bool = True
    ) -> Slotted[int]:
        """Lamports held by ``pubkey`` (0 when the account does not exist).

        Raises:
            ValueError: ``pubkey`` is not a valid public key.
            UpstreamError: the upstream failed or answered an unexpected shape.
        """
        key = _pubkey(pubkey)

        def parse(reply: Any) -> Slotted[int]:
            slot, value = _context("getBalance", reply)
            if not _is_int(value) or value < 0:
                raise _bad("getBalance", f"value is {value!r}")
            return Slotted(value, slot)

        return await self._read("getBalance", [key, {"commitment": self._commitment}], parse, priority, cached)

    async def get_account(
        self, pubkey: str | Pubkey, *, priority: Priority = Priority.USER, cached: bool = True
    ) -> Slotted[AccountData | None]:
        """One account (``None`` when it does not exist).

        Raises:
            ValueError: ``pubkey`` is not a valid public key.
            UpstreamError: the upstream failed or answered an unexpected shape.
        """
        key = _pubkey(pubkey)

        def parse(reply: Any) -> Slotted[AccountData | None]:
            slot, value = _context("getAccountInfo", reply)
            return Slotted(parse_account("getAccountInfo", value), slot)

        params = [key, {"commitment": self._commitment, "encoding": "base64"}]
        return await self._read("getAccountInfo", params, parse, priority, cached)

    async def get_multiple_accounts(
        self,
        pubkeys: Sequence[str | Pubkey],
        *,
        priority: Priority = Priority.USER,
        cached: bool = True,
        data_slice: tuple[int, int] | None = None,
    ) -> Slotted[list[AccountData | None]]:
        """Accounts in the order asked, read in chunks of 100 keys (chunks in parallel).

        ``slot`` is the oldest chunk's slot; ``stale``/``age`` the worst chunk's.
        ``data_slice=(offset, length)`` asks only part of each account's data.

        Raises:
            ValueError: one of ``pubkeys`` is not a valid public key (named).
            UpstreamError: the upstream failed or answered an unexpected shape.
        """
        keys = [_pubkey(pk, f"pubkey #{i}") for i, pk in enumerate(pubkeys)]
        config: dict[str, Any] = {"commitment": self._commitment, "encoding": "base64"}
        if data_slice is not None:
            config["dataSlice"] = {"offset": data_slice[0], "length": data_slice[1]}
        chunks = [keys[i : i + _GMA_MAX] for i in range(0, len(keys), _GMA_MAX)]
        results: list[Slotted[list[AccountData | None]] | None] = [None] * len(chunks)

        async def one(i: int, chunk: list[str]) -> None:
            def parse(reply: Any) -> Slotted[list[AccountData | None]]:
                slot, value = _context("getMultipleAccounts", reply)
                if not isinstance(value, list) or len(value) != len(chunk):
                    got = len(value) if isinstance(value, list) else type(value).__name__
                    raise _bad("getMultipleAccounts", f"value should be a list of {len(chunk)}, got {got}")
                return Slotted([parse_account("getMultipleAccounts", a) for a in value], slot)

            results[i] = await self._read("getMultipleAccounts", [chunk, config], parse, priority, cached)

        if len(chunks) == 1:
            await one(0, chunks[0])
        elif chunks:
            async with trio.open_nursery() as nursery:
                for i, chunk in enumerate(chunks):
                    nursery.start_soon(one, i, chunk)
        done = [r for r in results if r is not None]
        if not done:
            return Slotted([], 0)
        return Slotted(
            [acct for r in done for acct in r.value],
            min(r.slot for r in done),
            stale=any(r.stale for r in done),
            age=max(r.age for r in done),
        )

    async def count_program_accounts(
        self,
        program_id: str | Pubkey,
        filters: Sequence[Mapping[str, Any]],
        *,
        priority: Priority = Priority.USER,
        cached: bool = True,
    ) -> Slotted[int]:
        """How many accounts ``program_id`` owns matching ``filters`` (no data transferred).

        Raises:
            ValueError: ``program_id`` is not a valid public key.
            UpstreamError: the upstream failed or answered an unexpected shape.
        """
        pid = _pubkey(program_id, "program id")
        config = {
            "commitment": self._commitment,
            "encoding": "base64",
            "dataSlice": {"offset": 0, "length": 0},
            "filters": [_plain(f) for f in filters],
            "withContext": True,
        }

        def parse(reply: Any) -> Slotted[int]:
            # Some providers ignore withContext and answer a bare list.
            slot, value = (0, reply) if isinstance(reply, list) else _context("getProgramAccounts", reply)
            if not isinstance(value, list):
                raise _bad("getProgramAccounts", f"value is {type(value).__name__}, not a list")
            return Slotted(len(value), slot)

        return await self._read("getProgramAccounts", [pid, config], parse, priority, cached)

    async def get_token_balances(
        self, wallets: Sequence[str], mint: str, *, priority: Priority = Priority.USER
    ) -> dict[str, float]:
        """UI token balances of ``wallets`` for ``mint`` (no token account → 0).

        Reads the mint once (cached) to learn its program (SPL Token or Token-2022) and
        decimals, then every wallet's associated token account in chunks of 100.

        Raises:
            ValueError: a wallet or the mint is not a valid public key (named).
            InvalidMint: the mint does not exist or is not a token mint.
            UpstreamError: the upstream failed or answered an unexpected shape.
        """
        owners = {w: Pubkey.from_string(_pubkey(w, "wallet")) for w in wallets}
        mint_key = Pubkey.from_string(_pubkey(mint, "mint"))
        acct = (await self.get_account(mint, priority=priority)).value
        if acct is None:
            raise InvalidMint(f"mint {mint} not found")
        if acct.owner not in _TOKEN_PROGRAMS or len(acct.data) < _MINT_LEN or acct.data[45] != 1:
            raise InvalidMint(f"{mint} is not an initialized SPL Token or Token-2022 mint")
        decimals = acct.data[44]
        program = Pubkey.from_string(acct.owner)
        atas = {w: str(get_associated_token_address(o, mint_key, program)) for w, o in owners.items()}
        unique = list(dict.fromkeys(atas.values()))
        # Balances are cached per token account (i.e. per wallet and mint) for a short
        # TTL (cache.method_ttls.tokenBalance, else cache.ttl): repeated and overlapping
        # requests only read the accounts not seen recently.
        amounts: dict[str, int] = {}
        missing: list[str] = []
        for ata in unique:
            hit = self._cache.get(cache_key("tokenBalance", [ata], self._commitment))
            if hit is None:
                missing.append(ata)
            else:
                amounts[ata] = hit.value
        if missing:
            # Only mint (0..32) and amount (64..72) are needed: slice the data.
            got = await self.get_multiple_accounts(missing, priority=priority, data_slice=(0, 72), cached=False)
            for ata, tok in zip(missing, got.value):
                # Anything but a token account of this mint counts as "no account".
                if tok is None or tok.owner != acct.owner or len(tok.data) < 72 or tok.data[:32] != bytes(mint_key):
                    amounts[ata] = 0
                else:
                    amounts[ata] = int.from_bytes(tok.data[64:72], "little")
                self._cache.put(cache_key("tokenBalance", [ata], self._commitment), amounts[ata],
                                method="tokenBalance")
        scale = 10**decimals
        return {w: amounts[ata] / scale for w, ata in atas.items()}


def _plain(value: Any) -> Any:
    """Config mappings (MappingProxyType) as plain JSON-ready dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
