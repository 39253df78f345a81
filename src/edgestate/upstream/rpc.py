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
from .tokens import (
    CLOCK_SYSVAR,
    TOKEN_2022_PROGRAM_ID,
    TOKEN_PROGRAM_ID,
    MintInfo,
    NotAMint,
    clock_unix_timestamp,
    parse_mint,
    ui_amount,
)

T = TypeVar("T")

__all__ = ["TOKEN_2022_PROGRAM_ID", "TOKEN_PROGRAM_ID", "AccountData", "InvalidMint", "SolanaRpc", "Slotted"]
_GMA_MAX = 100
# A mint's decimals never change and its UI extensions (interest rate, multiplier) rarely
# do; a scheduled multiplier change is applied by its timestamp. Read once, keep this long.
MINT_INFO_TTL = 600.0
_TOKEN_SLICE = (0, 72)  # mint (0..32), owner (32..64), amount (64..72): nothing else travels


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

    @property
    def pool(self) -> Pool:
        """The upstream pool these reads go through (its credit meter, its stats)."""
        return self._pool

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
        keys = await self.program_account_keys(program_id, filters, priority=priority, cached=cached)
        return Slotted(len(keys.value), keys.slot, stale=keys.stale, age=keys.age)

    async def program_account_keys(
        self,
        program_id: str | Pubkey,
        filters: Sequence[Mapping[str, Any]],
        *,
        priority: Priority = Priority.USER,
        cached: bool = True,
    ) -> Slotted[frozenset[str]]:
        """The addresses of the accounts ``program_id`` owns matching ``filters``.

        ``dataSlice`` length 0: only the addresses travel. The participant count starts
        from this set, and programSubscribe notifications then add to it.

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

        def parse(reply: Any) -> Slotted[frozenset[str]]:
            # Some providers ignore withContext and answer a bare list.
            slot, value = (0, reply) if isinstance(reply, list) else _context("getProgramAccounts", reply)
            if not isinstance(value, list):
                raise _bad("getProgramAccounts", f"value is {type(value).__name__}, not a list")
            keys = set()
            for item in value:
                key = item.get("pubkey") if isinstance(item, dict) else None
                if not isinstance(key, str) or len(key) > 44:
                    raise _bad("getProgramAccounts", f"an item without a pubkey: {str(item)[:80]}")
                keys.add(key)
            return Slotted(frozenset(keys), slot)

        return await self._read("getProgramAccounts", [pid, config], parse, priority, cached)

    async def mint_info(self, mint: str, *, priority: Priority = Priority.USER) -> MintInfo:
        """The mint's program, decimals and UI extensions (read once, kept MINT_INFO_TTL).

        Raises:
            ValueError: ``mint`` is not a valid public key.
            InvalidMint: the mint does not exist or is not an initialized token mint.
            UpstreamError: the upstream failed or answered an unexpected shape.
        """
        key = _pubkey(mint, "mint")

        async def fetch() -> MintInfo:
            acct = (await self.get_account(key, priority=priority, cached=False)).value
            if acct is None:
                raise InvalidMint(f"mint {key} not found")
            try:
                return parse_mint(acct.owner, acct.data)
            except NotAMint as exc:
                raise InvalidMint(f"{key} is not an SPL Token or Token-2022 mint: {exc}") from None

        hit = await self._cache.get_or_fetch(cache_key("mintInfo", [key], self._commitment), fetch,
                                             method="mintInfo", ttl=MINT_INFO_TTL)
        info: MintInfo = hit.value
        return info

    async def get_token_balances(
        self, wallets: Sequence[str], mint: str, *, priority: Priority = Priority.USER
    ) -> dict[str, float | None]:
        """UI token balances of ``wallets`` for ``mint`` (no token account → 0).

        What counts is each wallet's *associated* token account for the mint (the address
        derived from wallet, token program and mint), read 100 at a time with
        getMultipleAccounts, and only when it is a token account of this mint's program
        holding this mint for this wallet (mint and owner bytes checked). The uiAmount is
        the RPC's own (decimals, and the Token-2022 InterestBearing / ScaledUiAmount
        extensions at the chain's clock, read in the same call); ``None`` where the RPC's
        uiAmount is ``null`` (a non-finite result).

        Raises:
            ValueError: a wallet or the mint is not a valid public key (named).
            InvalidMint: the mint does not exist or is not a token mint.
            UpstreamError: the upstream failed or answered an unexpected shape.
        """
        owners = {w: Pubkey.from_string(_pubkey(w, "wallet")) for w in wallets}
        mint_key = Pubkey.from_string(_pubkey(mint, "mint"))
        info = await self.mint_info(mint, priority=priority)
        program = Pubkey.from_string(info.program)
        atas = {w: str(get_associated_token_address(o, mint_key, program)) for w, o in owners.items()}
        unique = list(dict.fromkeys(atas.values()))
        # UI balances are cached per token account (i.e. per wallet and mint) for a short
        # TTL (cache.method_ttls.tokenBalance, else cache.ttl): repeated and overlapping
        # requests only read the accounts not seen recently.
        amounts: dict[str, float | None] = {}
        missing: list[str] = []
        for ata in unique:
            hit = self._cache.get(cache_key("tokenBalance", [ata], self._commitment))
            if hit is None:
                missing.append(ata)
            else:
                amounts[ata] = hit.value
        if missing:
            # The clock rides along in the same call when the uiAmount depends on time.
            keys = missing + [CLOCK_SYSVAR] if info.needs_clock else missing
            got = (await self.get_multiple_accounts(keys, priority=priority, data_slice=_TOKEN_SLICE,
                                                    cached=False)).value
            now: int | None = None
            if info.needs_clock:
                clock = got[-1]
                if clock is None:
                    raise UpstreamError("getMultipleAccounts: the Clock sysvar is missing")
                try:
                    now = clock_unix_timestamp(clock.data)
                except ValueError as exc:
                    raise UpstreamError(f"getMultipleAccounts: {exc}") from None
            wallet_of = {ata: owners[w] for w, ata in atas.items()}
            for ata, tok in zip(missing, got):
                raw = _token_amount(tok, info.program, bytes(mint_key), bytes(wallet_of[ata]))
                amounts[ata] = ui_amount(raw, info, now)
                self._cache.put(cache_key("tokenBalance", [ata], self._commitment), amounts[ata],
                                method="tokenBalance")
        return {w: amounts[ata] for w, ata in atas.items()}


def _token_amount(tok: AccountData | None, program: str, mint: bytes, owner: bytes) -> int:
    """The raw amount of a sliced (0..72) token account; 0 for anything else.

    Anything but a token account of the mint's program, of this mint, owned by this
    wallet counts as "no account" (balance 0).
    """
    if tok is None or tok.owner != program or len(tok.data) < 72:
        return 0
    if tok.data[:32] != mint or tok.data[32:64] != owner:
        return 0
    return int.from_bytes(tok.data[64:72], "little")


def _plain(value: Any) -> Any:
    """Config mappings (MappingProxyType) as plain JSON-ready dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
