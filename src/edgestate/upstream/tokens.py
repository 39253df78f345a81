"""SPL Token / Token-2022 layouts: strict mint parsing and uiAmount as agave computes it.

Everything here is pure: bytes in, values out, testable without a network.

uiAmount follows agave's ``token_amount_to_ui_amount_v3`` (account-decoder/src/parse_token.rs)
and the Token-2022 extension code it calls:

* no extension: ``amount as f64 / 10^decimals as f64`` (``None`` when ``10^decimals``
  overflows a u64, i.e. decimals > 19);
* ``InterestBearingConfig`` (it wins when both are present): ``amount as f64 *
  (exp(pre_rate * pre_span) * exp(rate * post_span) / 10^decimals)``, rates in basis
  points a year of 365.24 days, the spans up to the chain's ``Clock.unix_timestamp``;
  the string is Rust's shortest round-trip float, parsed back: the same f64;
* ``ScaledUiAmountConfig``: ``amount as f64 * (multiplier / 10^decimals)``, where the
  multiplier is ``new_multiplier`` from its effective timestamp on; the result is
  formatted with ``decimals`` places (then trimmed) and parsed back: rounded to them.

Non-finite results are ``None`` (the RPC's JSON has ``null`` there).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

TOKEN_PROGRAM_ID = "TokenkegQfeZyiNwAJbNbGKPFXCWuBvf9Ss623VQ5DA"
TOKEN_2022_PROGRAM_ID = "TokenzQdBNbLqP5VEhdkAS6EPFLC1PHnBqCXEpPxuEb"
CLOCK_SYSVAR = "SysvarC1ock11111111111111111111111111111111"

MINT_LEN = 82
ACCOUNT_LEN = 165  # Token-2022: the account-type byte sits here, TLV extensions follow
_MULTISIG_LEN = 355  # a Token-2022 account of exactly this size is a multisig, never a mint
_ACCOUNT_TYPE_MINT = 1
_EXT_INTEREST_BEARING = 10
_EXT_SCALED_UI_AMOUNT = 25
_INTEREST_LEN = 52  # authority 32, init ts i64, pre rate i16, last update ts i64, rate i16
_SCALED_LEN = 56  # authority 32, multiplier f64, new multiplier effective ts i64, new multiplier f64
SECONDS_PER_YEAR = 60.0 * 60.0 * 24.0 * 365.24
_ONE_IN_BASIS_POINTS = 10_000.0
_U64_MAX = 2**64 - 1


@dataclass(frozen=True, slots=True)
class InterestBearing:
    """Token-2022 ``InterestBearingConfig`` (rates in basis points a year)."""

    initialization_timestamp: int
    pre_update_average_rate: int
    last_update_timestamp: int
    current_rate: int


@dataclass(frozen=True, slots=True)
class ScaledUiAmount:
    """Token-2022 ``ScaledUiAmountConfig``."""

    multiplier: float
    new_multiplier_effective_timestamp: int
    new_multiplier: float


@dataclass(frozen=True, slots=True)
class MintInfo:
    """What a balance lookup needs of a mint: its program, decimals and UI extensions."""

    program: str
    decimals: int
    interest: InterestBearing | None = None
    scaled: ScaledUiAmount | None = None

    @property
    def needs_clock(self) -> bool:
        """Whether uiAmount depends on the chain's time."""
        return self.interest is not None or self.scaled is not None


class NotAMint(ValueError):
    """The bytes are not an initialized SPL Token / Token-2022 mint (the reason says why)."""


def parse_mint(owner: str, data: bytes) -> MintInfo:
    """A mint account's info, checked as strictly as the token programs unpack it.

    SPL Token: exactly 82 bytes. Token-2022: 82 bytes, or longer with zero padding up to
    byte 165, the account type "mint" there, well-formed TLV extensions after it, and
    not the multisig size. In both: ``is_initialized`` set.

    Raises:
        NotAMint: anything else (a token account, a multisig, another program's account).
    """
    if owner not in (TOKEN_PROGRAM_ID, TOKEN_2022_PROGRAM_ID):
        raise NotAMint("not owned by the SPL Token or Token-2022 program")
    interest = scaled = None
    if len(data) != MINT_LEN:
        if owner != TOKEN_2022_PROGRAM_ID:
            raise NotAMint(f"an SPL Token mint is {MINT_LEN} bytes, this account has {len(data)}")
        if len(data) <= ACCOUNT_LEN or len(data) == _MULTISIG_LEN:
            raise NotAMint(f"{len(data)} bytes is not a Token-2022 mint layout")
        if data[ACCOUNT_LEN] != _ACCOUNT_TYPE_MINT or any(data[MINT_LEN:ACCOUNT_LEN]):
            raise NotAMint("the Token-2022 account type is not 'mint'")
        for ext_type, value in _tlv(data[ACCOUNT_LEN + 1 :]):
            if ext_type == _EXT_INTEREST_BEARING and len(value) == _INTEREST_LEN:
                init_ts, pre_rate, last_ts, rate = struct.unpack_from("<qhqh", value, 32)
                interest = InterestBearing(init_ts, pre_rate, last_ts, rate)
            elif ext_type == _EXT_SCALED_UI_AMOUNT and len(value) == _SCALED_LEN:
                multiplier, effective, new_multiplier = struct.unpack_from("<dqd", value, 32)
                scaled = ScaledUiAmount(multiplier, effective, new_multiplier)
    if data[45] != 1:
        raise NotAMint("the mint is not initialized")
    return MintInfo(program=owner, decimals=data[44], interest=interest, scaled=scaled)


def _tlv(data: bytes) -> list[tuple[int, bytes]]:
    """Token-2022 TLV entries (type u16, length u16, value), up to the first empty type."""
    out = []
    at = 0
    while at + 4 <= len(data):
        ext_type, length = struct.unpack_from("<HH", data, at)
        if ext_type == 0:  # Uninitialized: the rest is padding
            break
        value = data[at + 4 : at + 4 + length]
        if len(value) != length:
            raise NotAMint("a Token-2022 extension runs past the end of the account")
        out.append((ext_type, value))
        at += 4 + length
    return out


def clock_unix_timestamp(data: bytes) -> int:
    """``unix_timestamp`` of the Clock sysvar (slot, epoch start ts, epoch, leader epoch, ts).

    Raises:
        ValueError: fewer than 40 bytes.
    """
    if len(data) < 40:
        raise ValueError(f"Clock sysvar data is {len(data)} bytes, expected 40")
    return int(struct.unpack_from("<q", data, 32)[0])


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def ui_amount(amount: int, mint: MintInfo, unix_timestamp: int | None = None) -> float | None:
    """uiAmount of a raw ``amount`` of ``mint`` as agave's RPC computes it.

    Args:
        amount: the raw u64 amount.
        mint: decimals and UI extensions.
        unix_timestamp: the chain's Clock time (needed when ``mint.needs_clock``).

    Raises:
        ValueError: ``amount`` is not a u64, or the clock is missing where it is needed.
    """
    if isinstance(amount, bool) or not 0 <= amount <= _U64_MAX:
        raise ValueError(f"amount must be a u64, got {amount!r}")
    decimals = mint.decimals
    if mint.needs_clock and unix_timestamp is None:
        raise ValueError("this mint's uiAmount depends on the chain's clock")
    if mint.interest is not None:
        assert unix_timestamp is not None
        cfg = mint.interest
        pre = math.exp(cfg.pre_update_average_rate * (cfg.last_update_timestamp - cfg.initialization_timestamp)
                       / SECONDS_PER_YEAR / _ONE_IN_BASIS_POINTS)
        post = math.exp(cfg.current_rate * (unix_timestamp - cfg.last_update_timestamp)
                        / SECONDS_PER_YEAR / _ONE_IN_BASIS_POINTS)
        return _finite(float(amount) * (pre * post / _pow10(decimals)))
    if mint.scaled is not None:
        assert unix_timestamp is not None
        sc = mint.scaled
        multiplier = sc.new_multiplier if unix_timestamp >= sc.new_multiplier_effective_timestamp else sc.multiplier
        scaled = float(amount) * (multiplier / _pow10(decimals))
        if not math.isfinite(scaled):
            return None
        return float(f"{scaled:.{decimals}f}")  # agave formats with `decimals` places, then parses
    if decimals > 19:  # 10^decimals overflows the usize agave computes it in
        return None
    return float(amount) / float(10**decimals)


def _pow10(decimals: int) -> float:
    # Rust's 10_f64.powi(d): exact for d <= 22 (where 10^d is a double); beyond, the
    # correctly rounded power is what powi gives for the decimals tokens use.
    return float(10.0**decimals)
