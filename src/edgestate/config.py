"""Configuration: config.toml + environment -> frozen, typed dataclasses.

Every key of the contract exists with its default, so an empty file (or none) is a
valid configuration. Every problem raises :class:`ConfigError` with one line naming
the source (file or environment variable), the key and what was wrong.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import types
import typing
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .origins import check_entry

_CLUSTERS = {
    "devnet": "https://api.devnet.solana.com",
    "testnet": "https://api.testnet.solana.com",
    "mainnet-beta": "https://api.mainnet-beta.solana.com",
}
_HELIUS = {
    "devnet": "https://devnet.helius-rpc.com/?api-key={key}",
    "mainnet-beta": "https://mainnet.helius-rpc.com/?api-key={key}",
}  # Helius has no testnet: cluster = "testnet" with only HELIUS_API_KEY is a config error


@dataclass(frozen=True, slots=True)
class ProviderPlan:
    """The limits of one provider plan that a configuration is checked against.

    ``credits_per_month`` 0 means unmetered; ``method_rps`` holds the per-method
    per-second limits on top of ``rps``.
    """

    label: str
    rps: float
    method_rps: Mapping[str, float]
    credits_per_month: float
    ws_connections: int


# Published limits (helius.dev/docs/billing/rate-limits and pricing; solana.com public RPC
# endpoints), 2026. ``upstream.plan`` picks one; "custom" compares nothing.
PROVIDER_PLANS: Mapping[str, ProviderPlan | None] = types.MappingProxyType({
    "helius-free": ProviderPlan("Helius Free", 10, {"getProgramAccounts": 5}, 1_000_000, 5),
    "helius-developer": ProviderPlan("Helius Developer", 50, {"getProgramAccounts": 25}, 10_000_000, 150),
    "helius-business": ProviderPlan("Helius Business", 200, {"getProgramAccounts": 50}, 100_000_000, 250),
    "helius-professional": ProviderPlan("Helius Professional", 500, {"getProgramAccounts": 75}, 200_000_000, 250),
    # 100 requests / 10 s per IP, 40 / 10 s per method, 40 connections; not metered.
    "solana-public": ProviderPlan("Solana public RPC", 10, {"getProgramAccounts": 4}, 0, 40),
    "custom": None,
})
# Jupiter Price API v3, per account: without a key 0.5 req/s, a free key 1 req/s.
JUPITER_KEYLESS_RPS = 0.5
JUPITER_KEY_RPS = 1.0

# The shipped defaults point at devnet; on mainnet-beta they name nothing of the user's.
DEVNET_DEFAULT_MINT = "4zMMC9srt5Ri5X14GAgXhaHii3GnPAEERYPJgZJDncDU"
PLACEHOLDER_POT = "Lotto1Pot1111111111111111111111111111111111"
PLACEHOLDER_PROGRAM = "Lotto1Program111111111111111111111111111111"

# Query parameters and userinfo that hold credentials in provider URLs.
_SECRET_PARAMS = re.compile(r"(api[-_]?key|key|token|secret|auth|password)", re.I)


def redact(url: str) -> str:
    """Return ``url`` with credentials replaced by ``***``; the rest stays readable.

    Covers ``?api-key=...`` style query parameters, ``user:pass@`` userinfo and
    key-looking path segments (e.g. QuickNode's ``/<token>/``).
    """
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "***"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = "&".join(
        f"{k}=***" if _SECRET_PARAMS.search(k) else (f"{k}={v}" if v else k)
        for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    )
    path = "/".join(
        "***" if len(seg) >= 24 and re.fullmatch(r"[A-Za-z0-9_-]+", seg) else seg
        for seg in parts.path.split("/")
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, path, query, parts.fragment))


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    bind: str = "127.0.0.1:8080"
    graceful_timeout: float = 5.0
    allowed_origins: tuple[str, ...] = ()
    # When set, /stats, /metrics and /status are served only on this HOST:PORT.
    internal_bind: str = ""
    # Processes serving the public port (>1: a supervisor, one feed process, N workers).
    workers: int = 1
    # SO_REUSEPORT on the listening socket: several processes share one port.
    reuse_port: bool = False
    # Connection limits, as nginx's client_header_timeout, keepalive_timeout,
    # client_body_timeout, large_client_header_buffers and limit_conn.
    header_timeout: float = 10.0  # seconds to receive a whole request head
    keepalive_timeout: float = 5.0  # idle seconds between two requests of a connection
    body_timeout: float = 10.0  # seconds between two reads of a request body
    max_header_bytes: int = 16384  # a request head larger than this is answered 431
    max_connections: int = 100000  # open connections in all (capped by the open-files limit)
    max_connections_per_client: int = 1000  # per client address (trusted proxies exempt); 0 = off


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamConfig:
    cluster: str = "devnet"
    rpc_url: tuple[str, ...] = ()
    ws_url: str = ""
    commitment: str = "confirmed"
    max_connections: int = 10
    # Requests per second towards the provider (each JSON-RPC call, batch items included).
    # The contract's (seed) default is 100; Helius Free allows 10, and serve / check-config
    # say so in one line (upstream/costs.py) until it is set to the plan's limit.
    # Credits are a separate, monthly budget (credits_per_month).
    max_requests_per_second: float = 100.0
    # Per-method requests per second on top of the above (Helius Free: getProgramAccounts 5/s).
    method_rate_limits: Mapping[str, float] = field(
        default_factory=lambda: types.MappingProxyType({"getProgramAccounts": 5.0})
    )
    method_costs: Mapping[str, int] = field(
        default_factory=lambda: types.MappingProxyType({"getProgramAccounts": 10})
    )
    request_timeout: float = 30.0
    batch_window_ms: float = 100.0
    max_batch_size: int = 100
    # A batch's JSON body stays under this (agave refuses bodies over 50 KiB with HTTP 413).
    max_batch_bytes: int = 46080
    max_queue: int = 10000
    max_retries: int = 3
    # Largest JSON-RPC reply body read (bytes); a longer one is aborted (UpstreamError).
    max_response_bytes: int = 64 * 1024 * 1024
    # Feed mode: take the state from a parent edgestate (its /ws, http(s) or ws(s) URL)
    # instead of the providers; more than one = fallback order. Empty = talk to providers.
    parent: tuple[str, ...] = ()
    # Provider credit budget per 30 days (Helius Free: 1M); 0 = no budget. Over it, the
    # fallback polling slows down (never the price: the price API costs no RPC credits).
    credits_per_month: float = 1_000_000.0
    # The provider plan serve/check-config compare this configuration with (PROVIDER_PLANS).
    plan: str = "helius-free"
    # The most the budget may stretch the polling intervals (x configured).
    max_interval_scale: float = 10.0
    # From $HELIUS_API_KEY; only used to build the default rpc_url. Never printed.
    helius_api_key: str = field(default="", repr=False)

    @property
    def rpc_urls(self) -> tuple[str, ...]:
        """The effective RPC endpoints, in failover order."""
        if self.rpc_url:
            return self.rpc_url
        if self.helius_api_key and self.cluster in _HELIUS:
            return (_HELIUS[self.cluster].format(key=self.helius_api_key),)
        return (_CLUSTERS[self.cluster],)

    @property
    def pubsub_url(self) -> str:
        """The effective PubSub WebSocket URL (derived from the first RPC URL)."""
        if self.ws_url:
            return self.ws_url
        url = self.rpc_urls[0]
        return "wss" + url[5:] if url.startswith("https") else "ws" + url[4:]


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheConfig:
    ttl: float = 5.0
    maxsize: int = 100000  # entries of user lookups (prices of any mint, balances), per store
    # Entries of the shared state's own partition (its token price, ...): user lookups
    # never evict them, so the state's last-good values survive a flood of lookups.
    state_maxsize: int = 1000
    max_stale: float = 300.0
    # Per-method TTL overrides, e.g. {getSlot = 0.4}; methods not listed use ttl.
    method_ttls: Mapping[str, float] = field(default_factory=lambda: types.MappingProxyType({}))


@dataclass(frozen=True, slots=True, kw_only=True)
class StateConfig:
    polling_interval: float = 30.0
    price_interval: float = 2.0
    participants_interval: float = 10.0
    # With PubSub up participants are pushed (programSubscribe); closed accounts are not
    # notified, so a full recount runs at every (re)subscribe and this often.
    participants_reconcile_interval: float = 600.0
    max_staleness: float = 90.0


@dataclass(frozen=True, slots=True, kw_only=True)
class PriceConfig:
    url: str = "https://api.jup.ag/price/v3"
    # Jupiter keyless: 0.5/s; with JUPITER_API_KEY set and this key not configured: 1/s.
    max_requests_per_second: float = JUPITER_KEYLESS_RPS
    # Distinct mints waiting for a price request; beyond it user lookups get 503.
    max_pending_mints: int = 500
    # From $JUPITER_API_KEY, sent as x-api-key. Never printed.
    api_key: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenConfig:
    # Devnet USDC: a real devnet mint so the defaults point at something that exists.
    mint: str = DEVNET_DEFAULT_MINT


@dataclass(frozen=True, slots=True, kw_only=True)
class LotteryConfig:
    pot_account: str = PLACEHOLDER_POT
    program_id: str = PLACEHOLDER_PROGRAM
    participant_filters: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class WsConfig:
    max_clients: int = 100000
    max_message_size: int = 4096
    ping_interval: float = 20.0
    send_timeout: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiConfig:
    max_wallets: int = 1000
    max_body_bytes: int = 65536
    per_client_rps: float = 0.0
    # Upstream calls/s a client's lookups (prices, balances) may cost; 0 = off.
    lookup_per_client_rps: float = 10.0
    trusted_proxies: tuple[str, ...] = ()


# What a dApp frontend needs (issue 12); getProgramAccounts only for allowed programs.
RPC_DEFAULT_METHODS = (
    "getAccountInfo", "getBalance", "getMultipleAccounts", "getTokenAccountBalance", "getTokenAccountsByOwner",
    "getProgramAccounts", "getLatestBlockhash", "isBlockhashValid", "getSlot", "getBlockHeight", "getEpochInfo",
    "getSignatureStatuses", "getTransaction", "getMinimumBalanceForRentExemption", "getFeeForMessage",
    "getRecentPrioritizationFees", "getHealth", "getVersion", "getGenesisHash", "simulateTransaction",
    "sendTransaction",
)


# Every method the proxy knows how to validate and cache (rpc/policy.py has their rules).
RPC_KNOWN_METHODS = RPC_DEFAULT_METHODS


@dataclass(frozen=True, slots=True, kw_only=True)
class RpcConfig:
    enabled: bool = True
    allowed_methods: tuple[str, ...] = RPC_DEFAULT_METHODS
    allowed_programs: tuple[str, ...] = ()
    max_batch: int = 100
    per_client_rps: float = 50.0
    # sendTransaction/simulateTransaction per client address per second (on top of per_client_rps); 0 = off.
    send_per_client_rps: float = 5.0
    max_subscriptions: int = 100
    # getSignatureStatuses of all clients within this many ms (from the first) merge into calls of
    # <= 256 signatures; about one slot, so a poll waits at most ~a slot. 0 = only concurrent calls merge.
    status_window_ms: float = 400.0


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    level: str = "info"
    format: str = "text"
    access: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    state: StateConfig = field(default_factory=StateConfig)
    price: PriceConfig = field(default_factory=PriceConfig)
    token: TokenConfig = field(default_factory=TokenConfig)
    lottery: LotteryConfig = field(default_factory=LotteryConfig)
    ws: WsConfig = field(default_factory=WsConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    rpc: RpcConfig = field(default_factory=RpcConfig)
    log: LogConfig = field(default_factory=LogConfig)
    source: str = field(default="(defaults)", compare=False)
    # What was odd but not wrong (e.g. an EDGESTATE_* variable that names no key), one line each.
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def replace(self, section: str, **changes: Any) -> Config:
        """A copy with some keys of one section changed (validated like a file)."""
        raw = to_dict(self)
        raw[section].update(changes)
        return dataclasses.replace(from_dict(raw, source=self.source, environ={}), warnings=self.warnings)


_SECTIONS: dict[str, type] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in dataclasses.fields(Config)
    if f.name not in ("source", "warnings")
}
# Keys filled from the environment only, never from the file.
_ENV_ONLY = {("upstream", "helius_api_key"), ("price", "api_key")}
_PUBKEY_KEYS = {("token", "mint"), ("lottery", "pot_account"), ("lottery", "program_id")}
_CHOICES = {
    ("upstream", "cluster"): tuple(_CLUSTERS),
    ("upstream", "commitment"): ("processed", "confirmed", "finalized"),
    ("log", "level"): ("debug", "info", "warning", "error"),
    ("log", "format"): ("text", "json"),
    ("upstream", "plan"): tuple(PROVIDER_PLANS),
}
_MIN_RESPONSE_BYTES = 65536  # below this even a getHealth or a small batch could not be read

# Keys that may be zero (everything else numeric must be > 0).
_MAY_BE_ZERO = {
    ("api", "per_client_rps"),
    ("api", "lookup_per_client_rps"),
    ("upstream", "max_retries"),
    ("cache", "max_stale"),
    ("server", "graceful_timeout"),
    ("server", "max_connections_per_client"),
    ("upstream", "batch_window_ms"),
    ("upstream", "credits_per_month"),
    ("rpc", "per_client_rps"),
    ("rpc", "send_per_client_rps"),
    ("rpc", "status_window_ms"),
}


def _keys(section: str) -> dict[str, Any]:
    cls = _SECTIONS[section]
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if (section, f.name) not in _ENV_ONLY}


def _closest(word: str, options: list[str]) -> str:
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """Validate ``value`` against the dataclass type ``hint``; return it normalized."""
    origin = typing.get_origin(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        (item_hint, _ellipsis) = typing.get_args(hint)
        if isinstance(value, str) and typing.get_origin(item_hint) is None and item_hint is str:
            value = [value] if value else []  # a single URL / origin is a list of one
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_check_type(v, item_hint, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is Mapping:
        key_hint, val_hint = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        if val_hint is Any:
            return types.MappingProxyType(dict(value))
        return types.MappingProxyType(
            {_check_type(k, key_hint, where): _check_type(v, val_hint, f"{where}.{k}") for k, v in value.items()}
        )
    raise AssertionError(f"unhandled config type {hint}")  # pragma: no cover


def _is_pubkey(text: str) -> bool:
    from solders.pubkey import Pubkey

    try:
        Pubkey.from_string(text)
    except ValueError:
        return False
    return True


def _check_url(url: str, where: str, schemes: tuple[str, ...]) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in schemes or not parts.hostname:
        raise ConfigError(f"{where}: not a valid {'/'.join(schemes)} URL: {redact(url)!r}")


def _check_bind(bind: str, where: str) -> None:
    host, sep, port = bind.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where}: expected HOST:PORT, got {bind!r}")


def _check_filters(filters: tuple[Mapping[str, Any], ...], where: str) -> None:
    if len(filters) > 4:
        raise ConfigError(f"{where}: at most 4 filters are allowed (Solana RPC limit), got {len(filters)}")
    for i, flt in enumerate(filters):
        here = f"{where}[{i}]"
        if set(flt) == {"dataSize"}:
            if not isinstance(flt["dataSize"], int) or isinstance(flt["dataSize"], bool) or flt["dataSize"] < 0:
                raise ConfigError(f"{here}: dataSize must be a non-negative integer, got {flt['dataSize']!r}")
        elif set(flt) == {"memcmp"}:
            memcmp = flt["memcmp"]
            if (
                not isinstance(memcmp, dict)
                or not isinstance(memcmp.get("offset"), int)
                or memcmp["offset"] < 0
                or not isinstance(memcmp.get("bytes"), str)
                or not set(memcmp) <= {"offset", "bytes", "encoding"}
            ):
                raise ConfigError(f"{here}: memcmp needs {{offset = <int>, bytes = \"<base58>\"}}, got {memcmp!r}")
        else:
            raise ConfigError(f"{here}: expected {{dataSize = N}} or {{memcmp = {{...}}}}, got {dict(flt)!r}")


def _validate(section: str, key: str, value: Any, where: str) -> None:
    """Value checks beyond the type: ranges, choices, pubkeys, URLs."""
    if (section, key) in _CHOICES and value not in _CHOICES[section, key]:
        raise ConfigError(f"{where}: must be one of {', '.join(_CHOICES[section, key])}; got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0 or (value == 0 and (section, key) not in _MAY_BE_ZERO):
            raise ConfigError(f"{where}: must be {'>= 0' if (section, key) in _MAY_BE_ZERO else '> 0'}, got {value!r}")
    if (section, key) in _PUBKEY_KEYS and not _is_pubkey(value):
        raise ConfigError(f"{where}: not a valid Solana public key (base58, 32 bytes): {value!r}")
    if (section, key) == ("upstream", "rpc_url"):
        for i, url in enumerate(value):
            _check_url(url, f"{where}[{i}]" if len(value) > 1 else where, ("http", "https"))
    if (section, key) == ("upstream", "parent"):
        for i, url in enumerate(value):
            _check_url(url, f"{where}[{i}]" if len(value) > 1 else where, ("http", "https", "ws", "wss"))
    if (section, key) == ("upstream", "max_interval_scale") and value < 1:
        raise ConfigError(f"{where}: must be >= 1, got {value!r}")
    if (section, key) == ("upstream", "ws_url") and value:
        _check_url(value, where, ("ws", "wss"))
    if (section, key) == ("price", "url"):
        _check_url(value, where, ("http", "https"))
    if (section, key) == ("server", "bind") or ((section, key) == ("server", "internal_bind") and value):
        _check_bind(value, where)
    if (section, key) == ("server", "allowed_origins"):
        for i, entry in enumerate(value):
            problem = check_entry(entry)
            if problem is not None:
                raise ConfigError(f"{where}[{i}]: {problem}")
    if (section, key) == ("upstream", "max_response_bytes") and value < _MIN_RESPONSE_BYTES:
        raise ConfigError(f"{where}: must be >= {_MIN_RESPONSE_BYTES} (64 KiB), got {value!r}")
    if (section, key) == ("server", "max_header_bytes") and value < 1024:
        raise ConfigError(f"{where}: must be at least 1024 bytes, got {value}")
    if (section, key) in (("upstream", "method_rate_limits"), ("upstream", "method_costs")):
        zero_ok = key == "method_costs"  # a free method costs 0 credits; a rate of 0 would block it
        for method, limit in value.items():
            if limit < 0 or (limit == 0 and not zero_ok):
                raise ConfigError(f"{where}.{method}: must be {'>= 0' if zero_ok else '> 0'}, got {limit!r}")
    if (section, key) == ("upstream", "max_batch_bytes") and value < 1024:
        raise ConfigError(f"{where}: at least 1024 bytes, got {value}")
    if (section, key) == ("upstream", "max_batch_size") and value > 100:
        raise ConfigError(f"{where}: at most 100 calls per batch, got {value}")
    if (section, key) == ("lottery", "participant_filters"):
        _check_filters(value, where)
    if (section, key) == ("rpc", "allowed_programs"):
        for i, program in enumerate(value):
            if not _is_pubkey(program):
                raise ConfigError(f"{where}[{i}]: not a valid Solana public key (base58, 32 bytes): {program!r}")
    if (section, key) == ("rpc", "status_window_ms") and value > 2000:
        raise ConfigError(f"{where}: at most 2000 ms (every status poll may wait this long), got {value!r}")
    if (section, key) == ("rpc", "allowed_methods"):
        unknown = [m for m in value if m not in RPC_KNOWN_METHODS]
        if unknown:
            raise ConfigError(f"{where}: the proxy cannot serve {', '.join(map(repr, unknown))}; "
                              f"known: {', '.join(RPC_KNOWN_METHODS)}")


def _parse_env_value(text: str) -> Any:
    """Environment values are TOML values when they parse as one, else plain strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def from_dict(raw: Mapping[str, Any], *, source: str = "(defaults)", environ: Mapping[str, str] | None = None) -> Config:
    """Build a validated :class:`Config` from parsed TOML plus environment overrides.

    Every problem is found, not only the first: the error's message has one line per
    problem (``ConfigError.problems`` lists them). ``EDGESTATE_*`` variables that name no
    key (Kubernetes injects ``EDGESTATE_SERVICE_PORT`` for a Service named edgestate)
    are warnings in ``Config.warnings``; an empty value means unset.

    Raises:
        ConfigError: one line per problem, each naming the source, the key and what was wrong.
    """
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    warnings: list[str] = []
    merged: dict[str, dict[str, tuple[Any, str]]] = {name: {} for name in _SECTIONS}
    for section, table in raw.items():
        if section not in _SECTIONS:
            problems.append(f"{source}: unknown section [{section}]{_closest(section, list(_SECTIONS))}")
            continue
        if not isinstance(table, dict):
            problems.append(f"{source}: [{section}] must be a table, got {table!r}")
            continue
        known = _keys(section)
        for key, value in table.items():
            if key not in known:
                problems.append(f"{source}: unknown key {section}.{key}{_closest(key, list(known))}")
                continue
            merged[section][key] = (value, f"{source}: {section}.{key}")
    for name, text in sorted(environ.items()):
        if not name.startswith("EDGESTATE_") or name == "EDGESTATE_CONFIG":
            continue
        rest = name[len("EDGESTATE_") :].lower()
        env_section = next((s for s in _SECTIONS if rest.startswith(s + "_")), None)
        key = rest[len(env_section) + 1 :] if env_section is not None else ""
        if env_section is None or key not in _keys(env_section):
            match = difflib.get_close_matches(rest, [f"{s}_{k}" for s in _SECTIONS for k in _keys(s)], n=1, cutoff=0.85)
            hint = f" (did you mean EDGESTATE_{match[0].upper()}?)" if match else ""
            warnings.append(f"environment {name}: not a config key, ignored{hint}")
            continue
        if not text.strip():
            continue  # empty = unset (e.g. a templated manifest that left it blank)
        value = _parse_env_value(text)
        if isinstance(value, str) and _keys(env_section)[key] == tuple[str, ...]:
            # A list from the environment may be written plainly: "https://a,https://b" or "a b".
            value = [item for item in re.split(r"[,\s]+", value) if item]
        merged[env_section][key] = (value, f"environment {name}")
    if environ.get("HELIUS_API_KEY"):
        merged["upstream"]["helius_api_key"] = (environ["HELIUS_API_KEY"], "environment HELIUS_API_KEY")
    if environ.get("JUPITER_API_KEY"):
        merged["price"]["api_key"] = (environ["JUPITER_API_KEY"], "environment JUPITER_API_KEY")
        # A key's plan allows more than keyless access, unless the limit is configured.
        merged["price"].setdefault("max_requests_per_second", (JUPITER_KEY_RPS, "environment JUPITER_API_KEY"))

    sections: dict[str, Any] = {}
    for section, values in merged.items():
        hints = typing.get_type_hints(_SECTIONS[section])
        kwargs = {}
        for key, (value, where) in values.items():
            try:
                value = _check_type(value, hints[key], where)
                _validate(section, key, value, where)
            except ConfigError as exc:
                problems.append(str(exc))
                continue
            kwargs[key] = value
        sections[section] = _SECTIONS[section](**kwargs)
    if problems:
        raise ConfigError("\n".join(problems), problems=problems)
    cfg = Config(**sections, source=source, warnings=tuple(warnings))
    _check_cluster(cfg, merged)
    return cfg


def _check_cluster(cfg: Config, merged: Mapping[str, Mapping[str, tuple[Any, str]]]) -> None:
    """Checks across keys: what only makes sense on one cluster.

    Raises:
        ConfigError: every problem found, one per line.
    """
    problems = []
    up = cfg.upstream
    if up.cluster == "testnet" and not up.rpc_url and not up.parent and up.helius_api_key:
        problems.append(
            "upstream.cluster = \"testnet\" with only HELIUS_API_KEY: Helius has no testnet endpoint; "
            "set upstream.rpc_url to a testnet RPC URL (e.g. https://api.testnet.solana.com)"
        )
    if up.cluster == "mainnet-beta":
        for section, key, default, what in (
            ("token", "mint", DEVNET_DEFAULT_MINT, "the devnet USDC mint"),
            ("lottery", "pot_account", PLACEHOLDER_POT, "a placeholder"),
            ("lottery", "program_id", PLACEHOLDER_PROGRAM, "a placeholder"),
        ):
            if getattr(getattr(cfg, section), key) == default:
                where = merged[section][key][1] if key in merged[section] else f"{cfg.source}: {section}.{key}"
                problems.append(f"{where}: the default ({what}) is not an account of mainnet-beta; set yours")
    if problems:
        raise ConfigError("\n".join(problems), problems=problems)


def load(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Load the configuration the way the contract says.

    ``path`` if given (must exist), else ``$EDGESTATE_CONFIG`` (must exist), else
    ``./config.toml`` if present, else all defaults. Environment overrides apply on top.

    Raises:
        ConfigError: missing file, TOML syntax error, unknown key, wrong type or value.
    """
    environ = os.environ if environ is None else environ
    explicit = path if path is not None else environ.get("EDGESTATE_CONFIG") or None
    candidate = Path(explicit) if explicit is not None else Path("config.toml")
    if not candidate.exists():
        if explicit is not None:
            raise ConfigError(f"{candidate}: config file not found")
        return from_dict({}, source="(defaults)", environ=environ)
    try:
        raw = tomllib.loads(candidate.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{candidate}: TOML syntax error: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{candidate}: cannot read: {exc.__class__.__name__}: {exc}") from None
    return from_dict(raw, source=str(candidate), environ=environ)


def to_dict(config: Config, *, redacted: bool = False) -> dict[str, dict[str, Any]]:
    """The configuration as plain data (``redacted``: secrets shown as ``***``)."""
    out: dict[str, dict[str, Any]] = {}
    for section in _SECTIONS:
        obj = getattr(config, section)
        table: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            if (section, f.name) in _ENV_ONLY:
                continue
            value = getattr(obj, f.name)
            if isinstance(value, Mapping):
                value = dict(value)
            elif isinstance(value, tuple):
                value = [dict(v) if isinstance(v, Mapping) else v for v in value]
            table[f.name] = value
        out[section] = table
    if redacted:
        up = out["upstream"]
        up["rpc_url"] = [redact(u) for u in config.upstream.rpc_urls]
        up["ws_url"] = redact(config.upstream.pubsub_url)
        up["parent"] = [redact(u) for u in config.upstream.parent]
        out["price"]["url"] = redact(config.price.url)
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)  # pragma: no cover


def to_toml(config: Config) -> str:
    """The effective configuration as TOML, secrets redacted (for check-config)."""
    lines = [f"# effective configuration from {config.source}"]
    for section, table in to_dict(config, redacted=True).items():
        lines.append(f"\n[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
    if config.upstream.helius_api_key:
        lines.append('# HELIUS_API_KEY = "***" (from the environment)')
    if config.price.api_key:
        lines.append('# JUPITER_API_KEY = "***" (from the environment)')
    return "\n".join(lines) + "\n"
