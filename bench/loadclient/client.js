#!/usr/bin/env node
// Load client for the edgestate benchmarks (driven by `python -m bench`).
//
// One process holds up to ~19k WebSocket connections (the open-files limit is 20,000 per
// process here); the harness starts several. Each connection binds its own source address
// from --addrs (at most ~5,000 per address: loopback connect rates collapse beyond), and
// connections are opened at --rate per second with at most --inflight handshakes pending.
//
// Every received text frame is scanned (no JSON.parse: it would make the client the
// bottleneck) for "<key>":<value>; the receive time (wall clock, ms with µs fraction) is
// recorded under that value, with the receiving client's index. The harness changes the
// upstream value to known, unique values and records the wall clock just before each
// change, so latency = receive time - change time, per client and per update.
//
// Optional HTTP polling (--poll-url): requests at --poll-rate per second in total (keep-alive
// agent), as the old frontend's "every user polls every 30 s".
//
// Control over stdin, one command a line; answers are JSON lines on stdout:
//   dump PATH   write {"records": {value: {"t": [...], "c": [...]}}, "stats": {...}} to PATH
//   reset       forget the records (keep the connections)
//   quit        close every connection and exit
// Progress: {"event":"progress",...} lines while connecting, {"event":"ready",...} once done.
'use strict';

const WebSocket = require('ws');
const http = require('http');
const fs = require('fs');
const readline = require('readline');
const { performance } = require('perf_hooks');

function parseArgs(argv) {
  const o = { url: null, count: 0, addrs: ['127.0.0.1'], rate: 2000, inflight: 256, key: 'jackpot',
    pollUrl: null, pollRate: 0, pollMethod: 'GET', pollBody: null, pollConns: 32, retries: 5 };
  for (let i = 2; i < argv.length; i += 2) {
    const k = argv[i], v = argv[i + 1];
    switch (k) {
      case '--url': o.url = v; break;
      case '--count': o.count = parseInt(v, 10); break;
      case '--addrs': o.addrs = v.split(','); break;
      case '--rate': o.rate = parseFloat(v); break;
      case '--inflight': o.inflight = parseInt(v, 10); break;
      case '--key': o.key = v; break;
      case '--poll-url': o.pollUrl = v; break;
      case '--poll-rate': o.pollRate = parseFloat(v); break;
      case '--poll-method': o.pollMethod = v; break;
      case '--poll-body': o.pollBody = v; break;
      case '--poll-conns': o.pollConns = parseInt(v, 10); break;
      default: throw new Error('unknown option ' + k);
    }
  }
  return o;
}

const opt = parseArgs(process.argv);
const now = () => performance.timeOrigin + performance.now();
const say = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');

// ---- WebSocket clients ----
const needle = Buffer.from('"' + opt.key + '":');
let records = new Map(); // value -> {t: [], c: []}
const stats = { opened: 0, failed: 0, retried: 0, closed: 0, messages: 0, errors: 0, firstError: null };
const sockets = [];

function onMessage(idx, data) {
  const t = now();
  stats.messages++;
  const buf = Array.isArray(data) ? Buffer.concat(data) : Buffer.from(data);
  const at = buf.indexOf(needle);
  if (at < 0) return;
  const start = at + needle.length;
  let end = start;
  while (end < buf.length) {
    const ch = buf[end];
    if (ch === 44 || ch === 125) break; // ',' or '}'
    end++;
  }
  const value = buf.toString('latin1', start, end);
  let r = records.get(value);
  if (r === undefined) { r = { t: [], c: [] }; records.set(value, r); }
  r.t.push(t);
  r.c.push(idx);
}

let next = 0, pending = 0, readyAnnounced = false;
const retryQueue = [];

function open(idx, attempt) {
  pending++;
  const addr = opt.addrs[Math.floor(idx / Math.ceil(opt.count / opt.addrs.length))] || opt.addrs[opt.addrs.length - 1];
  let ws;
  try {
    ws = new WebSocket(opt.url, { localAddress: addr, perMessageDeflate: false, handshakeTimeout: 30000 });
  } catch (e) {
    pending--; stats.failed++; stats.firstError = stats.firstError || String(e); return;
  }
  let opened = false;
  ws.on('open', () => { opened = true; pending--; stats.opened++; sockets[idx] = ws; });
  ws.on('message', (data) => onMessage(idx, data));
  ws.on('error', (e) => { stats.errors++; stats.firstError = stats.firstError || String(e.message || e); });
  ws.on('close', () => {
    if (opened) { stats.closed++; sockets[idx] = null; return; }
    pending--;
    if (attempt < opt.retries) { stats.retried++; retryQueue.push([idx, attempt + 1]); }
    else stats.failed++;
  });
}

function pump() {
  // Called every 10 ms: open up to rate/100 connections, bounded by in-flight handshakes.
  let budget = Math.max(1, Math.round(opt.rate / 100));
  while (budget > 0 && pending < opt.inflight && (retryQueue.length || next < opt.count)) {
    if (retryQueue.length) { const [i, a] = retryQueue.shift(); open(i, a); }
    else open(next++, 0);
    budget--;
  }
  const done = next >= opt.count && pending === 0 && retryQueue.length === 0;
  if (done && !readyAnnounced) {
    readyAnnounced = true;
    clearInterval(pumpTimer);
    say({ event: 'ready', opened: stats.opened, failed: stats.failed, retried: stats.retried });
  }
}
let pumpTimer = null;
if (opt.url && opt.count > 0) {
  pumpTimer = setInterval(pump, 10);
  setInterval(() => { if (!readyAnnounced) say({ event: 'progress', opened: stats.opened, failed: stats.failed }); }, 1000);
} else {
  readyAnnounced = true;
  say({ event: 'ready', opened: 0, failed: 0, retried: 0 });
}

// ---- HTTP polling ----
const poll = { sent: 0, ok: 0, status: {}, errors: 0, lat: [] };
if (opt.pollUrl && opt.pollRate > 0) {
  const u = new URL(opt.pollUrl);
  const agent = new http.Agent({ keepAlive: true, maxSockets: opt.pollConns, localAddress: opt.addrs[0] });
  const body = opt.pollBody ? Buffer.from(opt.pollBody) : null;
  let credit = 0, last = now();
  setInterval(() => {
    const t = now();
    credit += (t - last) / 1000 * opt.pollRate;
    last = t;
    while (credit >= 1) {
      credit -= 1;
      poll.sent++;
      const t0 = now();
      const headers = body ? { 'content-type': 'application/json', 'content-length': body.length } : {};
      const req = http.request({ host: u.hostname, port: u.port, path: u.pathname + u.search, method: opt.pollMethod, agent, headers }, (res) => {
        res.on('data', () => {});
        res.on('end', () => {
          poll.status[res.statusCode] = (poll.status[res.statusCode] || 0) + 1;
          if (res.statusCode < 400) { poll.ok++; poll.lat.push(now() - t0); }
        });
      });
      req.on('error', () => { poll.errors++; });
      if (body) req.write(body);
      req.end();
    }
  }, 5);
}

// ---- control ----
const rl = readline.createInterface({ input: process.stdin });
rl.on('line', (line) => {
  const [cmd, arg] = line.trim().split(/\s+/, 2);
  if (cmd === 'dump') {
    const out = {};
    for (const [k, r] of records) out[k] = r;
    const lat = poll.lat.slice().sort((a, b) => a - b);
    const pct = (p) => lat.length ? lat[Math.min(lat.length - 1, Math.floor(p * (lat.length - 1)))] : null;
    const pstats = { sent: poll.sent, ok: poll.ok, errors: poll.errors, status: poll.status, p50_ms: pct(0.5), p99_ms: pct(0.99) };
    fs.writeFileSync(arg, JSON.stringify({ records: out, stats: { ...stats, open: stats.opened - stats.closed }, poll: pstats }));
    say({ event: 'dumped', path: arg });
  } else if (cmd === 'reset') {
    records = new Map();
    poll.sent = 0; poll.ok = 0; poll.errors = 0; poll.status = {}; poll.lat = [];
    say({ event: 'reset' });
  } else if (cmd === 'quit') {
    for (const ws of sockets) if (ws) ws.terminate();
    say({ event: 'bye' });
    setTimeout(() => process.exit(0), 50);
  }
});
rl.on('close', () => process.exit(0));
