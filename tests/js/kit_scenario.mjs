// @solana/kit against edgestate's /rpc: createSolanaRpc and createSolanaRpcSubscriptions.
// Env: RPC_URL, WS_URL, POT, UNKNOWN_SIGNATURE. Prints one JSON object; tests/test_rpc_clients.py checks it.
import { address, createSolanaRpc, createSolanaRpcSubscriptions } from '@solana/kit';

const env = process.env;
const rpc = createSolanaRpc(env.RPC_URL);
const subscriptions = createSolanaRpcSubscriptions(env.WS_URL);
const pot = address(env.POT);
const out = {};
const timeout = (ms) => AbortSignal.timeout(ms);

out.balance = Number((await rpc.getBalance(pot, { commitment: 'confirmed' }).send()).value);
const info = await rpc.getAccountInfo(pot, { encoding: 'base64' }).send();
out.owner = info.value.owner;
out.blockhash = (await rpc.getLatestBlockhash().send()).value.blockhash;
out.slot = Number(await rpc.getSlot().send());
out.statuses = (await rpc.getSignatureStatuses([env.UNKNOWN_SIGNATURE]).send()).value;

const slots = await subscriptions.slotNotifications().subscribe({ abortSignal: timeout(10000) });
for await (const n of slots) { out.slotNotified = Number(n.slot) > 0; break; }

const accounts = await subscriptions
  .accountNotifications(pot, { commitment: 'confirmed', encoding: 'base64' })
  .subscribe({ abortSignal: timeout(10000) });
for await (const n of accounts) { out.potNotified = Number(n.value.lamports); break; }
console.log(JSON.stringify(out));
process.exit(0);
