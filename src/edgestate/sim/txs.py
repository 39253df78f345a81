"""The simulator's transactions and chain clock: what a wallet flow needs, in agave's shapes.

sendTransaction (signature checked, SystemProgram transfers applied, fee charged),
simulateTransaction, getSignatureStatuses, getTransaction, signatureSubscribe, blockhashes
(getLatestBlockhash, isBlockhashValid), the clock (getBlockHeight, getEpochInfo), fees
(getFeeForMessage, getRecentPrioritizationFees), rent, getGenesisHash and
getTokenAccountsByOwner. Shapes and error codes follow agave's ``rpc/src/rpc.rs`` and
``rpc-client-api``: -32002 for a failed preflight (with ``data``: err, logs, ...), -32003
for a bad signature, -32602 for bad params.

State lives in a :class:`Ledger` per :class:`~edgestate.sim.world.World` (kept beside
it, so world.py stays as it is). :func:`methods` is registered into the app's method
table; :func:`pubsub_request` and :func:`pending_notifications` are the PubSub hooks.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from solders.hash import Hash
from solders.message import MessageV0, from_bytes_versioned
from solders.token.state import TokenAccount
from solders.transaction import VersionedTransaction

from .world import SYSTEM_PROGRAM, TOKEN_ACCOUNT_LEN, World, b58decode, b58encode, parse_pubkey

FEE_PER_SIGNATURE = 5000
MAX_STATUSES = 256
BLOCKHASH_VALIDITY = 150  # slots a blockhash stays usable
FINALITY = 32  # slots from confirmed to finalized
SLOTS_PER_EPOCH = 432_000
HEIGHT_OFFSET = 1_000_000  # block height trails the slot (skipped slots), as on a real cluster
GENESIS_HASH = b58encode(hashlib.sha256(b"edgestate simulated genesis").digest())
MAX_LEDGER_TXS = 100_000

Fault = Callable[[int, str], Exception]
Send = Callable[[Any], Awaitable[None]]


@dataclass(slots=True)
class _Tx:
    signature: str
    raw: bytes
    slot: int
    err: Any
    fee: int
    pre: list[int]
    post: list[int]
    logs: list[str]
    keys: list[str]


@dataclass(slots=True, eq=False)
class Ledger:
    """Sent transactions and signature subscriptions of one world."""

    txs: dict[str, _Tx] = field(default_factory=dict)
    # PubSub session -> {subscription id: (signature, commitment)}
    sig_subs: dict[Any, dict[int, tuple[str, str]]] = field(default_factory=dict)
    next_sub: int = 1 << 30  # apart from the world's own ids


_LEDGERS: weakref.WeakKeyDictionary[World, Ledger] = weakref.WeakKeyDictionary()


def ledger(world: World) -> Ledger:
    """The ledger kept beside ``world``."""
    found = _LEDGERS.get(world)
    if found is None:
        found = _LEDGERS[world] = Ledger()
    return found


# ---- the chain clock ----------------------------------------------------------------


def blockhash_at(slot: int) -> str:
    """The (deterministic) blockhash of ``slot``."""
    return b58encode(hashlib.sha256(b"edgestate sim blockhash %d" % slot).digest())


def block_height(world: World) -> int:
    return max(0, world.slot - HEIGHT_OFFSET)


def blockhash_slot(world: World, blockhash: str) -> int | None:
    """The slot of a blockhash that is still valid, else None."""
    for slot in range(world.slot, max(-1, world.slot - BLOCKHASH_VALIDITY - 1), -1):
        if blockhash_at(slot) == blockhash:
            return slot
    return None


def _context(world: World) -> dict[str, Any]:
    return {"slot": world.slot, "apiVersion": "2.0.15"}


def _status_of(world: World, tx: _Tx) -> tuple[str, int | None]:
    """(confirmationStatus, confirmations): confirmed at once, finalized FINALITY slots later."""
    depth = world.slot - tx.slot
    if depth >= FINALITY:
        return "finalized", None
    return "confirmed", depth


_LEVELS = {"processed": 0, "confirmed": 1, "finalized": 2}


# ---- helpers ------------------------------------------------------------------------


def _args(params: Any, max_len: int, fault: Fault) -> tuple[list[Any], dict[str, Any]]:
    params = [] if params is None else params
    if not isinstance(params, list) or len(params) > max_len:
        raise fault(-32602, f"Invalid params: expected at most {max_len} parameters")
    config = params[max_len - 1] if len(params) == max_len else None
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise fault(-32602, "Invalid params: invalid type: expected a config object")
    return params, config


def _decode_tx(params: list[Any], config: dict[str, Any], fault: Fault) -> tuple[VersionedTransaction, bytes]:
    if not params or not isinstance(params[0], str):
        raise fault(-32602, "Invalid params: missing transaction")
    encoding = config.get("encoding", "base58")
    try:
        if encoding == "base64":
            raw = base64.b64decode(params[0], validate=True)
        elif encoding == "base58":
            raw = b58decode(params[0])
        else:
            raise fault(-32602, f"Invalid params: unsupported encoding {encoding!r}")
    except (binascii.Error, ValueError):
        raise fault(-32602, f"invalid {encoding} encoding: transaction") from None
    if len(raw) > 1232:
        raise fault(-32602, f"decoded solana_sdk::transaction::versioned::VersionedTransaction too large: {len(raw)} bytes")
    try:
        tx = VersionedTransaction.from_bytes(raw)
    except BaseException as exc:  # solders panics (a BaseException) on some inputs
        if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
            raise
        raise fault(-32602, "failed to deserialize solana_sdk::transaction::versioned::VersionedTransaction") from None
    return tx, raw


def _preflight_data(err: Any, logs: list[str]) -> dict[str, Any]:
    return {"accounts": None, "err": err, "innerInstructions": None, "logs": logs, "replacementBlockhash": None,
            "returnData": None, "unitsConsumed": 0}


@dataclass(slots=True)
class _Outcome:
    err: Any
    logs: list[str]
    keys: list[str]
    pre: list[int]
    post: list[int]
    fee: int
    units: int


def _execute(world: World, tx: VersionedTransaction, *, apply: bool, check_blockhash: bool = True) -> _Outcome:
    """Run ``tx`` against the world (SystemProgram transfers; other programs succeed empty)."""
    msg = tx.message
    keys = [str(k) for k in msg.account_keys]
    fee = FEE_PER_SIGNATURE * msg.header.num_required_signatures
    pre = [world.accounts[k].lamports if k in world.accounts else 0 for k in keys]
    balances = dict(zip(keys, pre))
    logs: list[str] = []
    if check_blockhash and blockhash_slot(world, str(msg.recent_blockhash)) is None:
        return _Outcome("BlockhashNotFound", [], keys, pre, pre, 0, 0)
    payer = keys[0]
    if payer not in world.accounts:
        return _Outcome("AccountNotFound", [], keys, pre, pre, 0, 0)
    if balances[payer] < fee:
        return _Outcome("InsufficientFundsForFee", [], keys, pre, pre, 0, 0)
    balances[payer] -= fee
    err: Any = None
    units = 0
    for index, ix in enumerate(msg.instructions):
        program = keys[ix.program_id_index]
        logs.append(f"Program {program} invoke [1]")
        units += 150
        if program == SYSTEM_PROGRAM and len(ix.data) == 12 and struct.unpack_from("<I", ix.data)[0] == 2:
            (lamports,) = struct.unpack_from("<Q", ix.data, 4)
            src, dst = keys[ix.accounts[0]], keys[ix.accounts[1]]
            if balances[src] < lamports:
                logs.append(f"Transfer: insufficient lamports {balances[src]}, need {lamports}")
                logs.append(f"Program {program} failed: custom program error: 0x1")
                err = {"InstructionError": [index, {"Custom": 1}]}
                break
            balances[src] -= lamports
            balances[dst] = balances.get(dst, 0) + lamports
        logs.append(f"Program {program} success")
    if err is not None:  # a failed transaction still pays its fee, nothing else happens
        balances = dict(zip(keys, pre))
        balances[payer] -= fee
    post = [balances[k] for k in keys]
    if apply:
        for key, before, after in zip(keys, pre, post):
            if after != before or (key not in world.accounts and after):
                acct = world.accounts.get(key)
                owner = acct.owner if acct else SYSTEM_PROGRAM
                data = acct.data if acct else b""
                world.set_account(key, after, owner, data, executable=acct.executable if acct else False)
    return _Outcome(err, logs, keys, pre, post, fee, units)


# ---- the methods ----------------------------------------------------------------------


def methods(fault: Fault, account_json: Callable[[World, str, dict[str, Any]], Any]) -> dict[str, Callable[[World, Any], Any]]:
    """The method table to merge into the app's.

    Args:
        fault: builds the app's JSON-RPC error exception from (code, message).
        account_json: the app's account encoder (getTokenAccountsByOwner).
    """

    def get_latest_blockhash(world: World, params: Any) -> Any:
        _args(params, 1, fault)
        value = {"blockhash": blockhash_at(world.slot), "lastValidBlockHeight": block_height(world) + BLOCKHASH_VALIDITY}
        return {"context": _context(world), "value": value}

    def is_blockhash_valid(world: World, params: Any) -> Any:
        args, _ = _args(params, 2, fault)
        if not args or not isinstance(args[0], str):
            raise fault(-32602, "Invalid params: missing blockhash")
        try:
            Hash.from_string(args[0])
        except ValueError:
            raise fault(-32602, "Invalid param: Invalid") from None
        return {"context": _context(world), "value": blockhash_slot(world, args[0]) is not None}

    def get_block_height(world: World, params: Any) -> Any:
        _args(params, 1, fault)
        return block_height(world)

    def get_epoch_info(world: World, params: Any) -> Any:
        _args(params, 1, fault)
        return {
            "absoluteSlot": world.slot,
            "blockHeight": block_height(world),
            "epoch": world.slot // SLOTS_PER_EPOCH,
            "slotIndex": world.slot % SLOTS_PER_EPOCH,
            "slotsInEpoch": SLOTS_PER_EPOCH,
            "transactionCount": len(ledger(world).txs),
        }

    def get_rent_minimum(world: World, params: Any) -> Any:
        args, _ = _args(params, 2, fault)
        size = args[0] if args else None
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= 10 * 1024 * 1024:
            raise fault(-32602, "Invalid params: expected a data length")
        return (128 + size) * 3480 * 2  # (account overhead + data) x lamports/byte-year x 2 years

    def get_fee_for_message(world: World, params: Any) -> Any:
        args, _ = _args(params, 2, fault)
        try:
            msg = from_bytes_versioned(base64.b64decode(args[0] if args else "", validate=True))
        except (binascii.Error, ValueError, TypeError):
            raise fault(-32602, "Invalid params: invalid message") from None
        valid = blockhash_slot(world, str(msg.recent_blockhash)) is not None
        fee = FEE_PER_SIGNATURE * msg.header.num_required_signatures if valid else None
        return {"context": _context(world), "value": fee}

    def get_recent_prioritization_fees(world: World, params: Any) -> Any:
        _args(params, 1, fault)
        return [{"slot": s, "prioritizationFee": 0} for s in range(max(0, world.slot - 4), world.slot + 1)]

    def get_genesis_hash(world: World, params: Any) -> Any:
        return GENESIS_HASH

    def send_transaction(world: World, params: Any) -> Any:
        args, config = _args(params, 2, fault)
        tx, raw = _decode_tx(args, config, fault)
        if not all(tx.verify_with_results()):
            raise fault(-32003, "Transaction signature verification failure")
        signature = str(tx.signatures[0])
        book = ledger(world)
        if signature in book.txs:
            err = "AlreadyProcessed"
            raise _preflight(fault, err, [])
        outcome = _execute(world, tx, apply=False)
        if outcome.fee == 0 and outcome.err is not None:  # not even the fee could be paid
            raise _preflight(fault, outcome.err, outcome.logs)
        if outcome.err is not None and not config.get("skipPreflight", False):
            raise _preflight(fault, outcome.err, outcome.logs)
        outcome = _execute(world, tx, apply=True)
        if len(book.txs) >= MAX_LEDGER_TXS:
            book.txs.pop(next(iter(book.txs)))
        book.txs[signature] = _Tx(signature, raw, world.slot, outcome.err, outcome.fee, outcome.pre, outcome.post,
                                  outcome.logs, outcome.keys)
        world.wake()  # signature subscribers
        return signature

    def simulate_transaction(world: World, params: Any) -> Any:
        args, config = _args(params, 2, fault)
        tx, _raw = _decode_tx(args, config, fault)
        if config.get("sigVerify") and not all(tx.verify_with_results()):
            raise fault(-32003, "Transaction signature verification failure")
        replace = bool(config.get("replaceRecentBlockhash"))
        outcome = _execute(world, tx, apply=False, check_blockhash=not replace)
        replacement = None
        if replace:
            replacement = {"blockhash": blockhash_at(world.slot),
                           "lastValidBlockHeight": block_height(world) + BLOCKHASH_VALIDITY}
        value = {
            "err": outcome.err,
            "logs": outcome.logs,
            "accounts": None,
            "unitsConsumed": outcome.units,
            "returnData": None,
            "innerInstructions": None,
            "replacementBlockhash": replacement,
            "loadedAccountsDataSize": 0,
        }
        return {"context": _context(world), "value": value}

    def get_signature_statuses(world: World, params: Any) -> Any:
        args, _ = _args(params, 2, fault)
        if not args or not isinstance(args[0], list):
            raise fault(-32602, "Invalid params: expected an array of signatures")
        if len(args[0]) > MAX_STATUSES:
            raise fault(-32602, f"Too many inputs provided; max {MAX_STATUSES}")
        book = ledger(world)
        value: list[dict[str, Any] | None] = []
        for sig in args[0]:
            tx = book.txs.get(sig) if isinstance(sig, str) else None
            if tx is None:
                value.append(None)
                continue
            status, confirmations = _status_of(world, tx)
            value.append({
                "slot": tx.slot,
                "confirmations": confirmations,
                "err": tx.err,
                "status": {"Ok": None} if tx.err is None else {"Err": tx.err},
                "confirmationStatus": status,
            })
        return {"context": _context(world), "value": value}

    def get_transaction(world: World, params: Any) -> Any:
        if isinstance(params, list) and len(params) == 2 and isinstance(params[1], str):
            params = [params[0], {"encoding": params[1]}]  # the legacy form: an encoding string
        args, config = _args(params, 2, fault)
        commitment = config.get("commitment", "finalized")
        if commitment == "processed":
            raise fault(-32602, "Method does not support commitment below `confirmed`")
        tx = ledger(world).txs.get(args[0]) if args and isinstance(args[0], str) else None
        if tx is None:
            return None
        status, _ = _status_of(world, tx)
        if _LEVELS[status] < _LEVELS.get(commitment, 2):
            return None
        vtx = VersionedTransaction.from_bytes(tx.raw)
        version: Any = 0 if isinstance(vtx.message, MessageV0) else "legacy"
        if version == 0 and config.get("maxSupportedTransactionVersion") is None:
            raise fault(-32015, "Transaction version (0) is not supported by the requesting client. "
                                "Please try the request again with the following configuration parameter: "
                                '"maxSupportedTransactionVersion": 0')
        encoding = config.get("encoding", "json")
        if encoding in ("base64", "base58"):
            body: Any = [base64.b64encode(tx.raw).decode() if encoding == "base64" else b58encode(tx.raw), encoding]
        else:
            msg = vtx.message
            header = msg.header
            body = {
                "signatures": [str(s) for s in vtx.signatures],
                "message": {
                    "accountKeys": tx.keys,
                    "header": {"numRequiredSignatures": header.num_required_signatures,
                               "numReadonlySignedAccounts": header.num_readonly_signed_accounts,
                               "numReadonlyUnsignedAccounts": header.num_readonly_unsigned_accounts},
                    "recentBlockhash": str(msg.recent_blockhash),
                    "instructions": [{"programIdIndex": ix.program_id_index, "accounts": list(ix.accounts),
                                      "data": b58encode(bytes(ix.data)), "stackHeight": None}
                                     for ix in msg.instructions],
                },
            }
        meta = {
            "err": tx.err,
            "status": {"Ok": None} if tx.err is None else {"Err": tx.err},
            "fee": tx.fee,
            "preBalances": tx.pre,
            "postBalances": tx.post,
            "innerInstructions": [],
            "logMessages": tx.logs,
            "preTokenBalances": [],
            "postTokenBalances": [],
            "rewards": [],
            "loadedAddresses": {"writable": [], "readonly": []},
            "computeUnitsConsumed": 150 * len(tx.logs) // 2,
        }
        return {"slot": tx.slot, "blockTime": None, "meta": meta, "transaction": body, "version": version}

    def get_token_accounts_by_owner(world: World, params: Any) -> Any:
        args, config = _args(params, 3, fault)
        if len(args) < 2 or not isinstance(args[1], dict) or len(args[1]) != 1:
            raise fault(-32602, "Invalid params: expected an owner and {mint} or {programId}")
        try:
            owner = parse_pubkey(args[0])
            ((kind, value),) = args[1].items()
            target = parse_pubkey(value)
        except ValueError:
            raise fault(-32602, "Invalid param: Invalid") from None
        found = []
        for key in list(world.accounts):
            if world.token_kind(key) != "account":
                continue
            acct = world.accounts[key]
            parsed = TokenAccount.from_bytes(acct.data[:TOKEN_ACCOUNT_LEN])
            if str(parsed.owner) != owner:
                continue
            if (kind == "mint" and str(parsed.mint) != target) or (kind == "programId" and acct.owner != target):
                continue
            found.append({"pubkey": key, "account": account_json(world, key, config)})
        return {"context": _context(world), "value": found}

    return {
        "getLatestBlockhash": get_latest_blockhash,
        "isBlockhashValid": is_blockhash_valid,
        "getBlockHeight": get_block_height,
        "getEpochInfo": get_epoch_info,
        "getMinimumBalanceForRentExemption": get_rent_minimum,
        "getFeeForMessage": get_fee_for_message,
        "getRecentPrioritizationFees": get_recent_prioritization_fees,
        "getGenesisHash": get_genesis_hash,
        "sendTransaction": send_transaction,
        "simulateTransaction": simulate_transaction,
        "getSignatureStatuses": get_signature_statuses,
        "getTransaction": get_transaction,
        "getTokenAccountsByOwner": get_token_accounts_by_owner,
    }


def _preflight(fault: Fault, err: Any, logs: list[str]) -> Exception:
    text = {"BlockhashNotFound": "Blockhash not found",
            "AccountNotFound": "Attempt to debit an account but found no record of a prior credit.",
            "AlreadyProcessed": "This transaction has already been processed",
            "InsufficientFundsForFee": "Insufficient funds for fee"}.get(err if isinstance(err, str) else "", "")
    if not text:
        text = f"Error processing Instruction {err['InstructionError'][0]}: custom program error: 0x1" \
            if isinstance(err, dict) and "InstructionError" in err else str(err)
    exc = fault(-32002, f"Transaction simulation failed: {text}")
    exc.data = _preflight_data(err, logs)  # type: ignore[attr-defined]  # read by the app when it sends data
    return exc


# ---- PubSub -------------------------------------------------------------------------


async def pubsub_request(world: World, session: Any, item: dict[str, Any], send: Send) -> None:
    """Answer a PubSub request the app does not know (signatureSubscribe/-Unsubscribe).

    The subscription is registered only after its confirmation is sent, so no
    notification can overtake it.
    """
    method, req_id, params = item["method"], item.get("id"), item.get("params")
    book = ledger(world)

    def error(code: int, message: str) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "error": {"code": code, "message": message}, "id": req_id}

    if method == "signatureSubscribe":
        if not isinstance(params, list) or not 1 <= len(params) <= 2 or not isinstance(params[0], str):
            await send(error(-32602, "Invalid params: expected [signature, config?]"))
            return
        config = params[1] if len(params) == 2 and isinstance(params[1], dict) else {}
        commitment = config.get("commitment", "finalized")
        if commitment not in _LEVELS:
            await send(error(-32602, "Invalid params: unknown commitment"))
            return
        sub, book.next_sub = book.next_sub, book.next_sub + 1
        await send({"jsonrpc": "2.0", "result": sub, "id": req_id})
        book.sig_subs.setdefault(session, {})[sub] = (params[0], commitment)
        world.count("ws_subscriptions_total")
        world.wake()
    elif method == "signatureUnsubscribe":
        subs = book.sig_subs.get(session, {})
        if not isinstance(params, list) or len(params) != 1 or params[0] not in subs:
            await send(error(-32602, "Invalid subscription id."))
            return
        del subs[params[0]]
        await send({"jsonrpc": "2.0", "result": True, "id": req_id})
    else:
        await send(error(-32601, "Method not found"))


def pending_notifications(world: World, session: Any) -> list[tuple[str, int, Any]]:
    """Signature notifications now due for ``session`` (each subscription ends with its one)."""
    book = ledger(world)
    subs = book.sig_subs.get(session)
    if not subs:
        return []
    out: list[tuple[str, int, Any]] = []
    for sub, (signature, commitment) in list(subs.items()):
        tx = book.txs.get(signature)
        if tx is not None and _LEVELS[_status_of(world, tx)[0]] >= _LEVELS[commitment]:
            del subs[sub]
            out.append(("signature", sub, {"context": {"slot": world.slot}, "value": {"err": tx.err}}))
    return out


def close_session(world: World, session: Any) -> None:
    """Forget a closed PubSub session's signature subscriptions."""
    ledger(world).sig_subs.pop(session, None)
