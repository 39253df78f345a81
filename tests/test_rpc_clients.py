"""Real Solana clients against /rpc: @solana/web3.js 1.x and @solana/kit, pinned in
tests/js/package.json + package-lock.json and installed here with ``npm ci``, driven
against edgestate in front of the simulator.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import trio
from solders.keypair import Keypair
from solders.signature import Signature

from edgestate.sim import run_slot_ticker
from edgestate.sim.world import LAMPORTS_PER_SOL, SYSTEM_PROGRAM
from tests.conftest import make_config, start_server

JS = Path(__file__).parent / "js"
NODE = shutil.which("node")
NPM = shutil.which("npm")
pytestmark = pytest.mark.skipif(NODE is None or NPM is None, reason="node/npm not installed: the JS client tests need node 20+")


async def _npm_ci() -> None:
    """Install the pinned clients once per lock file (npm ci is slow to repeat)."""
    lock = (JS / "package-lock.json").read_bytes()
    marker = JS / "node_modules" / ".edgestate-lock-sha256"
    digest = hashlib.sha256(lock).hexdigest()
    if marker.exists() and marker.read_text() == digest:
        return
    with trio.fail_after(300):
        await trio.run_process([NPM, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=JS,
                               capture_stdout=True, capture_stderr=True)
    marker.write_text(digest)


async def _node(script: str, env: dict[str, str], timeout: float = 60) -> dict[str, Any]:
    with trio.fail_after(timeout):
        done = await trio.run_process([NODE, script], cwd=JS, env={**os.environ, **env}, capture_stdout=True,
                                      capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


async def _server(nursery: trio.Nursery, sim: Any) -> Any:
    nursery.start_soon(run_slot_ticker, sim.world, 0.2)
    far = {"polling_interval": 3600.0, "participants_interval": 3600.0, "price_interval": 3600.0}
    cfg = make_config(sim.url, state=far, upstream={"batch_window_ms": 5}, rpc={"per_client_rps": 1000})
    return await start_server(nursery, cfg)


async def test_web3js_reads_send_confirm_and_subscribe(nursery: trio.Nursery, sim: Any) -> None:
    await _npm_ci()
    server = await _server(nursery, sim)
    payer = Keypair()
    sim.world.set_account(str(payer.pubkey()), 2 * LAMPORTS_PER_SOL, SYSTEM_PROGRAM)
    env = {
        "RPC_URL": server.url + "/rpc",
        "WS_URL": "ws" + server.url[4:] + "/rpc",
        "STATS_URL": server.url + "/stats",
        "PAYER": json.dumps(list(bytes(payer))),
        "POT": sim.world.pot_account,
    }
    out = await _node("web3_scenario.mjs", env)
    assert out["balance"] == 2 * LAMPORTS_PER_SOL
    assert out["potLamports"] == sim.world.jackpot
    assert out["multi"] == [2 * LAMPORTS_PER_SOL, sim.world.jackpot, None]
    assert out["rent"] == 890_880 and out["epoch"] >= 0 and out["fees"] > 0
    assert out["blockhashValid"] is True and out["fee"] == 5000 and out["simulateErr"] is None
    from edgestate.sim import txs

    assert out["signature"] in txs.ledger(sim.world).txs  # the signature of the signed transfer
    assert out["confirmErr"] is None and out["status"] in ("confirmed", "finalized")
    assert out["notification"]["lamports"] == LAMPORTS_PER_SOL // 100
    assert out["recipient"] == LAMPORTS_PER_SOL // 100 and out["txFee"] == 5000
    assert out["unsubscribed"]
    stats = server.services.rpc_proxy.stats()
    assert stats["methods"]["sendTransaction"]["calls"] == {"ok": 1}
    assert sim.world.counters()["rpc_methods"]["sendTransaction"] == 1  # forwarded exactly once
    await server.shutdown()


async def test_kit_rpc_and_subscriptions(nursery: trio.Nursery, sim: Any) -> None:
    await _npm_ci()
    server = await _server(nursery, sim)

    async def keep_changing_the_pot() -> None:
        while True:
            await trio.sleep(0.2)
            sim.world.add_jackpot(1_000)

    nursery.start_soon(keep_changing_the_pot)
    env = {
        "RPC_URL": server.url + "/rpc",
        "WS_URL": "ws" + server.url[4:] + "/rpc",
        "POT": sim.world.pot_account,
        "UNKNOWN_SIGNATURE": str(Signature(os.urandom(64))),
    }
    out = await _node("kit_scenario.mjs", env)
    assert out["balance"] >= 12_500_000_000 and out["owner"] == SYSTEM_PROGRAM
    assert out["slot"] > 0 and len(out["blockhash"]) >= 32 and out["statuses"] == [None]
    assert out["slotNotified"] is True and out["potNotified"] > 12_500_000_000
    await server.shutdown()
