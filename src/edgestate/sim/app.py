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
from solders.token.state import TokenAccount

from . import pings, txs
from .world import FAULT_DEFAULTS, HANG_SECONDS, World, b58encode, parse_pubkey

API_VERSION = "2.0.15"
MAX_MULTIPLE_ACCOUNTS = 100
MAX_FILTERS = 4
MAX_PRICE_IDS = 50
MAX_BASE58_BYTES = 128  # agave: larger account data cannot be sent as base58
INVALID_REQUEST = -32600
NODE_UNHEALTHY = -32005
_RATE_LIMITED = {"jsonrpc": "2.0", "error": {"code": 429, "message": "Too many requests for a specific RPC call"}, "id": None}
_BATCH_REFUSED = {"jsonrpc": "2.0", "error": {"code": INVALID_REQUEST, "message": "Batch requests are not supported"},
                  "id": None}
_FORBIDDEN = {"jsonrpc": "2.0", "error": {"code": 403, "message": "Forbidden: this key or address is not allowed"},
              "id": None}


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


def check_encoding(config: dict[str, Any], default: str = "binary") -> str:
    """The encoding a config asks for (agave's default when none), validated.

    Raises:
        RpcFault: an unknown encoding, a bad dataSlice, or jsonParsed with a dataSlice
            (agave answers -32600 for that).
    """
    encoding = config.get("encoding", default)
    if encoding not in ("binary", "base58", "base64", "jsonParsed"):
        raise _invalid(f"Invalid params: unsupported encoding {encoding!r} (use base64 or base58)")
    sl = config.get("dataSlice")
    if sl is not None:
        if not isinstance(sl, dict) or not all(
            isinstance(sl.get(k), int) and not isinstance(sl.get(k), bool) and sl[k] >= 0 for k in ("offset", "length")
        ):
            raise _invalid("Invalid params: dataSlice needs non-negative integers offset and length")
        if encoding == "jsonParsed":
            raise RpcFault(INVALID_REQUEST,
                           "Sliced account data can only be encoded using binary (base 58) or base64 encoding.")
    return str(encoding)


def _encode_data(data: bytes, config: dict[str, Any], default: str = "binary", *, notification: bool = False) -> Any:
    """Account data as agave encodes it: "binary" (the legacy default of getAccountInfo,
    getProgramAccounts and the subscriptions) is a bare base58 string, "base58" and
    "base64" are ``[data, encoding]``; base58 stops at 128 bytes (an RPC error, or an error
    string inside a notification)."""
    encoding = check_encoding(config, default)
    sl = config.get("dataSlice")
    if sl is not None:
        data = data[sl["offset"] : sl["offset"] + sl["length"]]
    if encoding in ("base64", "jsonParsed"):  # jsonParsed falls back to base64, as Solana does for unknown layouts
        return [base64.b64encode(data).decode(), "base64"]
    if len(data) > MAX_BASE58_BYTES:
        if not notification:
            raise RpcFault(INVALID_REQUEST, f"Encoded binary (base 58) data should be less than {MAX_BASE58_BYTES} "
                                            "bytes, please use Base64 encoding.")
        text = "error: data too large for bs58 encoding"
    else:
        text = b58encode(data)
    return text if encoding == "binary" else [text, "base58"]


def account_json(
    world: World, pubkey: str, config: dict[str, Any], *, default: str = "binary", notification: bool = False
) -> dict[str, Any] | None:
    """One account in RPC shape (getAccountInfo's ``value``), or None if it is missing.

    ``default`` is the method's default encoding (agave: base64 for getMultipleAccounts,
    binary, i.e. legacy base58, for getAccountInfo, getProgramAccounts and subscriptions).
    """
    acct = world.get_account(pubkey)
    if acct is None:
        check_encoding(config, default)  # still validate the config
        return None
    return {
        "data": _encode_data(acct.data, config, default, notification=notification),
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
    acct = world.get_account(_pubkey_arg(args))
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
    return {"context": _context(world), "value": [account_json(world, k, config, default="base64") for k in keys]}


def _get_program_accounts(world: World, params: Any) -> Any:
    args, config = _params(params, 2)
    program = _pubkey_arg(args, "program id")
    filters = config.get("filters") or []
    if not isinstance(filters, list):
        raise _invalid("Invalid params: filters must be an array")
    if len(filters) > MAX_FILTERS:
        raise _invalid(f"Too many filters provided; max {MAX_FILTERS}")
    check_encoding(config)
    try:
        found = world.program_accounts(program, filters)
    except ValueError as exc:
        raise _invalid(f"Invalid param: {exc}") from None
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
    mint = str(TokenAccount.from_bytes(world.accounts[key].data[:165]).mint)
    ui = world.token_ui_amount(mint, amount)
    return {
        "context": _context(world),
        "value": {
            "amount": str(amount),
            "decimals": decimals,
            "uiAmount": ui,
            "uiAmountString": _ui_amount_string(amount, decimals) if ui == amount / 10**decimals else repr(ui),
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
        if world.node_behind:
            world.count("node_behind_errors")
            behind = int(world.node_behind)
            return {"jsonrpc": "2.0", "id": req_id, "error": {
                "code": NODE_UNHEALTHY, "message": f"Node is behind by {behind} slots",
                "data": {"numSlotsBehind": behind}}}
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
    pings.install()

    @app.post("/")
    async def rpc() -> Response:
        world.count("http_requests")
        world.count("rpc_requests")
        if world.latency:
            await trio.sleep(world.latency)
        if world.forbidden:
            world.count("http_403")
            return _json(_FORBIDDEN, 403)
        limit = int(world.max_body_bytes)
        length = request.content_length
        if limit and length is not None and length > limit:
            world.count("http_413")  # agave: MAX_REQUEST_BODY_SIZE, checked before parsing
            return Response("Payload Too Large", status=413)
        raw = await request.get_data()
        if limit and len(raw) > limit:
            world.count("http_413")
            return Response("Payload Too Large", status=413)
        try:
            payload = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            payload = ValueError
        calls = len(payload) if isinstance(payload, list) else 1
        if not world.admit_rpc(max(calls, 1)):
            return _too_many_requests(world, _RATE_LIMITED)
        if isinstance(payload, list) and world.refuse_batches:
            world.count("batches_refused")
            return _json(_BATCH_REFUSED)
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
        if world.ws_full():
            world.count("ws_refused")
            return _error(429, f"too many WebSocket connections (at most {int(world.max_ws_connections)})")
        await websocket.accept()
        session = world.open_session()
        client = websocket.scope.get("client")
        unwatch = pings.watch(tuple(client) if client else None, lambda: world.client_active(session))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pump, world, session, nursery.cancel_scope)
                nursery.start_soon(_idle_close, world, session, nursery.cancel_scope)
                while True:  # always drain: Quart's receive queue is tiny
                    message = await websocket.receive()
                    world.client_active(session)
                    await _pubsub_request(world, session, message)
        finally:
            unwatch()
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
            add, remove = body.get("add", 0), body.get("remove", 0)
            for value in (add, remove):
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100_000:
                    raise ValueError('expected {"add": <int 0..100000>} and/or {"remove": <int 0..100000>}')
        except ValueError as exc:
            return _bad(exc)
        if add:
            world.add_participants(add)
        if remove:
            world.remove_participants(remove)
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


async def _send(payload: Any, world: World | None = None) -> None:
    text = json.dumps(payload, separators=(",", ":"))
    if world is not None:
        world.count("ws_bytes_sent", len(text))
    await websocket.send(text)


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
    if method in ("signatureSubscribe", "signatureUnsubscribe"):
        await txs.pubsub_request(world, session, item, _send)  # sim/txs.py (issue 12)
        return
    try:
        sub = _subscribe(world, session, method, params)
        if sub is None:
            await _send({"jsonrpc": "2.0", "result": True, "id": req_id}, world)
            return
    except RpcFault as fault:
        await _send(_rpc_error(fault.code, fault.message, req_id), world)
        return
    try:
        await _send({"jsonrpc": "2.0", "result": sub, "id": req_id}, world)
    finally:
        world.release(session, sub)  # notifications may follow the confirmation now


_UNSUBSCRIBE = {"accountUnsubscribe": "account", "slotUnsubscribe": "slot", "programUnsubscribe": "program"}


def _subscribe(world: World, session: Any, method: str, params: Any) -> int | None:
    """A subscription's id, or None for a successful unsubscribe.

    Raises:
        RpcFault: the error to answer.
    """
    if method == "accountSubscribe":
        args, config = _params(params, 2)
        pubkey = _pubkey_arg(args)
        check_encoding(config)  # validate before subscribing; agave's default: binary
        return world.subscribe_account(session, pubkey, dict(config))
    if method == "programSubscribe":
        args, config = _params(params, 2)
        program = _pubkey_arg(args, "program id")
        check_encoding(config)
        filters = config.get("filters") or []
        if not isinstance(filters, list) or len(filters) > MAX_FILTERS:
            raise _invalid(f"Invalid params: filters must be an array of at most {MAX_FILTERS}")
        try:
            return world.subscribe_program(session, program, filters, dict(config))
        except ValueError as exc:
            raise _invalid(f"Invalid param: {exc}") from None
    if method == "slotSubscribe":
        return world.subscribe_slot(session)
    if method in _UNSUBSCRIBE:
        if not isinstance(params, list) or len(params) != 1:
            raise _invalid("Invalid params: expected [subscription id]")
        if not world.unsubscribe(session, params[0], _UNSUBSCRIBE[method]):
            raise _invalid("Invalid subscription id.")
        return None
    raise RpcFault(-32601, "Method not found")


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
                pubkey, config = payload
                value = account_json(world, pubkey, config, notification=True)
                params = {"result": {"context": {"slot": world.slot}, "value": value}, "subscription": sub}
                await _send({"jsonrpc": "2.0", "method": "accountNotification", "params": params}, world)
            elif kind == "program":
                pubkey, config = payload
                value = {"pubkey": pubkey, "account": account_json(world, pubkey, config, notification=True)}
                params = {"result": {"context": {"slot": world.slot}, "value": value}, "subscription": sub}
                await _send({"jsonrpc": "2.0", "method": "programNotification", "params": params}, world)
            elif kind == "signature":  # sim/txs.py
                params = {"result": payload, "subscription": sub}
                await _send({"jsonrpc": "2.0", "method": "signatureNotification", "params": params}, world)
            else:
                result = {"parent": payload - 1, "root": max(0, payload - 32), "slot": payload}
                await _send({"jsonrpc": "2.0", "method": "slotNotification", "params": {"result": result, "subscription": sub}},
                            world)
            world.count("ws_notifications")


async def _idle_close(world: World, session: Any, scope: trio.CancelScope) -> None:
    """Close a socket whose client sent nothing, not even a ping, for ``ws_idle_timeout``
    (Helius: 10 minutes), as the provider does."""
    while True:
        timeout = float(world.ws_idle_timeout)
        if not timeout:
            await trio.sleep(1.0)
            continue
        idle = world.idle_for(session)
        if idle >= timeout:
            world.count("ws_idle_closed")
            await websocket.close(1000, "idle timeout")
            scope.cancel()
            return
        await trio.sleep(min(timeout - idle, 1.0) + 0.001)


__all__ = ["FAULT_DEFAULTS", "METHODS", "account_json", "create_sim_app"]
