"""/metrics by Prometheus conventions: types, names, labels, worker label, internal port."""

from __future__ import annotations

import logging

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from edgestate.errors import UpstreamTimeout
from edgestate.metrics import SPECS, prometheus_text
from edgestate.telemetry import MAX_SERIES, Counter, Histogram, Telemetry
from tests.conftest import make_config, start_server, wait_for

FAR = {"polling_interval": 3600.0, "participants_interval": 3600.0, "price_interval": 3600.0}
MINT = "4zMMC9srt5Ri5X14GAgXhaHii3GnPAEERYPJgZJDncDU"


def parse(text: str) -> dict[str, tuple[str, list[Sample]]]:
    return {f.name: (f.type, f.samples) for f in text_string_to_metric_families(text)}


@pytest.fixture
async def server(nursery, sim):
    running = await start_server(nursery, make_config(sim.url, state=FAR))
    await wait_for(lambda: running.services.state.ready()[0])
    yield running
    await running.shutdown()


async def test_contract_metrics_have_their_types_and_labels(server, ws_connect):
    ws = await ws_connect(server.url)
    await ws.message()
    async with httpx.AsyncClient(base_url=server.url) as client:
        for _ in range(3):
            assert (await client.get("/api/state")).status_code == 200
        assert (await client.get(f"/api/price/{MINT}")).status_code == 200
        await client.get("/nope")
        text = (await client.get("/metrics")).text
    fams = parse(text)
    kind, samples = fams["edgestate_http_requests"]
    assert kind == "counter"
    by = {(s.labels["route"], s.labels["status"]): s.value for s in samples if s.name.endswith("_total")}
    assert by[("/api/state", "200")] == 3 and by[("(unmatched)", "404")] == 1
    for name in ("edgestate_http_request_duration_seconds", "edgestate_upstream_request_duration_seconds",
                 "edgestate_broadcast_duration_seconds"):
        kind, samples = fams[name]
        assert kind == "histogram", name
        assert any(s.name == name + "_bucket" and s.labels["le"] == "+Inf" for s in samples), name
        assert any(s.name == name + "_sum" for s in samples) and any(s.name == name + "_count" for s in samples)
    assert fams["edgestate_ws_clients"][0] == "gauge" and fams["edgestate_ws_clients"][1][0].value == 1
    assert fams["edgestate_ws_messages_sent"][0] == "counter"
    kind, samples = fams["edgestate_upstream_requests"]
    assert kind == "counter"
    labels = {(s.labels["upstream"], s.labels["method"], s.labels["outcome"]) for s in samples}
    assert ("price", "price", "ok") in labels and any(u == "rpc" and o == "ok" for u, _m, o in labels)
    kind, samples = fams["edgestate_cache_requests"]
    assert kind == "counter" and {s.labels["result"] for s in samples} >= {"hit", "miss"}
    assert fams["edgestate_provider_credits"][0] == "counter"
    assert fams["edgestate_provider_credits"][1][0].value > 0
    kind, samples = fams["edgestate_state_age_seconds"]
    assert kind == "gauge" and {s.labels["field"] for s in samples} == {"tokenPrice", "jackpot", "participants"}


async def test_every_name_follows_the_conventions(server):
    async with httpx.AsyncClient(base_url=server.url) as client:
        await client.get("/api/state")
        text = (await client.get("/metrics")).text
    for fam in text_string_to_metric_families(text):
        assert fam.name.startswith("edgestate_") and fam.name == fam.name.lower(), fam.name
        # No units other than base units, no pre-computed percentiles, averages or ratios.
        assert not any(bad in fam.name for bad in ("_ms", "p50", "p99", "latency", "avg", "_ratio", "hit_rate")), fam.name
        assert fam.documentation and not fam.documentation.startswith("edgestate "), fam.name
        for sample in fam.samples:
            assert not {"key", "item"} & set(sample.labels), sample
            if fam.type == "counter":
                assert sample.name.endswith(("_total", "_created")), sample.name
            if fam.type == "gauge":
                assert not sample.name.endswith("_total"), sample.name


def test_spec_counters_end_in_total_and_gauges_do_not():
    for spec in SPECS:
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name


async def test_worker_label_on_every_series(server):
    server.services.worker = {"id": 3, "pid": 1, "role": "worker"}
    try:
        text = prometheus_text(server.services).decode()
    finally:
        server.services.worker = None
    count = 0
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            assert sample.labels.get("worker") == "3", sample
            count += 1
    assert count > 50


async def test_internal_bind_serves_stats_metrics_only_there(nursery, sim):
    cfg = make_config(sim.url, state=FAR, server={"internal_bind": "127.0.0.1:0"})
    running = await start_server(nursery, cfg)
    host, port = running.services.internal_address  # type: ignore[misc]
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=running.url) as public:
            for path in ("/metrics", "/stats", "/status"):
                assert (await public.get(path)).status_code == 404, path
            # A keep-alive connection handed to the app: its next requests skip the front door.
            assert (await public.get("/health")).status_code == 200
            assert (await public.get("/metrics")).status_code == 404
            assert (await public.get("/stats")).status_code == 404
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as internal:
            assert (await internal.get("/metrics")).status_code == 200
            assert (await internal.get("/stats")).json()["server"]["version"]
            assert (await internal.get("/health")).status_code == 200
    await running.shutdown()


def test_histogram_buckets_are_cumulative_and_bounded():
    hist = Histogram("route", buckets=(0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 2.0):
        hist.observe(seconds, "/a")
    ((labels, buckets, total),) = list(hist.samples())
    assert labels == ("/a",) and buckets == [("0.1", 2.0), ("1.0", 3.0), ("+Inf", 4.0)]
    assert total == pytest.approx(2.65)
    counter = Counter("method")
    for i in range(MAX_SERIES + 50):
        counter.inc(f"m{i}")  # methods may come from clients (/rpc): bounded
    assert len(counter.values) == MAX_SERIES + 1 and counter.get("other") == 50


def test_upstream_outage_logged_once_and_recovery_at_info(caplog):
    tel = Telemetry()
    caplog.set_level(logging.INFO, logger="edgestate.upstream")
    for _ in range(5):
        exc = UpstreamTimeout("price API http://x: no reply in 1s")
        tel.note_failure("price", "timeout", exc)
        tel.upstream_call("price", "price", "timeout", 1.0)
    tel.note_failure("rpc", "rpc_error", Exception("invalid params"))  # an answer, not an outage
    assert tel.failing() == ["price"]
    tel.upstream_call("price", "price", "ok", 0.1)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0][0] == "WARNING" and "price API failing (timeout): price API http://x: no reply in 1s" in lines[0][1]
    assert lines[1][0] == "INFO" and "recovered" in lines[1][1] and "5 failed calls" in lines[1][1]
    assert "<" not in lines[0][1] and "UpstreamTimeout(" not in lines[0][1]  # no reprs
    assert tel.upstream_requests.get("price", "price", "timeout") == 5


def _known_names() -> set[str]:
    names = {"edgestate_" + s.name for s in SPECS}
    names |= {"edgestate_http_requests_total", "edgestate_http_request_duration_seconds", "edgestate_build_info",
              "edgestate_upstream_requests_total", "edgestate_upstream_request_duration_seconds",
              "edgestate_broadcast_duration_seconds", "edgestate_refusals_total"}
    return names


def test_docs_and_dashboard_use_only_real_metrics():
    import json
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    known = _known_names()
    documented = set(re.findall(r"`(edgestate_[a-z0-9_]+)`", (root / "docs/metrics.md").read_text()))
    assert known <= documented, sorted(known - documented)
    dash = json.loads((root / "packaging/grafana-dashboard.json").read_text())
    used = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"edgestate_[a-z0-9_]+", target["expr"]))
    base = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert base <= known, sorted(base - known)
    assert {"edgestate_http_requests_total", "edgestate_provider_credits_total", "edgestate_ws_clients"} <= base


async def test_refusals_are_counted_and_logged_at_debug(server, caplog, ws_connect):
    caplog.set_level(logging.DEBUG, logger="edgestate")
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(b"GET /api/state HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        assert (await stream.receive_some(100)).startswith(b"HTTP/1.1 431")
        await stream.aclose()
        ws = await ws_connect(server.url, path="/ws")
        await ws.message()
        plain = await trio.open_tcp_stream(host, int(port))  # /ws without the upgrade headers: 426
        await plain.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b" 426 " in await plain.receive_some(100)
        await plain.aclose()
    fams = parse(prometheus_text(server.services).decode())
    refusals = {(s.labels["where"], s.labels["reason"]): s.value for s in fams["edgestate_refusals"][1]
                if s.name.endswith("_total")}
    assert refusals[("http", "431")] == 1
    assert refusals[("ws", "handshake")] == 1
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and "refused" in r.getMessage()]
    assert any("431" in r.getMessage() for r in debug) and any("426" in r.getMessage() for r in debug)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "refused" in r.getMessage()]


async def test_a_new_stats_key_is_still_exported_but_never_as_a_name_of_data(server):
    # Another component (issue 11) may add figures: they appear as gauges by their path,
    # while tables keyed by data (methods, URLs) never turn into metric names.
    server.services.extra_stats["budget_extra"] = lambda: {"projected_credits": 12.5,
                                                           "by_method": {"getBalance": 3}}
    try:
        fams = parse(prometheus_text(server.services).decode())
    finally:
        del server.services.extra_stats["budget_extra"]
    assert fams["edgestate_budget_extra_projected_credits"][0] == "gauge"
    assert fams["edgestate_budget_extra_projected_credits"][1][0].value == 12.5
    assert not [name for name in fams if "getbalance" in name.lower()]
