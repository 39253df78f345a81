import dataclasses
from pathlib import Path

import pytest

from edgestate import config
from edgestate.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults_are_the_seeds():
    cfg = config.load(None, environ={})
    assert cfg.upstream.max_connections == 10
    assert cfg.upstream.max_requests_per_second == 100  # the contract's default
    assert cfg.upstream.request_timeout == 30.0
    assert cfg.upstream.batch_window_ms == 100
    assert cfg.state.polling_interval == 30.0
    assert cfg.cache.ttl == 5.0
    assert cfg.upstream.rpc_urls == ("https://api.devnet.solana.com",)
    assert cfg.upstream.pubsub_url == "wss://api.devnet.solana.com"


def test_shipped_config_toml_equals_defaults():
    shipped = config.load("config.toml", environ={})
    assert dataclasses.replace(shipped, source="x") == dataclasses.replace(config.load(None, environ={}), source="x")


def test_defaults_pass_their_own_validation():
    cfg = config.load(None, environ={})
    assert config.from_dict(config.to_dict(cfg), environ={}) == cfg


def test_frozen():
    cfg = config.load(None, environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.upstream.max_connections = 3  # type: ignore[misc]


def test_file_values_and_env_overrides(tmp_path):
    path = write(tmp_path, '[upstream]\nmax_connections = 4\nrpc_url = ["http://a.example", "http://b.example"]\n')
    cfg = config.load(path, environ={"EDGESTATE_UPSTREAM_MAX_CONNECTIONS": "7", "EDGESTATE_LOG_LEVEL": "debug"})
    assert cfg.upstream.max_connections == 7
    assert cfg.log.level == "debug"
    assert cfg.upstream.rpc_urls == ("http://a.example", "http://b.example")
    assert cfg.upstream.pubsub_url == "ws://a.example"


def test_single_rpc_url_string_is_a_list_of_one():
    cfg = config.from_dict({"upstream": {"rpc_url": "https://x.example/rpc"}}, environ={})
    assert cfg.upstream.rpc_urls == ("https://x.example/rpc",)


def test_helius_key_selects_helius_and_is_never_printed():
    cfg = config.load(None, environ={"HELIUS_API_KEY": "sekrit-123", "JUPITER_API_KEY": "jup-456"})
    assert cfg.upstream.rpc_urls == ("https://devnet.helius-rpc.com/?api-key=sekrit-123",)
    text = config.to_toml(cfg) + repr(cfg)
    assert "sekrit-123" not in text and "jup-456" not in text
    assert "api-key=***" in text
    assert cfg.price.api_key == "jup-456"


def test_config_path_from_environment(tmp_path):
    path = write(tmp_path, "[ws]\nmax_clients = 5\n")
    assert config.load(None, environ={"EDGESTATE_CONFIG": str(path)}).ws.max_clients == 5


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[upstream]\nmax_conections = 3\n", "unknown key upstream.max_conections (did you mean 'max_connections'?)"),
        ("[upstrem]\n", "unknown section [upstrem] (did you mean 'upstream'?)"),
        ("[upstream]\nmax_connections = 'ten'\n", "upstream.max_connections: expected an integer"),
        ("[upstream\n", "TOML syntax error"),
        ("[token]\nmint = 'not-a-key'\n", "token.mint: not a valid Solana public key"),
        ("[upstream]\nrpc_url = 'ftp://x'\n", "upstream.rpc_url: not a valid http/https URL"),
        ("[state]\npolling_interval = -1\n", "state.polling_interval: must be > 0"),
        ("[log]\nlevel = 'loud'\n", "log.level: must be one of"),
        ("[server]\nbind = 'nohostport'\n", "server.bind: expected HOST:PORT"),
        ("[lottery]\nparticipant_filters = [{dataSize = 'x'}]\n", "participant_filters[0]: dataSize"),
        ("[log]\naccess = 1\n", "log.access: expected true or false"),
    ],
)
def test_bad_config_is_one_line_naming_file_key_problem(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        config.load(path, environ={})
    message = str(info.value)
    assert needle in message
    assert str(path) in message
    assert "\n" not in message


def test_bad_env_override_names_the_variable():
    with pytest.raises(ConfigError, match=r"environment EDGESTATE_WS_MAX_CLIENTS: .*expected an integer"):
        config.load(None, environ={"EDGESTATE_WS_MAX_CLIENTS": "lots"})
    # A name that is no key is a warning (Kubernetes injects EDGESTATE_WS_SERVICE_PORT for a
    # Service named edgestate-ws), with the key it was probably meant to be.
    cfg = config.load(None, environ={"EDGESTATE_WS_MAX_CLIENT": "3"})
    assert cfg.warnings == ("environment EDGESTATE_WS_MAX_CLIENT: not a config key, ignored "
                            "(did you mean EDGESTATE_WS_MAX_CLIENTS?)",)


def test_missing_explicit_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.toml", environ={})


def test_secret_in_bad_url_is_redacted(tmp_path):
    path = write(tmp_path, "[upstream]\nws_url = 'http://x.example/?api-key=topsecret'\n")
    with pytest.raises(ConfigError) as info:
        config.load(path, environ={})
    assert "topsecret" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://mainnet.helius-rpc.com/?api-key=abc", "https://mainnet.helius-rpc.com/?api-key=***"),
        ("https://user:pw@rpc.example/x", "https://***@rpc.example/x"),
        ("https://x.quiknode.pro/0123456789abcdef0123456789abcdef/", "https://x.quiknode.pro/***/"),
        ("http://127.0.0.1:8899", "http://127.0.0.1:8899"),
    ],
)
def test_redact(url, expected):
    assert config.redact(url) == expected


# ---- issue 10: the bounds on lookups --------------------------------------------------------


def test_lookup_bound_keys_defaults_and_documentation():
    cfg = config.load(None, environ={})
    assert cfg.api.lookup_per_client_rps == 10.0
    assert cfg.price.max_pending_mints == 500
    assert cfg.cache.state_maxsize == 1000
    assert cfg.upstream.max_response_bytes == 64 * 1024 * 1024
    readme = Path("README.md").read_text(encoding="utf-8")
    toml = Path("config.toml").read_text(encoding="utf-8")
    for section, key in [("api", "lookup_per_client_rps"), ("price", "max_pending_mints"),
                         ("cache", "state_maxsize"), ("upstream", "max_response_bytes")]:
        assert f"| {section}.{key} |" in readme
        assert f"\n{key} = " in toml


@pytest.mark.parametrize(
    ("section", "key", "value", "needle"),
    [
        ("api", "lookup_per_client_rps", -1, ">= 0"),
        ("price", "max_pending_mints", 0, "> 0"),
        ("cache", "state_maxsize", 0, "> 0"),
        ("upstream", "max_response_bytes", 1000, ">= 65536"),
        ("upstream", "max_response_bytes", "big", "integer"),
    ],
)
def test_lookup_bound_keys_are_validated(section, key, value, needle):
    with pytest.raises(ConfigError, match=f"{section}.{key}.*{needle}"):
        config.from_dict({section: {key: value}}, source="t.toml", environ={})


def test_lookup_share_may_be_turned_off():
    assert config.from_dict({"api": {"lookup_per_client_rps": 0}}, environ={}).api.lookup_per_client_rps == 0


# ---- issue 11: cluster checks, plans, the price key's plan ---------------------------------


def test_mainnet_with_devnet_defaults_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        config.from_dict({"upstream": {"cluster": "mainnet-beta"}}, environ={})
    lines = str(err.value).splitlines()
    assert len(lines) == 3 and all("mainnet-beta" in line for line in lines)
    assert any("token.mint" in line for line in lines) and any("lottery.pot_account" in line for line in lines)
    from solders.pubkey import Pubkey

    own = {k: str(Pubkey.new_unique()) for k in ("mint", "pot", "program")}
    cfg = config.from_dict({"upstream": {"cluster": "mainnet-beta"}, "token": {"mint": own["mint"]},
                            "lottery": {"pot_account": own["pot"], "program_id": own["program"]}}, environ={})
    assert cfg.upstream.rpc_urls == ("https://api.mainnet-beta.solana.com",)


def test_testnet_with_only_a_helius_key_is_a_config_error():
    # Helius has no testnet: the key used to select its devnet endpoint silently.
    with pytest.raises(ConfigError, match="Helius has no testnet"):
        config.from_dict({"upstream": {"cluster": "testnet"}}, environ={"HELIUS_API_KEY": "k"})
    ok = config.from_dict({"upstream": {"cluster": "testnet", "rpc_url": "https://api.testnet.solana.com"}},
                          environ={"HELIUS_API_KEY": "k"})
    assert ok.upstream.rpc_urls == ("https://api.testnet.solana.com",)


def test_jupiter_key_raises_the_price_limit_to_its_plan_unless_configured():
    assert config.from_dict({}, environ={}).price.max_requests_per_second == 0.5
    assert config.from_dict({}, environ={"JUPITER_API_KEY": "k"}).price.max_requests_per_second == 1.0
    explicit = config.from_dict({"price": {"max_requests_per_second": 0.2}}, environ={"JUPITER_API_KEY": "k"})
    assert explicit.price.max_requests_per_second == 0.2


def test_new_upstream_keys_are_validated():
    with pytest.raises(ConfigError, match="upstream.plan"):
        config.from_dict({"upstream": {"plan": "helius-gold"}}, environ={})
    with pytest.raises(ConfigError, match="method_rate_limits.getProgramAccounts"):
        config.from_dict({"upstream": {"method_rate_limits": {"getProgramAccounts": 0}}}, environ={})
    with pytest.raises(ConfigError, match="max_batch_bytes"):
        config.from_dict({"upstream": {"max_batch_bytes": 100}}, environ={})
    cfg = config.from_dict({"state": {"participants_reconcile_interval": 300}}, environ={})
    assert cfg.state.participants_reconcile_interval == 300.0


def test_default_forecast_fits_a_twentieth_of_helius_free():
    from edgestate.upstream.costs import cost_line, forecast

    cfg = config.from_dict({}, environ={})
    f = forecast(cfg)
    # The credits fit; the contract's default rate (100/s) is over the plan's 10/s, and the
    # one line says so (the second option: the contract fixes that default).
    assert f.credits_pushed <= 50_000
    assert f.exceeded == ["upstream.max_requests_per_second 100 > 10 req/s"]
    assert f.price_requests == 0.5 * 30 * 86400
    assert "exceeds Helius Free: upstream.max_requests_per_second 100 > 10 req/s" in cost_line(cfg)
    fitted = config.from_dict({"upstream": {"max_requests_per_second": 10}}, environ={})
    assert not forecast(fitted).exceeded and "within Helius Free" in cost_line(fitted)
    # Today's polling design: getProgramAccounts every 10 s is 2,592,000 credits a month.
    assert f.credits_polling >= 2_592_000
    loud = config.from_dict({"upstream": {"max_requests_per_second": 100, "method_rate_limits": {}},
                             "state": {"participants_reconcile_interval": 10}}, environ={})
    line = cost_line(loud)
    assert "exceeds Helius Free" in line and "max_requests_per_second 100 > 10" in line
    assert "getProgramAccounts 100/s > 5/s" in line and "credits/month > 1,000,000" in line
    assert "\n" not in line
