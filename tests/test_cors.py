"""CORS that survives a CDN, and one Origin matcher for CORS and /ws."""

from __future__ import annotations

import httpx
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from edgestate import config
from edgestate.errors import ConfigError
from edgestate.origins import OriginPolicy, check_entry
from tests.conftest import make_config, start_server, wait_for

FAR = {"polling_interval": 3600.0, "participants_interval": 3600.0, "price_interval": 3600.0}
MINT = "4zMMC9srt5Ri5X14GAgXhaHii3GnPAEERYPJgZJDncDU"
ACAO = "access-control-allow-origin"


def test_policy_exact_wildcard_and_star():
    policy = OriginPolicy(("https://app.example", "https://*.example.com", "http://localhost:5173"))
    assert not policy.any
    assert policy.allows("https://app.example") and policy.allows("HTTPS://App.Example")
    assert policy.allows("https://a.example.com") and policy.allows("https://a.b.example.com")
    assert policy.allows("http://localhost:5173")
    for refused in ("https://example.com", "http://a.example.com", "https://a.example.com:8443",
                    "https://evilexample.com", "https://example.com.evil.net", "https://.example.com",
                    "http://localhost:5174", "null", "", None):
        assert not policy.allows(refused), refused
    assert OriginPolicy(()).any and OriginPolicy(("*",)).any and OriginPolicy(("https://a.example", "*")).any
    assert OriginPolicy(("*",)).allows("https://anything.example") and OriginPolicy(()).allows(None)


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(labels=st.lists(_label, min_size=1, max_size=3), other=_label)
def test_wildcard_matches_subdomains_only(labels, other):
    policy = OriginPolicy(("https://*.example.com",))
    sub = ".".join(labels)
    assert policy.allows(f"https://{sub}.example.com")
    assert not policy.allows(f"https://{sub}.example.com.{other}")
    assert not policy.allows(f"https://{sub}example.com") or sub.endswith(".")
    assert not policy.allows(f"http://{sub}.example.com")
    assert not policy.allows(f"https://{sub}.example.com:444")


@pytest.mark.parametrize(("entry", "needle"), [
    ("https://app.example/", "no trailing slash"),
    ("https://app.example/path", "has a path"),
    ("app.example", "no scheme"),
    ("https://a.*.example.com", "wildcard"),
    ("https://*", "wildcard"),
    ("https://bad host", "not an origin"),
])
def test_check_config_rejects_bad_origins(entry, needle):
    assert needle in (check_entry(entry) or "")
    with pytest.raises(ConfigError, match=r"server\.allowed_origins\[0\]"):
        config.from_dict({"server": {"allowed_origins": [entry]}}, environ={})


@pytest.mark.parametrize("entry", ["*", "https://app.example", "http://localhost:5173", "https://*.example.com",
                                   "http://[::1]:8080", "http://127.0.0.1:3000"])
def test_good_origins_pass(entry):
    assert check_entry(entry) is None
    assert config.from_dict({"server": {"allowed_origins": [entry]}}, environ={}).server.allowed_origins == (entry,)


def test_env_lists_split_on_commas_and_spaces():
    env = {"EDGESTATE_SERVER_ALLOWED_ORIGINS": "https://a.example,https://b.example  https://*.c.example",
           "EDGESTATE_API_TRUSTED_PROXIES": "10.0.0.0/8, 127.0.0.1"}
    cfg = config.from_dict({}, environ=env)
    assert cfg.server.allowed_origins == ("https://a.example", "https://b.example", "https://*.c.example")
    assert cfg.api.trusted_proxies == ("10.0.0.0/8", "127.0.0.1")
    toml_list = config.from_dict({}, environ={"EDGESTATE_SERVER_ALLOWED_ORIGINS": '["https://a.example"]'})
    assert toml_list.server.allowed_origins == ("https://a.example",)


async def _server(nursery, sim, origins):
    running = await start_server(nursery, make_config(sim.url, state=FAR, server={"allowed_origins": origins}))
    await wait_for(lambda: running.services.state.ready()[0])
    return running


async def test_empty_allowlist_star_on_every_response(nursery, sim):
    running = await _server(nursery, sim, [])
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=running.url) as client:
            # No Origin at all: what a CDN caches and later hands to browsers.
            for path in ("/api/state", "/api/lottery/state", f"/api/price/{MINT}", "/health", "/ready", "/nope",
                         "/api/state?x=1", "/stats"):
                resp = await client.get(path)
                assert resp.headers.get(ACAO) == "*", (path, resp.status_code)
            resp = await client.post("/api/state")
            assert resp.status_code == 405 and resp.headers[ACAO] == "*"
            resp = await client.get("/api/state", headers={"Origin": "https://anyone.example"})
            assert resp.headers[ACAO] == "*"
            # A page polling with If-None-Match must be allowed to read the ETag.
            assert "ETag" in resp.headers["access-control-expose-headers"]
            etag = resp.headers["etag"]
            resp = await client.get("/api/state", headers={"If-None-Match": etag})
            assert resp.status_code == 304 and resp.headers[ACAO] == "*"
        async with httpx.AsyncClient(base_url=running.url) as fresh:  # a new connection meets the front door
            resp = await fresh.get("/api/state", headers={"X-Big": "a" * 20000})
            assert resp.status_code == 431 and resp.headers[ACAO] == "*"
    await running.shutdown()


async def test_list_echoes_origin_and_varies_on_every_response(nursery, sim):
    running = await _server(nursery, sim, ["https://app.example", "https://*.example.com"])
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=running.url) as client:
            for path in ("/api/state", f"/api/price/{MINT}", "/health", "/nope"):
                resp = await client.get(path)  # no Origin: no ACAO, but Vary so a cache keeps them apart
                assert ACAO not in resp.headers and "Origin" in resp.headers.get("vary", ""), path
                resp = await client.get(path, headers={"Origin": "https://shop.example.com"})
                assert resp.headers[ACAO] == "https://shop.example.com" and "Origin" in resp.headers["vary"], path
                resp = await client.get(path, headers={"Origin": "https://evil.example"})
                assert ACAO not in resp.headers and "Origin" in resp.headers["vary"], path
            pre = await client.options("/api/tokens/balances", headers={
                "Origin": "https://a.example.com", "Access-Control-Request-Method": "POST"})
            assert pre.headers[ACAO] == "https://a.example.com" and "POST" in pre.headers["access-control-allow-methods"]
    await running.shutdown()


async def test_star_in_list_allows_everyone_and_ws_uses_the_same_matcher(nursery, sim, ws_connect):
    running = await _server(nursery, sim, ["*"])
    async with httpx.AsyncClient(base_url=running.url) as client:
        assert (await client.get("/api/state", headers={"Origin": "https://x.example"})).headers[ACAO] == "*"
    assert (await ws_connect(running.url, origin="https://x.example")).status == 101
    await running.shutdown()
    running = await _server(nursery, sim, ["https://*.example.com"])
    assert (await ws_connect(running.url, origin="https://app.example.com")).status == 101
    assert (await ws_connect(running.url, origin="https://example.com")).status == 403
    assert (await ws_connect(running.url, origin="https://app.example.com.evil.net")).status == 403
    await running.shutdown()
