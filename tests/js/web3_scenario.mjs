// @solana/web3.js 1.x against edgestate's /rpc, as a dApp frontend uses it.
// Env: RPC_URL (http://host:port/rpc), WS_URL (ws://host:port/rpc), STATS_URL, PAYER (secret key JSON), POT.
// Prints one JSON object with what it saw; tests/test_rpc_clients.py checks it.
import {
  Connection, Keypair, PublicKey, SystemProgram, Transaction, LAMPORTS_PER_SOL,
} from '@solana/web3.js';

const env = process.env;
const payer = Keypair.fromSecretKey(Uint8Array.from(JSON.parse(env.PAYER)));
const pot = new PublicKey(env.POT);
const conn = new Connection(env.RPC_URL, { commitment: 'confirmed', wsEndpoint: env.WS_URL });
const out = {};
const withTimeout = (p, ms, what) => Promise.race([
  p, new Promise((_, reject) => setTimeout(() => reject(new Error(`timeout: ${what}`)), ms)),
]);

async function waitForStats(pred, what) {
  for (let i = 0; i < 100; i++) {
    const stats = await (await fetch(env.STATS_URL)).json();
    if (pred(stats.rpc)) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`stats never showed ${what}`);
}

out.balance = await conn.getBalance(payer.publicKey);
out.potLamports = (await conn.getAccountInfo(pot)).lamports;
const nobody = Keypair.generate().publicKey;
out.multi = (await conn.getMultipleAccountsInfo([payer.publicKey, pot, nobody])).map((a) => a && a.lamports);
out.slot = await conn.getSlot();
out.blockHeight = await conn.getBlockHeight();
out.epoch = (await conn.getEpochInfo()).epoch;
out.rent = await conn.getMinimumBalanceForRentExemption(0);
out.version = (await conn.getVersion())['solana-core'];
out.genesis = await conn.getGenesisHash();
out.fees = (await conn.getRecentPrioritizationFees()).length;

const { blockhash, lastValidBlockHeight } = await conn.getLatestBlockhash();
out.blockhashValid = (await conn.isBlockhashValid(blockhash)).value;

const to = Keypair.generate().publicKey;
let subId;
const changed = new Promise((resolve) => {
  subId = conn.onAccountChange(to, (acc, ctx) => resolve({ lamports: acc.lamports, slot: ctx.slot }), 'confirmed');
});
await waitForStats((rpc) => rpc.pubsub.upstream_subscriptions >= 1, 'the upstream accountSubscribe');

const tx = new Transaction({ feePayer: payer.publicKey, blockhash, lastValidBlockHeight })
  .add(SystemProgram.transfer({ fromPubkey: payer.publicKey, toPubkey: to, lamports: LAMPORTS_PER_SOL / 100 }));
tx.sign(payer);
out.fee = (await conn.getFeeForMessage(tx.compileMessage())).value;
out.simulateErr = (await conn.simulateTransaction(tx)).value.err;
const signature = await conn.sendRawTransaction(tx.serialize());
out.signature = signature;
const confirmation = await withTimeout(
  conn.confirmTransaction({ signature, blockhash, lastValidBlockHeight }, 'confirmed'), 15000, 'confirmTransaction');
out.confirmErr = confirmation.value.err;
out.notification = await withTimeout(changed, 10000, 'onAccountChange');
out.status = (await conn.getSignatureStatus(signature)).value.confirmationStatus;
const fetched = await conn.getTransaction(signature, { commitment: 'confirmed', maxSupportedTransactionVersion: 0 });
out.txFee = fetched.meta.fee;
out.recipient = await conn.getBalance(to);
await conn.removeAccountChangeListener(subId);
await waitForStats((rpc) => rpc.pubsub.upstream_subscriptions === 0, 'the upstream unsubscribe');
out.unsubscribed = true;
console.log(JSON.stringify(out));
process.exit(0);
