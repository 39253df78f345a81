"""Token layouts and uiAmount as agave computes it (issue 11), against agave's own test vectors."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from solders.pubkey import Pubkey
from solders.token.state import Mint, TokenAccount, TokenAccountState

from edgestate.upstream.tokens import (
    TOKEN_2022_PROGRAM_ID,
    TOKEN_PROGRAM_ID,
    InterestBearing,
    MintInfo,
    NotAMint,
    ScaledUiAmount,
    clock_unix_timestamp,
    parse_mint,
    ui_amount,
)

YEAR = 31_556_736  # 365.24 days, spl-token-2022's SECONDS_PER_YEAR


def mint_bytes(decimals: int = 6) -> bytes:
    return bytes(Mint(mint_authority=None, supply=10**12, decimals=decimals, is_initialized=True, freeze_authority=None))


def t22_mint(decimals: int, *tlv: tuple[int, bytes]) -> bytes:
    body = b"".join(struct.pack("<HH", t, len(v)) + v for t, v in tlv)
    return mint_bytes(decimals) + b"\0" * 83 + b"\x01" + body


def interest(init: int, pre: int, last: int, rate: int) -> tuple[int, bytes]:
    return 10, b"\0" * 32 + struct.pack("<qhqh", init, pre, last, rate)


def scaled(multiplier: float, effective: int = 0, new: float | None = None) -> tuple[int, bytes]:
    return 25, b"\0" * 32 + struct.pack("<dqd", multiplier, effective, multiplier if new is None else new)


# ---- uiAmount: the vectors of spl-token-2022's own tests -------------------------------


def test_interest_bearing_matches_spl_token_2022() -> None:
    five = MintInfo(TOKEN_2022_PROGRAM_ID, 0, interest=InterestBearing(0, 500, YEAR, 500))
    assert repr(ui_amount(1, five, YEAR)) == "1.0512710963760241"  # 1 year at 5%: exp(0.05)
    assert repr(ui_amount(1, MintInfo(TOKEN_2022_PROGRAM_ID, 1, interest=five.interest), YEAR)) == "0.10512710963760241"
    assert ui_amount(1, MintInfo(TOKEN_2022_PROGRAM_ID, 10, interest=five.interest), YEAR) == 1.0512710963760242e-10
    assert repr(ui_amount(10_000_000_000, MintInfo(TOKEN_2022_PROGRAM_ID, 10, interest=five.interest), YEAR)) == (
        "1.0512710963760241"
    )
    minus = MintInfo(TOKEN_2022_PROGRAM_ID, 0, interest=InterestBearing(0, -500, YEAR, -500))
    assert repr(ui_amount(1, minus, YEAR)) == "0.951229424500714"
    net = MintInfo(TOKEN_2022_PROGRAM_ID, 0, interest=InterestBearing(0, -500, YEAR, 500))
    assert ui_amount(1, net, 2 * YEAR) == 1.0
    huge = MintInfo(TOKEN_2022_PROGRAM_ID, 0, interest=InterestBearing(0, 500, YEAR, 500))
    assert ui_amount(2**64 - 1, huge, 2 * YEAR) == 20386805083448100000.0
    flat = MintInfo(TOKEN_2022_PROGRAM_ID, 2, interest=InterestBearing(0, 0, YEAR, 0))
    assert [ui_amount(a, flat, YEAR) for a in (23, 110, 4200, 0)] == [0.23, 1.1, 42.0, 0.0]


def test_scaled_ui_amount_matches_spl_token_2022() -> None:
    five = ScaledUiAmount(5.0, 1, 0.0)
    assert ui_amount(1, MintInfo(TOKEN_2022_PROGRAM_ID, 0, scaled=five), 0) == 5.0
    assert ui_amount(1, MintInfo(TOKEN_2022_PROGRAM_ID, 1, scaled=five), 0) == 0.5
    assert ui_amount(1, MintInfo(TOKEN_2022_PROGRAM_ID, 10, scaled=five), 0) == 0.0000000005
    assert ui_amount(10_000_000_000, MintInfo(TOKEN_2022_PROGRAM_ID, 10, scaled=five), 0) == 5.0
    # The new multiplier applies from its effective timestamp on.
    change = ScaledUiAmount(5.0, 100, 10.0)
    assert ui_amount(3, MintInfo(TOKEN_2022_PROGRAM_ID, 0, scaled=change), 99) == 15.0
    assert ui_amount(3, MintInfo(TOKEN_2022_PROGRAM_ID, 0, scaled=change), 100) == 30.0
    # Rounded to the mint's decimals, as agave formats it: 1/3 * 10^-2 -> "0.0033".
    third = MintInfo(TOKEN_2022_PROGRAM_ID, 4, scaled=ScaledUiAmount(1 / 3, 0, 1 / 3))
    assert ui_amount(100, third, 0) == 0.0033
    # Infinite is null in the RPC's JSON.
    assert ui_amount(2**64 - 1, MintInfo(TOKEN_2022_PROGRAM_ID, 0, scaled=ScaledUiAmount(1.7976931348623157e308, 1, 0)), 0) is None


def test_plain_mint_is_amount_over_ten_to_the_decimals() -> None:
    assert ui_amount(1_500_000, MintInfo(TOKEN_PROGRAM_ID, 6)) == 1.5
    assert ui_amount(1, MintInfo(TOKEN_PROGRAM_ID, 9)) == 1e-9
    assert ui_amount(5, MintInfo(TOKEN_PROGRAM_ID, 20)) is None  # 10^20 overflows agave's usize
    with pytest.raises(ValueError, match="u64"):
        ui_amount(-1, MintInfo(TOKEN_PROGRAM_ID, 6))
    with pytest.raises(ValueError, match="clock"):
        ui_amount(1, MintInfo(TOKEN_2022_PROGRAM_ID, 0, scaled=ScaledUiAmount(2.0, 0, 2.0)))


@settings(max_examples=200, deadline=None)
@given(amount=st.integers(0, 2**64 - 1), decimals=st.integers(0, 19))
def test_plain_ui_amount_is_the_f64_division(amount: int, decimals: int) -> None:
    # agave: amount as f64 / 10^decimals as f64 (two roundings, not Python's exact int division)
    assert ui_amount(amount, MintInfo(TOKEN_PROGRAM_ID, decimals)) == float(amount) / float(10**decimals)


# ---- the mint check is strict ------------------------------------------------------------


def token_account_bytes(mint: Pubkey, owner: Pubkey, amount: int = 7) -> bytes:
    return bytes(TokenAccount(mint, owner, amount, None, TokenAccountState.Initialized, None, 0, None))


def test_parse_mint_spl_and_token_2022_with_extensions() -> None:
    assert parse_mint(TOKEN_PROGRAM_ID, mint_bytes(6)) == MintInfo(TOKEN_PROGRAM_ID, 6)
    assert parse_mint(TOKEN_2022_PROGRAM_ID, mint_bytes(3)) == MintInfo(TOKEN_2022_PROGRAM_ID, 3)
    info = parse_mint(TOKEN_2022_PROGRAM_ID, t22_mint(2, (3, b"\0" * 32), interest(10, 100, 20, 200), scaled(2.5)))
    assert info.decimals == 2 and info.interest == InterestBearing(10, 100, 20, 200)
    assert info.scaled == ScaledUiAmount(2.5, 0, 2.5) and info.needs_clock


def test_token_account_is_never_a_mint() -> None:
    # The old check (owner, >= 82 bytes, byte 45 == 1) took a token account whose owner's
    # 14th byte is 1 for a mint.
    owner = Pubkey(bytes([7] * 13 + [1] + [7] * 18))
    data = token_account_bytes(Pubkey.new_unique(), owner)
    assert data[45] == 1
    with pytest.raises(NotAMint):
        parse_mint(TOKEN_PROGRAM_ID, data)
    with pytest.raises(NotAMint):
        parse_mint(TOKEN_2022_PROGRAM_ID, data + b"\x02" + b"\x07\x00\x00\x00")  # a Token-2022 account
    with pytest.raises(NotAMint):
        parse_mint(TOKEN_2022_PROGRAM_ID, mint_bytes() + b"\0" * (355 - 82))  # multisig size
    with pytest.raises(NotAMint):
        parse_mint(TOKEN_PROGRAM_ID, mint_bytes() + b"\0" * 100)  # SPL mints are exactly 82 bytes
    with pytest.raises(NotAMint):
        parse_mint("11111111111111111111111111111111", mint_bytes())
    uninitialized = bytearray(mint_bytes())
    uninitialized[45] = 0
    with pytest.raises(NotAMint, match="not initialized"):
        parse_mint(TOKEN_PROGRAM_ID, bytes(uninitialized))
    with pytest.raises(NotAMint, match="past the end"):
        parse_mint(TOKEN_2022_PROGRAM_ID, mint_bytes() + b"\0" * 83 + b"\x01" + struct.pack("<HH", 10, 52) + b"\0" * 8)


def test_clock_sysvar_timestamp() -> None:
    assert clock_unix_timestamp(struct.pack("<QqQQq", 1, 2, 3, 4, 1_767_225_600)) == 1_767_225_600
    with pytest.raises(ValueError):
        clock_unix_timestamp(b"\0" * 39)
