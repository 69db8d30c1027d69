#!/usr/bin/env bash
# `make demo-ha`: an active/backup pair (netns-lab/ha-pair.sh) serving the seed's
# VIP 10.1.1.101:80, elected by keepalived; a client opens a new connection every
# 20 ms and holds four long-lived ones while the active node crashes (every
# process killed, the switch drops its frames); prints what the client saw, then
# tears down (also on failure).
set -eu
cd "$(dirname "$(readlink -f "$0")")/.."
export XLB_LAB=${XLB_LAB:-xlbk}
P=$XLB_LAB
PAIR="bash netns-lab/ha-pair.sh"
XLB=.venv/bin/xlb
TMP=$(mktemp -d /tmp/xlb-demo-ha.XXXXXX)

cleanup() {
    $PAIR down >/dev/null
    rm -rf "$TMP"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
role() { ip netns exec "$P-$1" "$XLB" status | sed -n 2p; }

step "a pair: lb1 and lb2 on the client segment and the servers' segment (ha-pair.sh up)"
$PAIR up

# The seed's service with Maglev and adopt_replies on both nodes: the new active
# node takes over the connections of the old one (ha-examples/xlb.toml says how).
cp netns-lab/ha-examples/xlb.toml "$TMP/xlb.toml"

step "xlb up --config xlb.toml --role backup, on both nodes (silent until keepalived decides)"
for n in lb1 lb2; do
    ip netns exec "$P-$n" "$XLB" up --config "$TMP/xlb.toml" --role backup \
        >"$TMP/$n.log" 2>&1 &
    disown    # the crash kills one: no "Killed" notice from this shell
done
for n in lb1 lb2; do
    for _ in $(seq 600); do      # compiling the program takes a few seconds
        grep -q serving "$TMP/$n.log" && break
        sleep 0.1
    done
    grep serving "$TMP/$n.log" || { echo "xlb did not start on $n"; cat "$TMP/$n.log"; exit 1; }
done

step "keepalived on both nodes, its config from xlb ha keepalived (lb1's below; each node its own FIFO and track file, as the lab's nodes share /run)"
$PAIR keepalived lb1 "$TMP/xlb.toml"
$PAIR keepalived lb2 "$TMP/xlb.toml"
cat "/run/xlb-lab/$P/lb1-keepalived.conf"
active=""
for _ in $(seq 100); do
    for n in lb1 lb2; do
        role "$n" | grep -q '^role active' && active=$n
    done
    [ -n "$active" ] && break
    sleep 0.1
done
[ -n "$active" ] || { echo "keepalived elected no node"; exit 1; }
other=$([ "$active" = lb1 ] && echo lb2 || echo lb1)
for n in lb1 lb2; do echo "$n: $(role "$n")"; done

step "a client: a new connection every 20 ms and 4 long-lived ones, for 4 s; $active crashes after 1.5 s"
ip netns exec "$P-client" /usr/bin/python3 netns-lab/ha_client.py load 10.1.1.101 80 \
    --seconds 4 --every 0.02 --hold 4 --hold-every 0.1 >"$TMP/client.json" &
client=$!
sleep 1.5
killed=$($PAIR crash "$active")
echo "$(date -d "@$killed" +%T.%3N) $active crashed: every process killed, the switch drops its frames"
wait "$client"
echo "$other: $(role "$other")"

step "what the client saw"
/usr/bin/python3 netns-lab/ha_client.py summary "$TMP/client.json" --since "$killed"

step "xlb status on $other"
ip netns exec "$P-$other" "$XLB" status
