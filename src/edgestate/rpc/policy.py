"""What /rpc lets through, in which canonical form, and how long each answer is cached.

Everything here is plain synchronous code over parsed JSON: the method allowlist
(-32601), parameter validation (-32602, before anything goes upstream), the canonical
params that key the cache (same call, same key: config keys sorted, unknown keys and
nulls dropped), and the cache class of each method.

Messages follow agave's (``rpc/src/rpc.rs``): a bad public key is ``Invalid param:
Invalid``, an over-long list ``Too many inputs provided; max N``, a wrong shape
``Invalid params: ...``.
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from solders.hash import Hash, ParseHashError
from solders.pubkey import Pubkey
from solders.signature import Signature

# JSON-RPC 2.0 and agave codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

COMMITMENTS = ("processed", "confirmed", "finalized")
ACCOUNT_ENCODINGS = ("base58", "base64", "base64+zstd", "jsonParsed", "binary")
TX_ENCODINGS = ("json", "jsonParsed", "base58", "base64", "binary")
MAX_MULTIPLE_ACCOUNTS = 100  # agave MAX_MULTIPLE_ACCOUNTS
MAX_SIGNATURE_STATUSES = 256  # agave MAX_GET_SIGNATURE_STATUSES_QUERY_ITEMS
MAX_PRIORITIZATION_KEYS = 128  # agave MAX_TX_ACCOUNT_LOCKS
MAX_FILTERS = 4
MAX_TX_BYTES = 1232  # PACKET_DATA_SIZE
MAX_BASE58_TX = 1683
MAX_BASE64_TX = 1644
MAX_DATA_SIZE = 10 * 1024 * 1024  # largest account: getMinimumBalanceForRentExemption bound
SLOT_TTL = 0.4  # about one slot
IMMUTABLE_TTL = 3600.0


class CacheClass(enum.Enum):
    """How long a method's answers may be reused."""

    NEVER = "never"  # sendTransaction, simulateTransaction: each one goes upstream
    ACCOUNT = "account"  # account reads: cache.ttl, refreshed on a PubSub notification
    SLOT = "slot"  # blockhash, slot, height, fees: about one slot
    IMMUTABLE = "immutable"  # genesis hash, rent minimum: long
    TRANSACTION = "transaction"  # a finalized transaction is immutable; not found yet: a slot
    STATIC = "static"  # version, health: seconds
    SIGNATURES = "signatures"  # getSignatureStatuses: merged and cached per signature


class InvalidParams(ValueError):
    """A call's params are not what the method takes (JSON-RPC -32602)."""


@dataclass(frozen=True, slots=True)
class Rule:
    """The validator and cache class of one method."""

    validate: Callable[[list[Any]], list[Any]]
    cache: CacheClass


# ---- value checks -------------------------------------------------------------------


def _pubkey(value: Any, what: str = "pubkey") -> str:
    if not isinstance(value, str):
        raise InvalidParams(f"Invalid params: {what} must be a base58 string, got {_kind(value)}")
    if len(value) > 44:
        raise InvalidParams("Invalid param: WrongSize")
    try:
        Pubkey.from_string(value)
    except ValueError:
        raise InvalidParams("Invalid param: Invalid") from None
    return value


def _signature(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 88:
        raise InvalidParams("Invalid param: Invalid")
    try:
        Signature.from_string(value)
    except ValueError:
        raise InvalidParams("Invalid param: Invalid") from None
    return value


def _blockhash(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 44:
        raise InvalidParams("Invalid param: Invalid")
    try:
        Hash.from_string(value)
    except (ValueError, ParseHashError):  # solders' ParseHashError is no ValueError
        raise InvalidParams("Invalid param: Invalid") from None
    return value


def _kind(value: Any) -> str:
    return "null" if value is None else {dict: "map", list: "sequence", str: "string", bool: "boolean"}.get(
        type(value), "number"
    )


def _uint(value: Any, what: str, limit: int = 2**64 - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise InvalidParams(f"Invalid params: {what} must be an integer 0..{limit}, got {value!r}"[:200])
    return value


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidParams(f"Invalid params: {what} must be true or false")
    return value


def _choice(value: Any, what: str, options: Iterable[str]) -> str:
    options = tuple(options)
    if value not in options:
        raise InvalidParams(f"Invalid params: {what} must be one of {', '.join(options)}")
    return str(value)


def _data_slice(value: Any) -> dict[str, int]:
    if not isinstance(value, dict) or set(value) != {"offset", "length"}:
        raise InvalidParams("Invalid params: dataSlice must be {offset, length}")
    return {"offset": _uint(value["offset"], "dataSlice.offset"), "length": _uint(value["length"], "dataSlice.length")}


def _filters(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise InvalidParams("Invalid params: filters must be an array")
    if len(value) > MAX_FILTERS:
        raise InvalidParams(f"Too many filters provided; max {MAX_FILTERS}")
    out: list[dict[str, Any]] = []
    for flt in value:
        if isinstance(flt, dict) and set(flt) == {"dataSize"}:
            out.append({"dataSize": _uint(flt["dataSize"], "dataSize")})
        elif isinstance(flt, dict) and set(flt) == {"memcmp"} and isinstance(flt["memcmp"], dict):
            m = flt["memcmp"]
            if not set(m) <= {"offset", "bytes", "encoding"} or not isinstance(m.get("bytes"), str):
                raise InvalidParams("Invalid params: memcmp must be {offset, bytes, encoding?}")
            if len(m["bytes"]) > 175:  # agave MAX_DATA_BASE58_SIZE
                raise InvalidParams("Invalid params: memcmp bytes too long")
            clean = {"offset": _uint(m.get("offset"), "memcmp.offset"), "bytes": m["bytes"]}
            if "encoding" in m:
                clean["encoding"] = _choice(m["encoding"], "memcmp.encoding", ("base58", "base64"))
            out.append({"memcmp": clean})
        elif isinstance(flt, dict) and set(flt) == {"tokenAccountState"}:
            out.append({"tokenAccountState": {}})
        else:
            raise InvalidParams("Invalid params: a filter must be {dataSize} or {memcmp}")
    return out


# Config keys each kind of call takes: key -> checker. Unknown keys are dropped (agave
# ignores them too), so they neither reach the provider nor split the cache.
_Checker = Callable[[Any], Any]
_COMMON: dict[str, _Checker] = {
    "commitment": lambda v: _choice(v, "commitment", COMMITMENTS),
    "minContextSlot": lambda v: _uint(v, "minContextSlot"),
}
_ACCOUNT: dict[str, _Checker] = {
    **_COMMON,
    "encoding": lambda v: _choice(v, "encoding", ACCOUNT_ENCODINGS),
    "dataSlice": _data_slice,
}
_PROGRAM: dict[str, _Checker] = {
    **_ACCOUNT,
    "filters": _filters,
    "withContext": lambda v: _bool(v, "withContext"),
}
_TX_SEND: dict[str, _Checker] = {
    "encoding": lambda v: _choice(v, "encoding", ("base58", "base64")),
    "skipPreflight": lambda v: _bool(v, "skipPreflight"),
    "preflightCommitment": lambda v: _choice(v, "preflightCommitment", COMMITMENTS),
    "maxRetries": lambda v: _uint(v, "maxRetries", 2**32 - 1),
    "minContextSlot": lambda v: _uint(v, "minContextSlot"),
}


def _simulate_accounts(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("addresses"), list):
        raise InvalidParams("Invalid params: accounts must be {addresses, encoding?}")
    if len(value["addresses"]) > MAX_PRIORITIZATION_KEYS:
        raise InvalidParams(f"Too many accounts provided; max {MAX_PRIORITIZATION_KEYS}")
    out: dict[str, Any] = {"addresses": [_pubkey(a, "accounts.addresses") for a in value["addresses"]]}
    if "encoding" in value:
        out["encoding"] = _choice(value["encoding"], "accounts.encoding", ACCOUNT_ENCODINGS)
    return out


_TX_SIMULATE: dict[str, _Checker] = {
    **_COMMON,
    "encoding": lambda v: _choice(v, "encoding", ("base58", "base64")),
    "sigVerify": lambda v: _bool(v, "sigVerify"),
    "replaceRecentBlockhash": lambda v: _bool(v, "replaceRecentBlockhash"),
    "innerInstructions": lambda v: _bool(v, "innerInstructions"),
    "accounts": _simulate_accounts,
}
_GET_TX: dict[str, _Checker] = {
    "commitment": lambda v: _choice(v, "commitment", ("confirmed", "finalized")),
    "encoding": lambda v: _choice(v, "encoding", TX_ENCODINGS),
    "maxSupportedTransactionVersion": lambda v: _uint(v, "maxSupportedTransactionVersion", 255),
}
_STATUSES: dict[str, _Checker] = {"searchTransactionHistory": lambda v: _bool(v, "searchTransactionHistory")}


def _config(value: Any, keys: dict[str, _Checker]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidParams(f"Invalid params: expected a config object, got {_kind(value)}")
    return {k: keys[k](v) for k, v in sorted(value.items()) if k in keys and v is not None}


def _shape(params: list[Any], required: int, optional: int) -> list[Any]:
    if len(params) < required:
        raise InvalidParams(f"Invalid params: expected at least {required} parameter(s), got {len(params)}")
    if len(params) > required + optional:
        raise InvalidParams(f"Invalid params: invalid length {len(params)}, expected at most {required + optional}")
    return params + [None] * (required + optional - len(params))


def _with_config(args: list[Any], config: dict[str, Any]) -> list[Any]:
    return [*args, config] if config else list(args)


# ---- per-method validators ----------------------------------------------------------


def _v_pubkey_account(p: list[Any]) -> list[Any]:
    key, cfg = _shape(p, 1, 1)
    return _with_config([_pubkey(key)], _config(cfg, _ACCOUNT))


def _v_pubkey_common(p: list[Any]) -> list[Any]:
    key, cfg = _shape(p, 1, 1)
    return _with_config([_pubkey(key)], _config(cfg, _COMMON))


def _v_multiple(p: list[Any]) -> list[Any]:
    keys, cfg = _shape(p, 1, 1)
    if not isinstance(keys, list):
        raise InvalidParams("Invalid params: expected an array of pubkeys")
    if len(keys) > MAX_MULTIPLE_ACCOUNTS:
        raise InvalidParams(f"Too many inputs provided; max {MAX_MULTIPLE_ACCOUNTS}")
    return _with_config([[_pubkey(k) for k in keys]], _config(cfg, _ACCOUNT))


def _v_token_accounts_by_owner(p: list[Any]) -> list[Any]:
    owner, flt, cfg = _shape(p, 2, 1)
    if not isinstance(flt, dict) or len(flt) != 1 or not set(flt) <= {"mint", "programId"}:
        raise InvalidParams("Invalid params: expected {mint} or {programId} as the second parameter")
    ((name, value),) = flt.items()
    return _with_config([_pubkey(owner), {name: _pubkey(value, name)}], _config(cfg, _ACCOUNT))


def _v_config_only(keys: dict[str, _Checker]) -> Callable[[list[Any]], list[Any]]:
    def validate(p: list[Any]) -> list[Any]:
        (cfg,) = _shape(p, 0, 1)
        return _with_config([], _config(cfg, keys))

    return validate


def _v_none(p: list[Any]) -> list[Any]:
    _shape(p, 0, 0)
    return []


def _v_blockhash_valid(p: list[Any]) -> list[Any]:
    blockhash, cfg = _shape(p, 1, 1)
    return _with_config([_blockhash(blockhash)], _config(cfg, _COMMON))


def _v_statuses(p: list[Any]) -> list[Any]:
    sigs, cfg = _shape(p, 1, 1)
    if not isinstance(sigs, list):
        raise InvalidParams("Invalid params: expected an array of signatures")
    if len(sigs) > MAX_SIGNATURE_STATUSES:
        raise InvalidParams(f"Too many inputs provided; max {MAX_SIGNATURE_STATUSES}")
    return _with_config([[_signature(s) for s in sigs]], _config(cfg, _STATUSES))


def _v_transaction(p: list[Any]) -> list[Any]:
    sig, cfg = _shape(p, 1, 1)
    if isinstance(cfg, str):  # the legacy form: an encoding string
        cfg = {"encoding": cfg}
    return _with_config([_signature(sig)], _config(cfg, _GET_TX))


def _v_rent(p: list[Any]) -> list[Any]:
    size, cfg = _shape(p, 1, 1)
    return _with_config([_uint(size, "data length", MAX_DATA_SIZE)], _config(cfg, {"commitment": _COMMON["commitment"]}))


def _v_fee_for_message(p: list[Any]) -> list[Any]:
    message, cfg = _shape(p, 1, 1)
    _decoded(message, "base64", "message")
    return _with_config([message], _config(cfg, _COMMON))


def _v_prioritization(p: list[Any]) -> list[Any]:
    (keys,) = _shape(p, 0, 1)
    if keys is None:
        return []
    if not isinstance(keys, list):
        raise InvalidParams("Invalid params: expected an array of pubkeys")
    if len(keys) > MAX_PRIORITIZATION_KEYS:
        raise InvalidParams(f"Too many inputs provided; max {MAX_PRIORITIZATION_KEYS}")
    return [[_pubkey(k) for k in keys]]


def _decoded(text: Any, encoding: str, what: str = "transaction") -> bytes:
    """The bytes of an encoded transaction or message, bounded like agave's."""
    if not isinstance(text, str):
        raise InvalidParams(f"Invalid params: {what} must be an encoded string")
    limit = MAX_BASE64_TX if encoding == "base64" else MAX_BASE58_TX
    if len(text) > limit:
        raise InvalidParams(
            f"{encoding} encoded {what} too large: {len(text)} bytes (max: encoded/raw {limit}/{MAX_TX_BYTES})"
        )
    try:
        if encoding == "base64":
            raw = base64.b64decode(text, validate=True)
        else:
            raw = _b58decode(text)
    except (binascii.Error, ValueError):
        raise InvalidParams(f"invalid {encoding} encoding: {what}") from None
    if len(raw) > MAX_TX_BYTES:
        raise InvalidParams(f"decoded {what} too large: {len(raw)} bytes (max: {MAX_TX_BYTES} bytes)")
    if not raw:
        raise InvalidParams(f"Invalid params: empty {what}")
    return raw


_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}


def _b58decode(text: str) -> bytes:
    num = 0
    for char in text:
        if char not in _B58_INDEX:
            raise ValueError("invalid base58")
        num = num * 58 + _B58_INDEX[char]
    body = num.to_bytes((num.bit_length() + 7) // 8, "big") if num else b""
    return b"\0" * (len(text) - len(text.lstrip("1"))) + body


def _v_tx(keys: dict[str, _Checker]) -> Callable[[list[Any]], list[Any]]:
    def validate(p: list[Any]) -> list[Any]:
        tx, cfg = _shape(p, 1, 1)
        config = _config(cfg, keys)
        _decoded(tx, config.get("encoding", "base58"))  # agave's default encoding is base58
        return _with_config([tx], config)

    return validate


RULES: dict[str, Rule] = {
    "getAccountInfo": Rule(_v_pubkey_account, CacheClass.ACCOUNT),
    "getBalance": Rule(_v_pubkey_common, CacheClass.ACCOUNT),
    "getMultipleAccounts": Rule(_v_multiple, CacheClass.ACCOUNT),
    "getTokenAccountBalance": Rule(_v_pubkey_common, CacheClass.ACCOUNT),
    "getTokenAccountsByOwner": Rule(_v_token_accounts_by_owner, CacheClass.ACCOUNT),
    "getProgramAccounts": Rule(_v_pubkey_account, CacheClass.ACCOUNT),  # refined below (filters)
    "getLatestBlockhash": Rule(_v_config_only(_COMMON), CacheClass.SLOT),
    "isBlockhashValid": Rule(_v_blockhash_valid, CacheClass.SLOT),
    "getSlot": Rule(_v_config_only(_COMMON), CacheClass.SLOT),
    "getBlockHeight": Rule(_v_config_only(_COMMON), CacheClass.SLOT),
    "getEpochInfo": Rule(_v_config_only(_COMMON), CacheClass.SLOT),
    "getSignatureStatuses": Rule(_v_statuses, CacheClass.SIGNATURES),
    "getTransaction": Rule(_v_transaction, CacheClass.TRANSACTION),
    "getMinimumBalanceForRentExemption": Rule(_v_rent, CacheClass.IMMUTABLE),
    "getFeeForMessage": Rule(_v_fee_for_message, CacheClass.SLOT),
    "getRecentPrioritizationFees": Rule(_v_prioritization, CacheClass.SLOT),
    "getHealth": Rule(_v_none, CacheClass.STATIC),
    "getVersion": Rule(_v_none, CacheClass.STATIC),
    "getGenesisHash": Rule(_v_none, CacheClass.IMMUTABLE),
    "simulateTransaction": Rule(_v_tx(_TX_SIMULATE), CacheClass.NEVER),
    "sendTransaction": Rule(_v_tx(_TX_SEND), CacheClass.NEVER),
}


def _v_program_accounts(p: list[Any]) -> list[Any]:
    key, cfg = _shape(p, 1, 1)
    return _with_config([_pubkey(key)], _config(cfg, _PROGRAM))


RULES["getProgramAccounts"] = Rule(_v_program_accounts, CacheClass.ACCOUNT)


class Policy:
    """The allowlist, validation and cache rules of one configuration.

    Args:
        allowed_methods: methods clients may call (others: -32601).
        allowed_programs: programs whose accounts getProgramAccounts / programSubscribe
            may list (the lottery program is always among them).
        account_ttl: seconds an account read is reused (``cache.ttl``).
    """

    def __init__(self, allowed_methods: Iterable[str], allowed_programs: Iterable[str], account_ttl: float) -> None:
        self.allowed = frozenset(m for m in allowed_methods if m in RULES)
        self.programs = frozenset(allowed_programs)
        self.account_ttl = account_ttl

    def check(self, method: Any, params: Any) -> tuple[str, list[Any]]:
        """The method and its canonical params.

        Raises:
            MethodNotAllowed: a method outside the allowlist (or not a string).
            InvalidParams: params the method does not take, or a program not allowed.
        """
        if not isinstance(method, str) or method not in self.allowed:
            raise MethodNotAllowed("Method not found")
        if params is None:
            params = []
        if not isinstance(params, list):
            raise InvalidParams("Invalid params: expected a sequence of parameters")
        canonical = RULES[method].validate(list(params))
        if method == "getProgramAccounts" and canonical[0] not in self.programs:
            raise InvalidParams(f"Invalid params: getProgramAccounts is not allowed for program {canonical[0]}")
        return method, canonical

    def ttl(self, method: str, params: list[Any]) -> float:
        """Seconds an answer to this (canonical) call may be reused; 0 = never cached."""
        rule = RULES[method].cache
        if rule is CacheClass.NEVER or commitment(params) == "processed":
            return 0.0
        if rule is CacheClass.ACCOUNT:
            return self.account_ttl
        if rule in (CacheClass.SLOT, CacheClass.TRANSACTION, CacheClass.SIGNATURES):
            return SLOT_TTL
        if rule is CacheClass.IMMUTABLE:
            return IMMUTABLE_TTL
        return 5.0  # STATIC: version, health


class MethodNotAllowed(LookupError):
    """A method outside ``rpc.allowed_methods`` (JSON-RPC -32601)."""


def commitment(params: list[Any]) -> str | None:
    """The commitment a canonical call asks for (None: the provider's default)."""
    if params and isinstance(params[-1], dict):
        value = params[-1].get("commitment") or params[-1].get("preflightCommitment")
        return value if isinstance(value, str) else None
    return None


def account_keys(method: str, params: list[Any]) -> list[str]:
    """The accounts whose change makes a cached answer of this call old."""
    if method in ("getAccountInfo", "getBalance", "getTokenAccountBalance"):
        return [params[0]]
    if method == "getMultipleAccounts":
        return list(params[0])
    return []


# ---- PubSub -------------------------------------------------------------------------

SUBSCRIBE_METHODS = ("accountSubscribe", "programSubscribe", "signatureSubscribe", "slotSubscribe")
UNSUBSCRIBE_METHODS = {m.replace("Subscribe", "Unsubscribe"): m for m in SUBSCRIBE_METHODS}
NOTIFICATIONS = {
    "accountSubscribe": "accountNotification",
    "programSubscribe": "programNotification",
    "signatureSubscribe": "signatureNotification",
    "slotSubscribe": "slotNotification",
}
_SIG_SUB: dict[str, _Checker] = {
    "commitment": _COMMON["commitment"],
    "enableReceivedNotification": lambda v: _bool(v, "enableReceivedNotification"),
}


def check_subscription(method: str, params: Any, programs: frozenset[str]) -> list[Any]:
    """The canonical params of a subscribe call (commitment made explicit).

    Raises:
        InvalidParams: params the method does not take, or a program not allowed.
    """
    if params is None:
        params = []
    if not isinstance(params, list):
        raise InvalidParams("Invalid params: expected a sequence of parameters")
    if method == "slotSubscribe":
        _shape(params, 0, 0)
        return []
    first, cfg = _shape(list(params), 1, 1)
    if method == "accountSubscribe":
        config = _config(cfg, {**_ACCOUNT, "encoding": lambda v: _choice(v, "encoding", ACCOUNT_ENCODINGS)})
        first = _pubkey(first)
    elif method == "programSubscribe":
        config = _config(cfg, _PROGRAM)
        config.pop("withContext", None)
        first = _pubkey(first)
        if first not in programs:
            raise InvalidParams(f"Invalid params: programSubscribe is not allowed for program {first}")
    else:
        config = _config(cfg, _SIG_SUB)
        first = _signature(first)
    config.pop("minContextSlot", None)
    # agave's default commitment is finalized: [key] and [key, {finalized}] are one subscription.
    config.setdefault("commitment", "finalized")
    return [first, config]
