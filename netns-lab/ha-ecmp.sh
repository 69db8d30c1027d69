#!/bin/bash
# N-node scale-out: three xlb nodes announce the VIP 10.1.1.101/32 over BGP (BIRD)
# to a router (BIRD) that spreads flows over them with ECMP, in network namespaces
# "$XLB_LAB-<node>" (default prefix "xlbg"). Built from lab.sh's helpers; nothing
# is added to the root namespace.
#
#   node      dev   address              segment          notes
#   client    eth0  203.0.113.10/24      veth to router   default via 203.0.113.1
#   router    eth0  203.0.113.1/24       veth to client   BIRD: eBGP AS 65000 to the nodes, BFD,
#             eth1  10.1.2.1/24          br-ext           ECMP with a header-only 5-tuple hash
#   node1..3  eth0  10.1.2.11..13/24     br-ext           xlb --announce-table 100; BIRD AS 65001
#             eth1  10.1.11.11..13/24    br-int           default via 10.1.2.1
#   was1/2    eth0  10.1.11.101|102/24   br-int           http+udp :8080
#
# xlb rewrites only the destination, so a server's reply must go back through
# the node that forwarded the request (it holds the flow). The servers do that
# with connection marks: every packet from a node's MAC marks its connection
# with the node's number, and replies are routed by the mark (a real site does
# the same with per-gateway routing, or puts the nodes in front of a tunnel).
#
# Usage: ha-ecmp.sh up | down | bird NODE CONFIG | silence NODE | exec NODE CMD...
set -eu
export XLB_LAB=${XLB_LAB:-xlbg}
# shellcheck source=lab.sh
. "$(dirname "$(readlink -f "$0")")/lab.sh"
NODES="sw client router node1 node2 node3 was1 was2"
SERVER_NODES="was1 was2"
LB_NODES="node1 node2 node3"
XLB=$(readlink -f "$HERE/..")/.venv/bin/xlb
TABLE=100

make_router() {
    wire router eth0 client eth0
    addr router eth0 203.0.113.1/24
    addr client eth0 203.0.113.10/24
    route client default via 203.0.113.1
    plug router eth1 br-ext
    addr router eth1 10.1.2.1/24
    # Policy 3 hashes the fields of fib_multipath_hash_fields, from the headers
    # only (never a socket's or skb's hash), as a router does: 0x37 is source and
    # destination address, protocol, source and destination port.
    sysctl_in router net.ipv4.ip_forward=1 net.ipv4.fib_multipath_hash_policy=3 \
        net.ipv4.fib_multipath_hash_fields=0x0037
}

make_node() {   # make_node NODE N
    make_balancer "$1" "10.1.2.1$2/24" "10.1.11.1$2/24"
    route "$1" default via 10.1.2.1
}

node_mac() { ip -n "$P-$1" -br link show eth1 | awk '{print $3}'; }

make_ecmp_was() {   # make_ecmp_was NODE LAST-OCTET
    local n map=""
    plug "$1" eth0 br-int
    addr "$1" eth0 "10.1.11.$2/24"
    route "$1" default via 10.1.11.11
    for n in 1 2 3; do
        map="$map${map:+, }$(node_mac "node$n") : $n"
        ip -n "$P-$1" rule add fwmark "$n" table "$n"
        route "$1" default via "10.1.11.1$n" table "$n"
    done
    nsx "$1" nft -f - <<EOF
table ip xlb_return {
    chain prerouting {
        type filter hook prerouting priority mangle; policy accept;
        ct mark set ether saddr map { $map }
    }
    chain output {
        type route hook output priority mangle; policy accept;
        meta mark set ct mark
    }
}
EOF
}

ecmp_up() {
    local n
    if lab_is_up; then say "already up"; return 0; fi
    if lab_exists_any; then cmd_down; fi
    trap up_failed EXIT
    mkdir -p "$RUN"
    make_namespaces
    make_switch
    make_router
    for n in 1 2 3; do make_node "node$n" "$n"; done
    make_ecmp_was was1 101
    make_ecmp_was was2 102
    for n in $SERVER_NODES; do server_start "$n"; done
    start_bird router "$HERE/ha-examples/bird-router.conf"
    touch "$RUN/up"
    trap - EXIT
    say "up: client 203.0.113.10 -> router 203.0.113.1 / 10.1.2.1 -> node1..3 10.1.2.11..13 -> was1/2 10.1.11.101/102"
}

# start_bird NODE CONF: BIRD in the foreground of a background job, with its own
# control socket ($RUN/NODE-bird.ctl, for birdc -s) and log.
start_bird() {
    ip netns exec "$P-$1" setsid bird -f -c "$2" -s "$RUN/$1-bird.ctl" -P "$RUN/$1-bird.pid" \
        </dev/null >>"$RUN/$1-bird.log" 2>&1 &
}

# bird NODE CONFIG: the node's BIRD config from `xlb ha bird` for CONFIG, run in
# NODE as on a real node (it checks that the router is on a link there), then BIRD.
node_bird() {
    local node=$1 config=$2 n conf
    case " $LB_NODES " in *" $node "*) ;; *) die "BIRD for xlb runs on $LB_NODES" ;; esac
    n=${node#node}
    conf=$RUN/$node-bird.conf
    nsx "$node" "$XLB" ha bird --router 10.1.2.1 --as 65001 --peer-as 65000 --table "$TABLE" \
        --router-id "10.1.2.1$n" "$config" >"$conf"
    start_bird "$node" "$conf"
}

[ "$(id -u)" = 0 ] || die "must run as root (network namespaces)"
cmd=${1:-}
[ $# -gt 0 ] && shift
case $cmd in
    up) ecmp_up ;;
    down) cmd_down ;;
    bird) [ $# -eq 2 ] || usage; node_bird "$1" "$2" ;;
    # Prints when the drop took effect (Unix time), for measuring what follows.
    silence) [ $# -eq 1 ] || usage; silence "$1"; date +%s.%N ;;
    exec) cmd_exec "$@" ;;
    *) usage ;;
esac
