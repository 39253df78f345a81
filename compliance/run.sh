#!/usr/bin/env bash
# Autobahn|Testsuite (fuzzing client, via the `kosoku` package) against the echo server
# built from the /ws modules. Cases 1-10; 12 and 13 need permessage-deflate, which is not
# negotiated. Fails unless every case is OK, NON-STRICT or INFORMATIONAL.
#
#   compliance/run.sh                 # reports in compliance/reports/
#   OUTDIR=/tmp/ab CASES='6.* 7.*' compliance/run.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
outdir="${OUTDIR:-$here/reports}"
cases="${CASES:-1.* 2.* 3.* 4.* 5.* 6.* 7.* 9.* 10.*}"  # the suite has no category 8
kosoku="$(dirname "$("$python" -c 'import sys; print(sys.executable)')")/kosoku"
[[ -x "$kosoku" ]] || kosoku="$(command -v kosoku)" || { echo "run.sh: kosoku not installed (pip install -e '.[test]')" >&2; exit 2; }

port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$python" "$here/echo_server.py" --bind "127.0.0.1:$port" &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT

for _ in $(seq 100); do  # up to 10 s for the server to listen
    if (: <"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
    kill -0 "$server" 2>/dev/null || { echo "run.sh: echo server exited" >&2; exit 1; }
    sleep 0.1
done

args=()
for case in $cases; do args+=(-i "$case"); done
rm -rf "$outdir"
mkdir -p "$outdir"
status=0
"$kosoku" -m fuzzingclient "ws://127.0.0.1:$port/" "${args[@]}" -o "$outdir" >"$outdir/kosoku.log" 2>&1 || status=$?
"$python" "$here/summarize.py" "$outdir" || status=1
if [[ $status -ne 0 ]]; then
    tail -n 20 "$outdir/kosoku.log" >&2
fi
exit "$status"
