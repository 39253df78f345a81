"""The simulator's HTTP face: Solana JSON-RPC and PubSub at ``/``, Jupiter Price API v3
at ``/price/v3``, and a JSON control API under ``/control/``.

Shapes and error codes follow the real services closely enough that solders' typed
response classes parse them; fault knobs of the :class:`World` apply to the RPC and
price routes (never to ``/control/``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import trio
from quart import Response, request, websocket
from quart_trio import QuartTrio

from . import txs
from .world import FAULT_DEFAULTS, HANG_SECONDS, World, b58encode, parse_pubkey

API_VERSION = "2.0.15"
MAX_MULTIPLE_ACCOUNTS = 100
MAX_FILTERS = 4
MAX_PRICE_IDS = 50
_RATE_LIMITED = {"jsonrpc": "2.0", "error": {"code": 429, "message": "Too many requests for a specific RPC call"}, "id": None}


class RpcFault(Exception):
    """A JSON-RPC error object to answer instead of a result."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> RpcFault:
    return RpcFault(-32602, message)


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status=status, headers=headers, content_type="application/json")


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


# ---- JSON-RPC methods ----


def _params(params: Any, max_len: int) -> tuple[list[Any], dict[str, Any]]:
    """Split params into positional args and the trailing config object."""
    if params is None:
        params = []
    if not isinstance(params, list):
        raise _invalid("Invalid params: expected a sequence")
    if len(params) > max_len:
        raise _invalid(f"Invalid params: invalid length {len(params)}, expected at most {max_len}")
    config = params[max_len - 1] if len(params) == max_len and max_len else None
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise _invalid("Invalid params: invalid type: expected a config object")
    return params, config


def _pubkey_arg(params: list[Any], name: str = "pubkey") -> str:
    if not params:
        raise _invalid(f"Invalid params: missing {name}")
    try:
        return parse_pubkey(params[0])
    except ValueError:
        raise _invalid("Invalid param: Invalid") from None


def _context(world: World) -> dict[str, Any]:
    return {"slot": world.slot, "apiVersion": API_VERSION}


def _encode_data(data: bytes, config: dict[str, Any]) -> list[str]:
    encoding = config.get("encoding", "base64")
    sl = config.get("dataSlice")
    if sl is not None:
        if not isinstance(sl, dict) or not all(
            isinstance(sl.get(k), int) and not isinstance(sl.get(k), bool) and sl[k] >= 0 for k in ("offset", "length")
        ):
            raise _invalid("Invalid params: dataSlice needs non-negative integers offset and length")
        data = data[sl["offset"] : sl["offset"] + sl["length"]]
    if encoding in ("base64", "jsonParsed"):  # jsonParsed falls back to base64, as Solana does for unknown layouts
        return [base64.b64encode(data).decode(), "base64"]
    if encoding == "base58":
        return [b58encode(data), "base58"]
    raise _invalid(f"Invalid params: unsupported encoding {encoding!r} (use base64 or base58)")


def account_json(world: World, pubkey: str, config: dict[str, Any]) -> dict[str, Any] | None:
    """One account in RPC shape (getAccountInfo's ``value``), or None if it is missing."""
    acct = world.accounts.get(pubkey)
    if acct is None:
        _encode_data(b"", config)  # still validate the config
        return None
    return {
        "data": _encode_data(acct.data, config),
        "executable": acct.executable,
        "lamports": acct.lamports,
        "owner": acct.owner,
        "rentEpoch": 18446744073709551615,
        "space": len(acct.data),
    }


def _get_health(world: World, params: Any) -> Any:
    return "ok"


def _get_version(world: World, params: Any) -> Any:
    return {"solana-core": API_VERSION, "feature-set": 3294202862}


def _get_slot(world: World, params: Any) -> Any:
    _params(params, 1)
    return world.slot


def _get_balance(world: World, params: Any) -> Any:
    args, _ = _params(params, 2)
    acct = world.accounts.get(_pubkey_arg(args))
    return {"context": _context(world), "value": acct.lamports if acct else 0}


def _get_account_info(world: World, params: Any) -> Any:
    args, config = _params(params, 2)
    return {"context": _context(world), "value": account_json(world, _pubkey_arg(args), config)}


def _get_multiple_accounts(world: World, params: Any) -> Any:
    args, config = _params(params, 2)
    if not args or not isinstance(args[0], list):
        raise _invalid("Invalid params: expected an array of pubkeys")
    if len(args[0]) > MAX_MULTIPLE_ACCOUNTS:
        raise _invalid(f"Too many inputs provided; max {MAX_MULTIPLE_ACCOUNTS}")
    keys = [_pubkey_arg([k]) for k in args[0]]
    return {"context": _context(world), "value": [account_json(world, k, config) for k in keys]}


def _get_program_accounts(world: World, params: Any) -> Any:
    args, config = _params(params, 2)
    program = _pubkey_arg(args, "program id")
    filters = config.get("filters") or []
    if not isinstance(filters, list):
        raise _invalid("Invalid params: filters must be an array")
    if len(filters) > MAX_FILTERS:
        raise _invalid(f"Too many filters provided; max {MAX_FILTERS}")
    try:
        found = world.program_accounts(program, filters)
    except ValueError as exc:
        raise _invalid(f"Invalid params: {exc}") from None
    value = [{"pubkey": key, "account": account_json(world, key, config)} for key, _acct in found]
    return {"context": _context(world), "value": value} if config.get("withContext") else value


def _ui_amount_string(amount: int, decimals: int) -> str:
    text = format(Decimal(amount).scaleb(-decimals), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _get_token_account_balance(world: World, params: Any) -> Any:
    args, _ = _params(params, 2)
    key = _pubkey_arg(args)
    if key not in world.accounts:
        raise _invalid("Invalid param: could not find account")
    balance = world.token_balance(key)
    if balance is None:
        raise _invalid("Invalid param: not a Token account")
    amount, decimals = balance
    return {
        "context": _context(world),
        "value": {
            "amount": str(amount),
            "decimals": decimals,
            "uiAmount": amount / 10**decimals,
            "uiAmountString": _ui_amount_string(amount, decimals),
        },
    }


METHODS: dict[str, Callable[[World, Any], Any]] = {
    "getHealth": _get_health,
    "getVersion": _get_version,
    "getSlot": _get_slot,
    "getBalance": _get_balance,
    "getAccountInfo": _get_account_info,
    "getMultipleAccounts": _get_multiple_accounts,
    "getProgramAccounts": _get_program_accounts,
    "getTokenAccountBalance": _get_token_account_balance,
}
METHODS.update({k: v for k, v in txs.methods(RpcFault, account_json).items() if k not in METHODS})  # issue 12


def _rpc_error(code: int, message: str, req_id: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "error": {"code": code, "message": message}, "id": req_id}


def _call(world: World, item: Any) -> dict[str, Any]:
    """Answer one JSON-RPC request object (already counted)."""
    req_id = item.get("id") if isinstance(item, dict) else None
    if not isinstance(item, dict) or item.get("jsonrpc") != "2.0" or not isinstance(item.get("method"), str):
        world.count("rpc_errors")
        return _rpc_error(-32600, "Invalid request", req_id)
    handler = METHODS.get(item["method"])
    try:
        if handler is None:
            raise RpcFault(-32601, "Method not found")
        return {"jsonrpc": "2.0", "result": handler(world, item.get("params")), "id": req_id}
    except RpcFault as fault:
        world.count("rpc_errors")
        error = _rpc_error(fault.code, fault.message, req_id)
        if getattr(fault, "data", None) is not None:  # e.g. a failed preflight's logs (sim/txs.py)
            error["error"]["data"] = fault.data  # type: ignore[attr-defined]
        return error


async def _apply_fault(world: World, *, rpc: bool) -> Response | None:
    """The injected failure for this request, if the dice say so."""
    fault = world.pick_fault()
    if fault == "error":
        world.count("http_5xx")
        status = world.rng.choice((500, 503))
        return Response("Internal Server Error" if status == 500 else "Service Unavailable", status=status)
    if fault == "timeout":
        world.count("timeouts")
        await trio.sleep(HANG_SECONDS)  # the client's deadline is meant to fire first
        return Response("Gateway Timeout", status=504)
    if fault == "malformed":
        world.count("malformed")
        if world.rng.random() < 0.5:
            return Response("<html><body>502 Bad Gateway</body></html>", status=200, content_type="text/html")
        return _json({"jsonrpc": "2.0", "unexpected": True} if rpc else ["unexpected"])
    return None


def _too_many_requests(world: World, body: Any) -> Response:
    world.count("http_429")
    return _json(body, 429, {"Retry-After": "1"})


def _bad(exc: Exception) -> Response:
    return _error(400, str(exc))


async def _json_body() -> dict[str, Any]:
    body = await request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        raise ValueError("expected a JSON object body")
    return body


def create_sim_app(world: World) -> QuartTrio:
    """The simulator as a Quart-Trio app serving ``world``.

    Args:
        world: the state every route reads and the control API mutates.
    """
    app = QuartTrio("edgestate.sim")

    @app.post("/")
    async def rpc() -> Response:
        world.count("http_requests")
        world.count("rpc_requests")
        if world.latency:
            await trio.sleep(world.latency)
        try:
            payload = json.loads(await request.get_data())
        except (ValueError, UnicodeDecodeError):
            payload = ValueError
        calls = len(payload) if isinstance(payload, list) else 1
        if not world.admit_rpc(max(calls, 1)):
            return _too_many_requests(world, _RATE_LIMITED)
        if isinstance(payload, list):
            world.count("rpc_batches")
        items = payload if isinstance(payload, list) else [payload]
        for item in items:  # billed calls: counted even if a fault follows
            if isinstance(item, dict) and isinstance(item.get("method"), str):
                world.count_method(item["method"])
        faulty = await _apply_fault(world, rpc=True)
        if faulty is not None:
            return faulty
        if payload is ValueError:
            world.count("rpc_errors")
            return _json(_rpc_error(-32700, "Parse error", None))
        if payload == []:
            world.count("rpc_errors")
            return _json(_rpc_error(-32600, "Invalid request", None))
        answers = [_call(world, item) for item in items]
        return _json(answers if isinstance(payload, list) else answers[0])

    @app.get("/price/v3")
    async def price() -> Response:
        world.count("http_requests")
        world.count("price_requests")
        if "x-api-key" in request.headers:
            world.last_api_key = request.headers["x-api-key"]
        if world.latency:
            await trio.sleep(world.latency)
        if not world.admit_price():
            return _too_many_requests(world, {"code": 429, "message": "Rate limit exceeded"})
        ids = [i.strip() for i in request.args.get("ids", "").split(",") if i.strip()]
        world.count("price_ids", len(ids))
        faulty = await _apply_fault(world, rpc=False)
        if faulty is not None:
            return faulty
        if not ids:
            return _error(400, "Query parameter ids is required")
        if len(ids) > MAX_PRICE_IDS:
            return _error(400, f"Too many ids: {len(ids)}; at most {MAX_PRICE_IDS}")
        for mint in ids:
            try:
                parse_pubkey(mint)
            except ValueError:
                return _error(400, f"Invalid mint: {mint}")
        quotes = {mint: world.price_quote(mint) for mint in dict.fromkeys(ids)}
        return _json({mint: q for mint, q in quotes.items() if q is not None})

    @app.websocket("/")
    async def pubsub() -> Response | None:
        if world.refuse_ws:
            world.count("ws_refused")
            return _error(503, "WebSocket upgrades refused (simulated)")
        await websocket.accept()
        session = world.open_session()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pump, world, session, nursery.cancel_scope)
                while True:  # always drain: Quart's receive queue is tiny
                    message = await websocket.receive()
                    await _pubsub_request(world, session, message)
        finally:
            world.close_session(session)
            txs.close_session(world, session)
        return None

    @app.get("/control/stats")
    async def control_stats() -> Response:
        return _json({
            "counters": world.counters(),
            "faults": world.faults(),
            "slot": world.slot,
            "jackpot": world.jackpot,
            "participants": world.participant_count(),
            "lastApiKeySeen": world.last_api_key is not None,  # never echo the key itself
        })

    @app.post("/control/reset")
    async def control_reset() -> Response:
        body = await request.get_json(force=True, silent=True)
        world.reset_counters()
        if isinstance(body, dict) and body.get("faults") is True:
            world.reset_faults()
        return _json({"ok": True})

    @app.post("/control/faults")
    async def control_faults() -> Response:
        try:
            world.set_faults(**await _json_body())
        except (ValueError, TypeError) as exc:
            return _bad(exc)
        return _json({"faults": world.faults()})

    @app.post("/control/drop-ws")
    async def control_drop_ws() -> Response:
        return _json({"dropped": world.drop_ws()})

    @app.post("/control/price")
    async def control_price() -> Response:
        try:
            body = await _json_body()
            world.set_price(body.get("mint"), body.get("price"))  # type: ignore[arg-type]
        except ValueError as exc:
            return _bad(exc)
        return _json({"mint": body["mint"], "price": world.prices[body["mint"]]})

    @app.post("/control/jackpot")
    async def control_jackpot() -> Response:
        try:
            body = await _json_body()
            key = "lamports" if "lamports" in body else "delta"
            value = body.get(key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError('expected {"lamports": <int>} or {"delta": <int>}')
            if key == "lamports":
                world.set_jackpot(value)
            else:
                world.add_jackpot(value)
        except ValueError as exc:
            return _bad(exc)
        return _json({"lamports": world.jackpot, "slot": world.slot})

    @app.post("/control/participants")
    async def control_participants() -> Response:
        try:
            body = await _json_body()
            add = body.get("add")
            if isinstance(add, bool) or not isinstance(add, int) or not 0 <= add <= 100_000:
                raise ValueError('expected {"add": <int 0..100000>}')
        except ValueError as exc:
            return _bad(exc)
        world.add_participants(add)
        return _json({"count": world.participant_count()})

    @app.post("/control/token-balance")
    async def control_token_balance() -> Response:
        try:
            body = await _json_body()
            ata = world.set_token_balance(body.get("wallet"), body.get("mint"), body.get("amount"))  # type: ignore[arg-type]
        except (ValueError, TypeError) as exc:
            return _bad(exc)
        return _json({"tokenAccount": ata})

    @app.post("/control/mint")
    async def control_mint() -> Response:
        try:
            body = await _json_body()
            decimals, ext = body.get("decimals", 6), body.get("extensionBytes", 0)
            if not isinstance(decimals, int) or not isinstance(ext, int):
                raise ValueError("decimals and extensionBytes must be integers")
            world.add_mint(body.get("mint"), decimals, body.get("tokenProgram", "spl"), ext)  # type: ignore[arg-type]
            if "price" in body:
                world.set_price(body["mint"], body["price"])
        except ValueError as exc:
            return _bad(exc)
        return _json({"mint": body["mint"], "decimals": decimals})

    return app


async def _send(payload: Any) -> None:
    await websocket.send(json.dumps(payload, separators=(",", ":")))


async def _pubsub_request(world: World, session: Any, message: str | bytes) -> None:
    """Answer one PubSub request (subscribe / unsubscribe)."""
    try:
        item = json.loads(message)
    except (ValueError, UnicodeDecodeError):
        await _send(_rpc_error(-32700, "Parse error", None))
        return
    req_id = item.get("id") if isinstance(item, dict) else None
    if not isinstance(item, dict) or item.get("jsonrpc") != "2.0" or not isinstance(item.get("method"), str):
        await _send(_rpc_error(-32600, "Invalid request", req_id))
        return
    method, params = item["method"], item.get("params")
    try:
        if method == "accountSubscribe":
            args, config = _params(params, 2)
            pubkey = _pubkey_arg(args)
            encoding = config.get("encoding", "base64")
            _encode_data(b"", {"encoding": encoding})  # validate before subscribing
            sub = world.subscribe_account(session, pubkey, encoding)
        elif method == "slotSubscribe":
            sub = world.subscribe_slot(session)
        elif method in ("accountUnsubscribe", "slotUnsubscribe"):
            if not isinstance(params, list) or len(params) != 1:
                raise _invalid("Invalid params: expected [subscription id]")
            if not world.unsubscribe(session, params[0], "account" if method == "accountUnsubscribe" else "slot"):
                raise _invalid("Invalid subscription id.")
            await _send({"jsonrpc": "2.0", "result": True, "id": req_id})
            return
        else:
            await txs.pubsub_request(world, session, item, _send)  # signatureSubscribe (issue 12)
            return
    except RpcFault as fault:
        await _send(_rpc_error(fault.code, fault.message, req_id))
        return
    try:
        await _send({"jsonrpc": "2.0", "result": sub, "id": req_id})
    finally:
        world.release(session, sub)  # notifications may follow the confirmation now


async def _pump(world: World, session: Any, scope: trio.CancelScope) -> None:
    """Send this session's notifications, newest value first-come; close on drop_ws()."""
    while True:
        if world.session_dropped(session):
            await websocket.close(1012, "simulated drop")
            scope.cancel()
            return
        pending = world.pending_notifications(session) + txs.pending_notifications(world, session)
        if not pending:
            # No checkpoint between the check above and this wait: no lost wake-ups.
            await world.wait_changed()
            continue
        for kind, sub, payload in pending:
            if kind == "account":
                pubkey, encoding = payload
                value = account_json(world, pubkey, {"encoding": encoding})
                params = {"result": {"context": {"slot": world.slot}, "value": value}, "subscription": sub}
                await _send({"jsonrpc": "2.0", "method": "accountNotification", "params": params})
            elif kind == "signature":  # sim/txs.py
                await _send({"jsonrpc": "2.0", "method": "signatureNotification", "params": {"result": payload, "subscription": sub}})
            else:
                result = {"parent": payload - 1, "root": max(0, payload - 32), "slot": payload}
                await _send({"jsonrpc": "2.0", "method": "slotNotification", "params": {"result": result, "subscription": sub}})
            world.count("ws_notifications")


__all__ = ["FAULT_DEFAULTS", "METHODS", "account_json", "create_sim_app"]
