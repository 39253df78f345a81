"""The simulated chain: accounts, prices, a slot counter, fault knobs and counters.

Everything here is synchronous: a mutation is one atomic step between two Trio
checkpoints, and the HTTP/WebSocket layer in :mod:`edgestate.sim.app` does the I/O
around it. Subscribers are woken through one :class:`trio.Event` that is replaced on
every change (a version approach, so a slow subscriber coalesces to the newest value
and no per-subscriber buffer can grow).
"""

from __future__ import annotations

import dataclasses
import functools
import random
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import trio
from solders.pubkey import Pubkey
from solders.token.associated import get_associated_token_address
from solders.token.state import Mint, TokenAccount, TokenAccountState

from edgestate.config import Config

SYSTEM_PROGRAM = "11111111111111111111111111111111"
TOKEN_PROGRAM = "TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA"
# The real Token-2022 id (the "TokenzQdBNbQqGUTy..." string seen in briefs is not a valid key).
TOKEN_2022_PROGRAM = "TokenzQdBNbLqP5VEhdkAS6EPFLC1PHnBqCXEpPxuEb"
TOKEN_PROGRAMS = {"spl": TOKEN_PROGRAM, "token-2022": TOKEN_2022_PROGRAM}
MINT_LEN, TOKEN_ACCOUNT_LEN = 82, 165
LAMPORTS_PER_SOL = 1_000_000_000
# Token-2022 puts an account-type byte at offset 165 (1 = mint, 2 = account), then TLV
# extensions; mints are zero-padded up to it. ATAs always carry ImmutableOwner (type 7).
_T22_MINT, _T22_ACCOUNT = b"\x01", b"\x02"
_IMMUTABLE_OWNER_TLV = b"\x07\x00\x00\x00"

FAULT_DEFAULTS: dict[str, float | bool] = {
    "latency": 0.0,  # seconds added to every RPC / price HTTP request
    "rate_limit_rps": 0.0,  # RPC calls per second (batch items each count); 0 = off
    "price_rate_limit_rps": 0.0,  # price requests per second; 0 = off
    "error_ratio": 0.0,  # share of requests answered 500/503
    "timeout_ratio": 0.0,  # share of requests that hang for HANG_SECONDS
    "malformed_ratio": 0.0,  # share of requests answered 200 with a broken body
    "refuse_ws": False,  # reject PubSub WebSocket upgrades with HTTP 503
    # As real providers do (these are on by default):
    "max_body_bytes": 51200.0,  # agave's MAX_REQUEST_BODY_SIZE (50 KiB): larger bodies get HTTP 413; 0 = off
    "ws_idle_timeout": 600.0,  # Helius closes a PubSub socket that sent nothing, not even a ping, this long
    # Provider behaviours to switch on:
    "refuse_batches": False,  # answer any batch with one error object (providers that refuse batches)
    "node_behind": 0.0,  # > 0: every call (getHealth too) gets -32005 "Node is behind by N slots"
    "forbidden": False,  # every RPC request gets HTTP 403 (a blocked key or address)
    "max_ws_connections": 0.0,  # PubSub connections at once (Helius Free: 5); more get HTTP 429; 0 = off
}
HANG_SECONDS = 3600.0
_RATIOS = ("error_ratio", "timeout_ratio", "malformed_ratio")
_BOOL_KNOBS = ("refuse_ws", "refuse_batches", "forbidden")
CLOCK_SYSVAR = "SysvarC1ock11111111111111111111111111111111"
SYSVAR_PROGRAM = "Sysvar1111111111111111111111111111111111111"
_UNIX_EPOCH_AT_START = 1_767_225_600  # 2026-01-01: the simulated chain's clock at trio time 0
# Token-2022 extension types (spl-token-2022 ExtensionType) and their value sizes.
EXT_INTEREST_BEARING, EXT_SCALED_UI_AMOUNT = 10, 25

_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}


def b58decode(text: str) -> bytes:
    """Decode base58 (Bitcoin alphabet), as Solana's memcmp filters use it.

    Raises:
        ValueError: a character outside the alphabet.
    """
    num = 0
    for char in text:
        if char not in _B58_INDEX:
            raise ValueError(f"invalid base58 character {char!r}")
        num = num * 58 + _B58_INDEX[char]
    body = num.to_bytes((num.bit_length() + 7) // 8, "big") if num else b""
    return b"\0" * (len(text) - len(text.lstrip("1"))) + body


def b58encode(data: bytes) -> str:
    """Encode bytes as base58 (Bitcoin alphabet)."""
    num = int.from_bytes(data, "big")
    out = ""
    while num:
        num, rem = divmod(num, 58)
        out = _B58[rem] + out
    return "1" * (len(data) - len(data.lstrip(b"\0"))) + out


def parse_pubkey(text: object) -> str:
    """Return ``text`` if it is a valid base58 32-byte public key.

    Raises:
        ValueError: not a string or not a public key.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a base58 public key string, got {text!r}")
    return str(Pubkey.from_string(text))  # ValueError on bad input, never a panic


@dataclass(slots=True)
class SimAccount:
    """One account as the RPC shows it; ``modified_slot`` drives notifications."""

    lamports: int
    owner: str
    data: bytes = b""
    executable: bool = False
    modified_slot: int = 0


@dataclass(slots=True, eq=False)  # identity-hashed: sessions live in a set
class _Session:
    """One PubSub WebSocket: its subscriptions and what each has already been sent."""

    generation: int
    # id -> (key, config, seen)
    accounts: dict[int, tuple[str, dict[str, Any], int]] = dataclasses.field(default_factory=dict)
    slots: dict[int, int] = dataclasses.field(default_factory=dict)  # id -> last slot sent
    # id -> (program, filters, config, last slot looked at)
    programs: dict[int, tuple[str, list[Any], dict[str, Any], int]] = dataclasses.field(default_factory=dict)
    last_activity: float = 0.0  # time of the client's last message or ping
    # Subscriptions whose confirmation is not sent yet: no notification may overtake it.
    held: set[int] = dataclasses.field(default_factory=set)


class _Bucket:
    """Token bucket that admits a request while it holds at least one token.

    The request's cost is then taken, possibly into debt, so a batch bigger than the
    burst still passes once and the long-run rate stays ``rate`` units per second.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._tokens = 0.0
        self._stamp: float | None = None

    def take(self, rate: float, cost: int) -> bool:
        now = self._clock()
        if self._stamp is None:
            self._tokens = rate
        else:
            self._tokens = min(rate, self._tokens + (now - self._stamp) * rate)
        self._stamp = now
        if self._tokens < 1.0:
            return False
        self._tokens -= cost
        return True


def _new_counters() -> dict[str, Any]:
    return {
        "http_requests": 0,  # RPC POSTs + price GETs (what a provider bills as requests)
        "rpc_requests": 0,
        "rpc_batches": 0,
        "rpc_calls": 0,  # JSON-RPC calls, batch items one by one
        "rpc_methods": Counter(),
        "rpc_errors": 0,  # JSON-RPC error objects sent
        "price_requests": 0,
        "price_ids": 0,
        "http_429": 0,
        "http_5xx": 0,
        "timeouts": 0,
        "malformed": 0,
        "ws_connections_total": 0,
        "ws_refused": 0,
        "ws_dropped": 0,
        "ws_subscriptions_total": 0,
        "ws_notifications": 0,
        "ws_bytes_sent": 0,  # what a provider meters (Helius: 2 credits per 0.1 MB)
        "ws_idle_closed": 0,
        "ws_connections_peak": 0,
        "http_413": 0,
        "http_403": 0,
        "batches_refused": 0,
        "node_behind_errors": 0,
    }


class World:
    """The in-memory chain and price feed behind the simulator.

    Attributes:
        slot: the current slot; every mutation advances it by one.
        pot_account, program_id, token_mint: the lottery's addresses (base58).
        participant_filters: the getProgramAccounts filters participants match.
        rng: the seeded random source for fault ratios and generated data.
        last_api_key: the last ``x-api-key`` header the price endpoint saw (or None).
        latency, rate_limit_rps, price_rate_limit_rps, error_ratio, timeout_ratio,
        malformed_ratio, refuse_ws: fault knobs (see :data:`FAULT_DEFAULTS`).
    """

    def __init__(self, *, seed: int = 0, slot: int = 340_000_000, clock: Callable[[], float] | None = None) -> None:
        """Create an empty world (no accounts); see :meth:`from_config`."""
        self.rng = random.Random(seed)
        self.slot = slot
        self.accounts: dict[str, SimAccount] = {}
        self.prices: dict[str, float] = {}
        self._price_ref: dict[str, float] = {}  # "24 h ago", for priceChange24h
        self.pot_account = ""
        self.program_id = ""
        self.token_mint = ""
        self.participant_filters: tuple[Mapping[str, Any], ...] = ()
        self.last_api_key: str | None = None
        self.latency = 0.0
        self.rate_limit_rps = 0.0
        self.price_rate_limit_rps = 0.0
        self.error_ratio = 0.0
        self.timeout_ratio = 0.0
        self.malformed_ratio = 0.0
        self.refuse_ws = False
        self.max_body_bytes = 51200.0
        self.ws_idle_timeout = 600.0
        self.refuse_batches = False
        self.node_behind = 0.0
        self.forbidden = False
        self.max_ws_connections = 0.0
        self._clock = clock or trio.current_time
        self._rpc_bucket = _Bucket(self._clock)
        self._price_bucket = _Bucket(self._clock)
        self._counters = _new_counters()
        self._sessions: set[_Session] = set()
        self._generation = 0  # drop_ws() bumps it; older sessions close
        self._next_sub = 1
        self._changed = trio.Event()

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        *,
        participants: int = 42,
        seed: int = 0,
        clock: Callable[[], float] | None = None,
        price: float | None = 0.042,
        pot: bool = True,
    ) -> World:
        """A world holding the lottery and token that ``cfg`` points at.

        The pot account holds 12.5 SOL (``pot=False``: it does not exist),
        ``cfg.lottery.program_id`` owns ``participants`` accounts matching
        ``cfg.lottery.participant_filters`` (plus a few that do not, when there are
        filters), and ``cfg.token.mint`` is an SPL mint (6 decimals) priced at ``price``
        USD (None: the price API has no price for it, as for any mint nobody set).
        ``clock`` (default :func:`trio.current_time`) drives the rate limiters, the idle
        timer and the Clock sysvar; tests may freeze it.
        """
        world = cls(seed=seed, clock=clock)
        world.pot_account = cfg.lottery.pot_account
        world.program_id = cfg.lottery.program_id
        world.token_mint = cfg.token.mint
        world.participant_filters = tuple(dict(f) for f in cfg.lottery.participant_filters)
        if pot:
            world.set_account(world.pot_account, 12_500_000_000, SYSTEM_PROGRAM)
        world.add_mint(world.token_mint, 6)
        if price is not None:
            world.set_price(world.token_mint, price)
        world.add_participants(participants)
        # Accounts of the same program that the filters must exclude: longer ones, and
        # one of the right size whose memcmp bytes differ. Only those that really fail.
        matches = _compile_filters(world.participant_filters)
        base = world._participant_data()
        flipped = bytearray(base)
        for flt in world.participant_filters:
            if "memcmp" in flt and int(flt["memcmp"]["offset"]) < len(flipped):
                flipped[int(flt["memcmp"]["offset"])] ^= 0xFF
        for data in [bytes(flipped) + world.rng.randbytes(8) for _ in range(3)] + [bytes(flipped)]:
            if not matches(data):
                world.set_account(world._random_key(), 2_000_000, world.program_id, data)
        return world

    # ---- mutations (each advances the slot and wakes subscribers) ----

    def _touch(self, *keys: str) -> None:
        self.slot += 1
        for key in keys:
            self.accounts[key].modified_slot = self.slot
        self.wake()

    def advance_slot(self, n: int = 1) -> int:
        """Advance the slot by ``n`` >= 1 (no account changes); returns the new slot."""
        self.slot += max(1, n) - 1
        self._touch()
        return self.slot

    def wake(self) -> None:
        """Wake PubSub sessions without a change (they re-check what is pending)."""
        self._changed.set()
        self._changed = trio.Event()

    def set_account(self, pubkey: str, lamports: int, owner: str, data: bytes = b"", *, executable: bool = False) -> None:
        """Create or replace an account.

        Raises:
            ValueError: ``pubkey`` or ``owner`` is not a public key, or lamports < 0.
        """
        pubkey, owner = parse_pubkey(pubkey), parse_pubkey(owner)
        if lamports < 0:
            raise ValueError(f"lamports must be >= 0, got {lamports}")
        self.accounts[pubkey] = SimAccount(int(lamports), owner, bytes(data), executable)
        self._touch(pubkey)

    def set_jackpot(self, lamports: int) -> None:
        """Set the pot account's balance (lamports)."""
        self.set_account(self.pot_account, lamports, SYSTEM_PROGRAM)

    def add_jackpot(self, delta: int) -> int:
        """Add ``delta`` lamports (may be negative, floored at 0); returns the balance."""
        current = self.accounts[self.pot_account].lamports if self.pot_account in self.accounts else 0
        self.set_jackpot(max(0, current + delta))
        return self.accounts[self.pot_account].lamports

    @property
    def jackpot(self) -> int:
        """The pot account's lamports (0 if it does not exist)."""
        acct = self.accounts.get(self.pot_account)
        return acct.lamports if acct else 0

    def _random_key(self) -> str:
        return str(Pubkey(self.rng.randbytes(32)))

    def _participant_data(self) -> bytes:
        sizes = [int(f["dataSize"]) for f in self.participant_filters if "dataSize" in f]
        memcmps = [
            (int(f["memcmp"]["offset"]), decode_memcmp_bytes(f["memcmp"]))
            for f in self.participant_filters
            if "memcmp" in f
        ]
        size = sizes[0] if sizes else max([80] + [off + len(b) for off, b in memcmps])
        data = bytearray(self.rng.randbytes(size))
        for off, want in memcmps:
            data[off : off + len(want)] = want
        return bytes(data[:size])

    def add_participants(self, n: int = 1) -> list[str]:
        """Add ``n`` program accounts that match the participant filters.

        Returns:
            their public keys.
        """
        keys = []
        for _ in range(n):
            key = self._random_key()
            self.accounts[key] = SimAccount(2_000_000, self.program_id, self._participant_data())
            keys.append(key)
        self._touch(*keys)
        return keys

    def remove_participants(self, n: int = 1) -> list[str]:
        """Close ``n`` participant accounts (as a program closing them: no notification).

        Returns:
            their public keys.
        """
        keys = [key for key, _ in self.program_accounts(self.program_id, self.participant_filters)][:n]
        for key in keys:
            del self.accounts[key]
        self._touch()
        return keys

    def now(self) -> float:
        """The world's clock (trio time unless another clock was given)."""
        return self._clock()

    def unix_timestamp(self) -> int:
        """The chain's Clock.unix_timestamp: a fixed start plus the world's clock."""
        return _UNIX_EPOCH_AT_START + int(self._clock())

    def get_account(self, pubkey: str) -> SimAccount | None:
        """An account as the RPC sees it, the Clock sysvar included (made on the fly)."""
        if pubkey == CLOCK_SYSVAR:
            ts = self.unix_timestamp()
            data = struct.pack("<QqQQq", self.slot, ts - 3600, self.slot // 432_000, self.slot // 432_000 + 1, ts)
            return SimAccount(1_169_280, SYSVAR_PROGRAM, data, False, self.slot)
        return self.accounts.get(pubkey)

    def participant_count(self) -> int:
        """How many accounts getProgramAccounts(program_id, participant_filters) returns."""
        return len(self.program_accounts(self.program_id, self.participant_filters))

    def add_mint(
        self,
        mint: str,
        decimals: int,
        token_program: str = "spl",
        extension_bytes: int = 0,
        *,
        interest_bearing: Mapping[str, int] | None = None,
        scaled_ui_amount: Mapping[str, float] | None = None,
    ) -> None:
        """Create (or replace) a token mint.

        Args:
            mint: its address.
            decimals: 0..255.
            token_program: "spl" or "token-2022".
            extension_bytes: Token-2022 only: bytes of empty TLV space after the extensions.
            interest_bearing: Token-2022 InterestBearingConfig ``{initialization_timestamp,
                pre_update_average_rate, last_update_timestamp, current_rate}`` (rates in
                basis points; timestamps in the chain's Unix time).
            scaled_ui_amount: Token-2022 ScaledUiAmountConfig ``{multiplier,
                new_multiplier_effective_timestamp, new_multiplier}``.

        Raises:
            ValueError: bad address, decimals, program or extension data.
        """
        if token_program not in TOKEN_PROGRAMS:
            raise ValueError(f"token_program must be 'spl' or 'token-2022', got {token_program!r}")
        if not 0 <= decimals <= 255 or isinstance(decimals, bool):
            raise ValueError(f"decimals must be 0..255, got {decimals!r}")
        tlv = b""
        try:
            if interest_bearing is not None:
                ib = interest_bearing
                value = b"\0" * 32 + struct.pack("<qhqh", int(ib["initialization_timestamp"]),
                                                 int(ib["pre_update_average_rate"]),
                                                 int(ib["last_update_timestamp"]), int(ib["current_rate"]))
                tlv += struct.pack("<HH", EXT_INTEREST_BEARING, len(value)) + value
            if scaled_ui_amount is not None:
                su = scaled_ui_amount
                value = b"\0" * 32 + struct.pack("<dqd", float(su["multiplier"]),
                                                 int(su.get("new_multiplier_effective_timestamp", 0)),
                                                 float(su.get("new_multiplier", su["multiplier"])))
                tlv += struct.pack("<HH", EXT_SCALED_UI_AMOUNT, len(value)) + value
        except (KeyError, TypeError, ValueError, struct.error) as exc:
            raise ValueError(f"bad extension config: {exc}") from None
        if extension_bytes < 0 or ((extension_bytes or tlv) and token_program == "spl"):
            raise ValueError("extensions need token_program 'token-2022' (and extension_bytes >= 0)")
        data = bytes(Mint(mint_authority=None, supply=10**15, decimals=decimals, is_initialized=True, freeze_authority=None))
        if extension_bytes or tlv:
            data += b"\0" * (TOKEN_ACCOUNT_LEN - MINT_LEN) + _T22_MINT + tlv + b"\0" * extension_bytes
        self.set_account(mint, 1_461_600, TOKEN_PROGRAMS[token_program], data)

    def token_kind(self, pubkey: str) -> str | None:
        """"mint", "account" (a token account) or None, from owner and layout."""
        acct = self.accounts.get(pubkey)
        if acct is None or acct.owner not in TOKEN_PROGRAMS.values():
            return None
        data = acct.data
        if len(data) == MINT_LEN or (len(data) > TOKEN_ACCOUNT_LEN and data[TOKEN_ACCOUNT_LEN : TOKEN_ACCOUNT_LEN + 1] == _T22_MINT):
            return "mint"
        if len(data) == TOKEN_ACCOUNT_LEN or (len(data) > TOKEN_ACCOUNT_LEN and data[TOKEN_ACCOUNT_LEN : TOKEN_ACCOUNT_LEN + 1] == _T22_ACCOUNT):
            return "account"
        return None

    def mint_decimals(self, mint: str) -> int | None:
        """The decimals of a mint this world holds, else None."""
        if self.token_kind(mint) != "mint":
            return None
        return Mint.from_bytes(self.accounts[mint].data[:MINT_LEN]).decimals

    def token_ui_amount(self, mint: str, amount: int) -> float | None:
        """uiAmount of ``amount`` of ``mint`` now, as agave computes it (extensions included)."""
        from edgestate.upstream.tokens import parse_mint, ui_amount

        acct = self.accounts[mint]
        return ui_amount(amount, parse_mint(acct.owner, acct.data), self.unix_timestamp())

    def token_balance(self, token_account: str) -> tuple[int, int] | None:
        """``(amount_raw, decimals)`` of a token account, or None if it is not one."""
        if self.token_kind(token_account) != "account":
            return None
        parsed = TokenAccount.from_bytes(self.accounts[token_account].data[:TOKEN_ACCOUNT_LEN])
        decimals = self.mint_decimals(str(parsed.mint))
        return None if decimals is None else (parsed.amount, decimals)

    def set_token_balance(self, wallet: str, mint: str, amount_raw: int) -> str:
        """Create or update ``wallet``'s associated token account for ``mint``.

        The address is derived with the mint's own token program (SPL or Token-2022).

        Returns:
            the token account's address.

        Raises:
            ValueError: bad wallet, unknown mint (call :meth:`add_mint` first), amount < 0.
        """
        wallet = parse_pubkey(wallet)
        if self.mint_decimals(mint) is None:
            raise ValueError(f"unknown mint {mint!r}: add it with add_mint first")
        if isinstance(amount_raw, bool) or not 0 <= amount_raw < 2**64:
            raise ValueError(f"amount must be a u64, got {amount_raw!r}")
        program = self.accounts[mint].owner
        ata = str(get_associated_token_address(Pubkey.from_string(wallet), Pubkey.from_string(mint), Pubkey.from_string(program)))
        data = bytes(
            TokenAccount(
                mint=Pubkey.from_string(mint),
                owner=Pubkey.from_string(wallet),
                amount=amount_raw,
                delegate=None,
                state=TokenAccountState.Initialized,
                is_native=None,
                delegated_amount=0,
                close_authority=None,
            )
        )
        if program == TOKEN_2022_PROGRAM:
            data += _T22_ACCOUNT + _IMMUTABLE_OWNER_TLV
        self.set_account(ata, 2_039_280, program, data)
        return ata

    def set_price(self, mint: str, usd: float) -> None:
        """Set a mint's USD price (the first price set is the 24 h reference).

        Raises:
            ValueError: bad mint or a price that is not a positive finite number.
        """
        mint = parse_pubkey(mint)
        if isinstance(usd, bool) or not isinstance(usd, (int, float)) or not 0 < usd < float("inf"):
            raise ValueError(f"price must be a positive number, got {usd!r}")
        self.prices[mint] = float(usd)
        self._price_ref.setdefault(mint, float(usd))
        self._touch()

    def price_quote(self, mint: str) -> dict[str, Any] | None:
        """The Jupiter v3 entry for ``mint``, or None when it has no price."""
        if mint not in self.prices:
            return None
        price, ref = self.prices[mint], self._price_ref[mint]
        return {
            "usdPrice": price,
            "blockId": self.slot,
            "decimals": self.mint_decimals(mint) or 0,
            "priceChange24h": round((price / ref - 1) * 100, 6),
        }

    # ---- queries ----

    def program_accounts(self, program: str, filters: Iterable[Mapping[str, Any]] = ()) -> list[tuple[str, SimAccount]]:
        """Accounts owned by ``program`` matching all filters (dataSize / memcmp).

        Raises:
            ValueError: a filter of another shape or with bad memcmp bytes.
        """
        matches = _compile_filters(filters)
        return [
            (key, acct)
            for key, acct in self.accounts.items()
            if acct.owner == program and matches(acct.data)
        ]

    # ---- fault knobs ----

    def faults(self) -> dict[str, float | bool]:
        """The current fault knobs."""
        return {name: getattr(self, name) for name in FAULT_DEFAULTS}

    def set_faults(self, **knobs: Any) -> None:
        """Set fault knobs by name (see :data:`FAULT_DEFAULTS`); all-or-nothing.

        Raises:
            ValueError: unknown knob, wrong type, ratio outside 0..1 (or summing above 1),
                negative latency or rate.
        """
        new = self.faults()
        for name, value in knobs.items():
            if name not in FAULT_DEFAULTS:
                raise ValueError(f"unknown fault knob {name!r} (known: {', '.join(FAULT_DEFAULTS)})")
            if name in _BOOL_KNOBS:
                if not isinstance(value, bool):
                    raise ValueError(f"{name} must be true or false, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
            elif name in _RATIOS and value > 1:
                raise ValueError(f"{name} must be between 0 and 1, got {value!r}")
            new[name] = value
        if sum(float(new[r]) for r in _RATIOS) > 1:
            raise ValueError("error_ratio + timeout_ratio + malformed_ratio must be <= 1")
        for name, value in new.items():
            setattr(self, name, value)

    def reset_faults(self) -> None:
        """Turn every fault off."""
        self.set_faults(**FAULT_DEFAULTS)

    def pick_fault(self) -> str | None:
        """Draw this request's fault: "error", "timeout", "malformed" or None."""
        if not (self.error_ratio or self.timeout_ratio or self.malformed_ratio):
            return None  # keep the rng sequence untouched while faults are off
        draw = self.rng.random()
        for name in _RATIOS:
            ratio = float(getattr(self, name))
            if draw < ratio:
                return name.removesuffix("_ratio")
            draw -= ratio
        return None

    def admit_rpc(self, calls: int) -> bool:
        """Charge ``calls`` to the RPC rate limit; False means answer 429."""
        return not self.rate_limit_rps or self._rpc_bucket.take(self.rate_limit_rps, calls)

    def admit_price(self) -> bool:
        """Charge one request to the price rate limit; False means answer 429."""
        return not self.price_rate_limit_rps or self._price_bucket.take(self.price_rate_limit_rps, 1)

    # ---- counters ----

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name``."""
        self._counters[name] += n

    def count_method(self, method: str) -> None:
        """Count one JSON-RPC call of ``method``."""
        self._counters["rpc_calls"] += 1
        self._counters["rpc_methods"][method] += 1

    def counters(self) -> dict[str, Any]:
        """A snapshot of every counter (``rpc_methods`` is a plain dict method -> calls)."""
        snap = dict(self._counters)
        snap["rpc_methods"] = dict(self._counters["rpc_methods"])
        snap["ws_connections_active"] = len(self._sessions)
        snap["ws_subscriptions_active"] = sum(len(s.accounts) + len(s.slots) + len(s.programs) for s in self._sessions)
        return snap

    def reset_counters(self) -> None:
        """Zero every counter (active WebSocket figures stay true)."""
        self._counters = _new_counters()

    # ---- PubSub sessions (used by the app) ----

    def open_session(self) -> _Session:
        """Register a PubSub connection."""
        session = _Session(self._generation, last_activity=self._clock())
        self._sessions.add(session)
        self.count("ws_connections_total")
        self._counters["ws_connections_peak"] = max(self._counters["ws_connections_peak"], len(self._sessions))
        return session

    def ws_full(self) -> bool:
        """True when a new PubSub connection would pass ``max_ws_connections``."""
        return bool(self.max_ws_connections) and len(self._sessions) >= self.max_ws_connections

    def client_active(self, session: _Session) -> None:
        """The client sent a message or a ping: its idle timer starts again."""
        session.last_activity = self._clock()

    def idle_for(self, session: _Session) -> float:
        """Seconds since the client's last message or ping."""
        return self._clock() - session.last_activity

    def close_session(self, session: _Session) -> None:
        """Forget a PubSub connection and its subscriptions."""
        self._sessions.discard(session)

    def session_dropped(self, session: _Session) -> bool:
        """True once :meth:`drop_ws` was called after ``session`` opened."""
        return session.generation != self._generation

    def drop_ws(self) -> int:
        """Close every current PubSub WebSocket (close code 1012); returns how many."""
        self._generation += 1
        dropped = len(self._sessions)
        self.count("ws_dropped", dropped)
        self.wake()
        return dropped

    def subscribe_account(self, session: _Session, pubkey: str, config: dict[str, Any]) -> int:
        """Add an accountSubscribe (held until :meth:`release`); returns its id.

        ``config`` is the subscription's (encoding, dataSlice), used for notifications.
        """
        sub = self._new_sub(session)
        acct = self.accounts.get(pubkey)
        session.accounts[sub] = (pubkey, config, acct.modified_slot if acct else 0)
        return sub

    def subscribe_program(self, session: _Session, program: str, filters: list[Any], config: dict[str, Any]) -> int:
        """Add a programSubscribe (held until :meth:`release`); returns its id.

        Raises:
            ValueError: bad filters.
        """
        _compile_filters(filters)  # validate now
        sub = self._new_sub(session)
        session.programs[sub] = (program, filters, config, self.slot)
        return sub

    def subscribe_slot(self, session: _Session) -> int:
        """Add a slotSubscribe (held until :meth:`release`); returns its id."""
        sub = self._new_sub(session)
        session.slots[sub] = self.slot
        return sub

    def _new_sub(self, session: _Session) -> int:
        sub, self._next_sub = self._next_sub, self._next_sub + 1
        session.held.add(sub)
        self.count("ws_subscriptions_total")
        return sub

    def release(self, session: _Session, sub: int) -> None:
        """Let notifications for ``sub`` flow (call after sending its confirmation)."""
        session.held.discard(sub)
        self.wake()

    def unsubscribe(self, session: _Session, sub: object, kind: str) -> bool:
        """Remove subscription ``sub`` of ``kind`` ("account" or "slot"); False if unknown."""
        by_kind: dict[str, dict[int, Any]] = {"account": session.accounts, "slot": session.slots,
                                              "program": session.programs}
        subs = by_kind[kind]
        if not isinstance(sub, int) or sub not in subs:
            return False
        del subs[sub]
        return True

    def pending_notifications(self, session: _Session) -> list[tuple[str, int, Any]]:
        """What ``session`` has not been sent yet, marked as sent.

        Returns:
            ``(kind, subscription, payload)`` triples: kind "account" with
            ``(pubkey, encoding)``, "program" with ``(pubkey, config)`` for each matching
            account of the program that changed, or "slot" with the slot number.
            Several changes between two calls coalesce to the newest value.
        """
        out: list[tuple[str, int, Any]] = []
        for sub, (key, enc, seen) in session.accounts.items():
            if sub in session.held:
                continue
            acct = self.accounts.get(key)
            if acct is not None and acct.modified_slot > seen:
                session.accounts[sub] = (key, enc, acct.modified_slot)
                out.append(("account", sub, (key, enc)))
        for sub, seen in session.slots.items():
            if sub not in session.held and self.slot > seen:
                session.slots[sub] = self.slot
                out.append(("slot", sub, self.slot))
        for sub, (program, filters, config, seen) in session.programs.items():
            if sub in session.held or self.slot <= seen:
                continue
            session.programs[sub] = (program, filters, config, self.slot)
            for key, acct in self.program_accounts(program, filters):
                if acct.modified_slot > seen:
                    out.append(("program", sub, (key, config)))
        return out

    async def wait_changed(self) -> None:
        """Wait for the next mutation or :meth:`drop_ws`."""
        await self._changed.wait()


def _compile_filters(filters: Iterable[Mapping[str, Any]]) -> Callable[[bytes], bool]:
    """One predicate over account data for Solana's dataSize / memcmp filters.

    Raises:
        ValueError: a filter of another shape or with bad memcmp bytes.
    """
    checks: list[Callable[[bytes], bool]] = []
    for flt in filters:
        if isinstance(flt, Mapping) and set(flt) == {"dataSize"} and _is_uint(flt["dataSize"]):
            size = int(flt["dataSize"])
            checks.append(functools.partial(_has_size, size=size))
        elif isinstance(flt, Mapping) and set(flt) == {"memcmp"} and isinstance(flt["memcmp"], Mapping):
            off, want = flt["memcmp"].get("offset"), decode_memcmp_bytes(flt["memcmp"])
            if not isinstance(off, int) or isinstance(off, bool) or off < 0:
                raise ValueError(f"memcmp offset must be a non-negative integer, got {off!r}")
            checks.append(functools.partial(_has_bytes_at, offset=off, want=want))
        else:
            raise ValueError(f"unsupported filter {flt!r}")
    return lambda data: all(check(data) for check in checks)


def _has_size(data: bytes, *, size: int) -> bool:
    return len(data) == size


def _has_bytes_at(data: bytes, *, offset: int, want: bytes) -> bool:
    return data[offset : offset + len(want)] == want


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def decode_memcmp_bytes(memcmp: Mapping[str, Any]) -> bytes:
    """The bytes of a memcmp filter (``encoding`` base58, the default, or base64).

    Raises:
        ValueError: missing or undecodable bytes, unknown encoding.
    """
    import base64
    import binascii

    raw, encoding = memcmp.get("bytes"), memcmp.get("encoding", "base58")
    if not isinstance(raw, str):
        raise ValueError(f"memcmp bytes must be a string, got {raw!r}")
    # agave (rpc-client-api filter.rs): at most 175 base58 / 172 base64 characters, and
    # at most 128 bytes once decoded (MAX_DATA_SIZE); it names the error DataTooLarge.
    if encoding == "base58":
        if len(raw) > 175:
            raise ValueError("DataTooLarge")
        decoded = b58decode(raw)
    elif encoding == "base64":
        if len(raw) > 172:
            raise ValueError("DataTooLarge")
        try:
            decoded = base64.b64decode(raw, validate=True)
        except binascii.Error:
            raise ValueError("memcmp bytes are not valid base64") from None
    else:
        raise ValueError(f"unknown memcmp encoding {encoding!r}")
    if len(decoded) > 128:
        raise ValueError("DataTooLarge")
    return decoded


async def run_slot_ticker(world: World, interval: float = 0.4) -> None:
    """Advance ``world.slot`` every ``interval`` seconds, like a validator, forever."""
    while True:
        await trio.sleep(interval)
        world.advance_slot()
