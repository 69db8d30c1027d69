#!/usr/bin/env bash
# `make demo`: the seed topology in namespaces, xlb serving VIP 10.1.1.101:80
# round-robin to WAS1 and WAS2 from netns-lab/seed.toml, ten requests from the
# on-subnet client and four from the routed one, a drained server, a failed
# server taken out by its health checks and back, `xlb status`, then everything
# torn down (also on failure).
set -eu
cd "$(dirname "$(readlink -f "$0")")/.."
export XLB_LAB=${XLB_LAB:-xlb}
P=$XLB_LAB
LAB="bash netns-lab/lab.sh"
LOG=$(mktemp /tmp/xlb-demo.XXXXXX)
CONFIG=$(mktemp /tmp/xlb-demo.XXXXXX.toml)   # a copy of the seed for xlb to serve (it never writes it)
cp netns-lab/seed.toml "$CONFIG"
XLB_PID=""

cleanup() {
    if [ -n "$XLB_PID" ]; then
        kill -TERM "$XLB_PID" 2>/dev/null || true
        wait "$XLB_PID" 2>/dev/null || true
        grep -v '^xlb: serving' "$LOG"     # its log; the serving line was shown
    fi
    $LAB down >/dev/null
    rm -f "$LOG" "$CONFIG"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# $1 requests to the VIP from node $2, each with the WAS that answered it.
requests() {
    local i
    for i in $(seq "$1"); do
        printf 'request %2d -> %s\n' "$i" "$(ip netns exec "$P-$2" curl -s -m 3 http://10.1.1.101/)"
    done
}

step "seed topology (netns-lab/lab.sh up)"
$LAB up

step "the seed's configuration: health monitor, real servers, backend pool, frontend"
grep -v '^#' netns-lab/seed.toml | grep -v '^$'
echo "+ xlb check seed.toml"
.venv/bin/xlb check "$CONFIG"

step "xlb up in $P-lb"
echo "+ xlb up --config seed.toml"
ip netns exec "$P-lb" .venv/bin/xlb up --config "$CONFIG" >"$LOG" 2>&1 &
XLB_PID=$!
for _ in $(seq 600); do     # compiling the program takes a few seconds
    grep -q serving "$LOG" && break
    kill -0 "$XLB_PID" 2>/dev/null || { cat "$LOG"; XLB_PID=""; exit 1; }
    sleep 0.1
done
grep serving "$LOG" || { echo "xlb did not start within 60 s"; cat "$LOG"; exit 1; }

step "10 requests from the client on the VIP's subnet (10.1.1.10, resolves the VIP by ARP)"
requests 10 client
echo "(round-robin keeps a cursor per CPU: requests that land on different CPUs may meet one server twice in a row; the split evens out)"

step "4 requests from the routed client (198.51.100.10, through the external firewall)"
requests 4 remote

step "drain WAS2: no new connections for it (open ones would finish)"
echo "+ xlb server drain was was2"
ip netns exec "$P-lb" .venv/bin/xlb server drain was was2
requests 4 client
echo "+ xlb server enable was was2"
ip netns exec "$P-lb" .venv/bin/xlb server enable was was2

step "WAS2 fails: its health checks take it out, then bring it back"
# Polls `xlb status --json` (20 s at most) until server $1 is in state $2,
# checked by now, then shows its line; the demo fails if it never is.
wait_state() {
    local i
    for i in $(seq 200); do
        ip netns exec "$P-lb" .venv/bin/xlb status --json | .venv/bin/python -c '
import json, sys
s = next(s for s in json.load(sys.stdin)["pools"][0]["servers"] if s["name"] == sys.argv[1])
sys.exit(not (s["state"] == sys.argv[2] and s["last_check"]))
' "$1" "$2" && break
        [ "$i" = 200 ] && { echo "$1 is not $2 after 20 s"; exit 1; }
        sleep 0.1
    done
    ip netns exec "$P-lb" .venv/bin/xlb status | grep -E "^  (SERVER|$1) "
}
wait_state was2 up      # its first check (a server counts as up until then)
echo "+ lab.sh server stop was2   (down after 3 failed checks, 2 s apart: fall x interval)"
$LAB server stop was2 >/dev/null
wait_state was2 down
requests 4 client
echo "+ lab.sh server start was2   (up after 2 good checks: rise x interval)"
$LAB server start was2 >/dev/null
wait_state was2 up
requests 4 client

step "xlb status"
ip netns exec "$P-lb" .venv/bin/xlb status

step "stopping (SIGTERM) and tearing the lab down"
