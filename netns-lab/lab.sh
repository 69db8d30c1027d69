#!/bin/bash
# The xlb network-namespace lab: a client segment, a routed client behind a
# firewall, the balancer, two web servers (WAS) and two databases, all in network
# namespaces named "$XLB_LAB-<node>" (default prefix "xlb"), joined by bridges in
# a switch namespace. Nothing is added to the root namespace: every veth is created
# with both ends directly inside lab namespaces.
#
#   node    dev   address             segment               routes, services
#   client  eth0  10.1.1.10/24        br-ext                default via 10.1.1.1 (lb)
#   fwex    eth0  10.1.1.2/24         br-ext                10.1.1.101/32, 10.1.11.0/24 via 10.1.1.1
#           eth1  198.51.100.1/24     veth to remote        ip_forward
#   remote  eth0  198.51.100.10/24    veth to fwex          default via 198.51.100.1
#   lb      eth0  10.1.1.1/24         br-ext                198.51.100.0/24 via 10.1.1.2
#           eth1  10.1.11.1/24        br-int                ip_forward, rp_filter 0
#   was1/2  eth0  10.1.11.101|102/24  br-int                default via 10.1.11.1; http+udp :8080
#           eth1  10.1.12.101|102/24  br-db
#   db1/2   eth0  10.1.12.201|202/24  br-db                 tcp :5432; no default route
# The bridges live in "$P-sw". The VIP 10.1.1.101:80 is no namespace's address: xlb,
# run in lb with XDP on eth0, answers its ARP and balances it over WAS1 and WAS2.
#
# Usage: lab.sh up | down | status | check | exec NODE CMD... | server stop|start NODE
set -eu
# Whatever the caller's: $RUN holds the HA pairs' track files, which `xlb ha
# follow` refuses in a directory others may write.
umask 022

P=${XLB_LAB:-xlb}
HERE=$(dirname "$(readlink -f "$0")")
RUN=/run/xlb-lab/$P
PY=/usr/bin/python3
SERVERS=$HERE/servers.py
NODES="sw client fwex remote lb was1 was2 db1 db2"
SERVER_NODES="was1 was2 db1 db2"
READY_TIMEOUT=5     # seconds a server gets to accept connections after its start
STOP_TIMEOUT=3      # seconds a process gets to exit on SIGTERM before SIGKILL

case $P in
    *[!A-Za-z0-9_-]* | "" | -*) echo "lab.sh: bad XLB_LAB prefix '$P'" >&2; exit 2 ;;
esac

say() { echo "lab[$P]: $*"; }
die() { echo "lab[$P]: $*" >&2; exit 1; }
nsx() { local n=$1; shift; ip netns exec "$P-$n" "$@"; }   # run in a node's namespace
ns_exists() { [ -e "/run/netns/$P-$1" ]; }
is_node() { case " $NODES " in *" $1 "*) return 0 ;; esac; return 1; }
sysctl_in() { local n=$1; shift; nsx "$n" sysctl -q -w "$@" >/dev/null; }

# --- processes ------------------------------------------------------------------

# Alive and not a zombie (a server started by this very shell lingers as a zombie
# until reaped, and kill -0 would still succeed on it).
pid_alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [ "${stat%% *}" != Z ]
}

# wait_gone SECONDS PID...: true once none of the PIDs is alive.
wait_gone() {
    local deadline=$((SECONDS + $1)) p busy; shift
    while :; do
        busy=0
        for p in "$@"; do pid_alive "$p" && busy=1; done
        [ $busy = 0 ] && return 0
        [ $SECONDS -ge "$deadline" ] && return 1
        sleep 0.1
    done
}

# terminate PID...: SIGTERM, then SIGKILL whatever is left after STOP_TIMEOUT.
terminate() {
    [ $# -gt 0 ] || return 0
    kill -TERM "$@" 2>/dev/null || true
    wait_gone "$STOP_TIMEOUT" "$@" && return 0
    kill -KILL "$@" 2>/dev/null || true
    wait_gone 2 "$@" || echo "lab[$P]: warning: pids still alive: $*" >&2
}

# --- servers --------------------------------------------------------------------

server_args() {
    case $1 in
        was1) echo "web --name WAS1 --port 8080" ;;
        was2) echo "web --name WAS2 --port 8080" ;;
        db1)  echo "db --name DB1 --port 5432" ;;
        db2)  echo "db --name DB2 --port 5432" ;;
        *) return 1 ;;
    esac
}
server_port() { case $1 in was*) echo 8080 ;; *) echo 5432 ;; esac; }

# The pid from the node's pidfile, if that process is alive and is that node's
# server (a stale pidfile must never make us kill an unrelated process). Matched by
# command line rather than namespace, so a server whose namespace was deleted
# under it is still found and stopped.
server_pid() {
    local pid cmdline
    pid=$(cat "$RUN/$1.pid" 2>/dev/null) || return 1
    [ -n "$pid" ] && pid_alive "$pid" || return 1
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    case $cmdline in
        *servers.py*" --pidfile $RUN/$1.pid "*) echo "$pid" ;;
        *) return 1 ;;
    esac
}

server_stop() {
    local pid
    if pid=$(server_pid "$1"); then
        terminate "$pid"
    fi
    rm -f "$RUN/$1.pid"
}

# Starts (or restarts) a node's server and waits until its TCP listener accepts.
server_start() {
    local node=$1 args port deadline child
    args=$(server_args "$node") || die "node '$node' has no server (have: $SERVER_NODES)"
    ns_exists "$node" || die "namespace $P-$node does not exist (lab.sh up first)"
    port=$(server_port "$node")
    server_stop "$node"
    mkdir -p "$RUN"
    # setsid: its own session, so the server outlives this shell and its terminal.
    # shellcheck disable=SC2086  # $args is a word list
    ip netns exec "$P-$node" setsid "$PY" "$SERVERS" $args --pidfile "$RUN/$node.pid" \
        </dev/null >>"$RUN/$node.log" 2>&1 &
    child=$!
    deadline=$((SECONDS + READY_TIMEOUT))
    until nsx "$node" timeout 1 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0"' "$port" 2>/dev/null; do
        if ! pid_alive "$child" || [ $SECONDS -ge "$deadline" ]; then
            echo "lab[$P]: $node: server not accepting on :$port (exited, or not within ${READY_TIMEOUT}s); log:" >&2
            tail -n 20 "$RUN/$node.log" >&2 || true
            return 1
        fi
        sleep 0.1
    done
}

# --- topology -------------------------------------------------------------------

make_namespaces() {
    local n
    for n in $NODES; do
        ip netns add "$P-$n"
        # The lab is IPv4-only. Without IPv6, no node (and in particular no switch
        # port) gets a link-local address, and no ND/MLD chatter crosses the
        # balancer's XDP hook or the bridges.
        sysctl_in "$n" net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
        ip -n "$P-$n" link set lo up
    done
}

# With tx checksum offload a veth hands its peer partial checksums
# (CHECKSUM_PARTIAL), and an XDP program rewriting such a packet would have to
# complete them; real NICs deliver full checksums, so the lab turns offload off,
# on every veth end.
tx_off() { nsx "$1" ethtool -K "$2" tx off >/dev/null; }

# The switch: three bridges, no addresses; STP off and no forward delay, so a new
# port forwards at once. Where the kernel has br_netfilter (built in on some), a
# bridge would also run every IPv4 frame through the switch namespace's IP
# hooks: work no real switch does (here it cost every path a fifth of its UDP
# packets/s).
make_switch() {
    local br
    if nsx sw test -d /proc/sys/net/bridge; then
        sysctl_in sw net.bridge.bridge-nf-call-iptables=0 \
            net.bridge.bridge-nf-call-ip6tables=0 net.bridge.bridge-nf-call-arptables=0
    fi
    for br in br-ext br-int br-db; do
        ip -n "$P-sw" link add "$br" type bridge
        ip -n "$P-sw" link set "$br" type bridge stp_state 0 forward_delay 0
        ip -n "$P-sw" link set "$br" up
    done
}

# plug NODE DEV BRIDGE: a veth from NODE's DEV to the switch port "NODE-DEV" on BRIDGE.
plug() {
    local node=$1 dev=$2 br=$3 port=$1-$2
    ip -n "$P-$node" link add "$dev" type veth peer name "$port" netns "$P-sw"
    ip -n "$P-sw" link set "$port" master "$br"
    tx_off "$node" "$dev"
    tx_off sw "$port"
    ip -n "$P-sw" link set "$port" up
    ip -n "$P-$node" link set "$dev" up
}

# wire NODE DEV PEER PEER-DEV: a veth straight from NODE's DEV to PEER's PEER-DEV.
wire() {
    ip -n "$P-$1" link add "$2" type veth peer name "$4" netns "$P-$3"
    tx_off "$1" "$2"
    tx_off "$3" "$4"
    ip -n "$P-$1" link set "$2" up
    ip -n "$P-$3" link set "$4" up
}

# silence NODE: the switch drops every frame from and to NODE's ports, which stay
# up: a hung machine, or, to the other nodes, a dead one (a veth has no MAC filter,
# so a port that went down would have the bridge flood the dead node's frames to
# every other node, whose XDP programs see them as a real NIC's would not).
silence() {
    nsx sw nft -f - <<EOF
table bridge xlb_silence_$1 {
    chain forward {
        type filter hook forward priority 0; policy accept;
        iifname "$1-*" drop
        oifname "$1-*" drop
    }
}
EOF
}

addr() { ip -n "$P-$1" addr add "$3" dev "$2"; }
route() { local n=$1; shift; ip -n "$P-$n" route add "$@"; }

make_client() {
    plug client eth0 br-ext
    addr client eth0 10.1.1.10/24
    # On the VIP's subnet: the client ARPs for 10.1.1.101 itself (xlb answers).
    route client default via 10.1.1.1
}

make_fwex_remote() {
    plug fwex eth0 br-ext
    addr fwex eth0 10.1.1.2/24
    wire fwex eth1 remote eth0
    addr fwex eth1 198.51.100.1/24
    sysctl_in fwex net.ipv4.ip_forward=1
    # The balancer is the VIP's gateway for routed clients, and the way to the WAS
    # segment (lab check: remote reaches a WAS directly).
    route fwex 10.1.1.101/32 via 10.1.1.1
    route fwex 10.1.11.0/24 via 10.1.1.1
    addr remote eth0 198.51.100.10/24
    route remote default via 198.51.100.1
}

# A node that runs xlb (here and in ha-pair.sh, ha-ecmp.sh): eth0 on br-ext,
# eth1 on br-int, forwarding.
make_balancer() {   # make_balancer NODE ETH0-ADDR/LEN ETH1-ADDR/LEN
    plug "$1" eth0 br-ext
    plug "$1" eth1 br-int
    # A veth delivers its peer's XDP_TX frames only when it runs an XDP program
    # of its own; xlb answers ARP for the VIP with XDP_TX (see xdp_pass.py).
    nsx sw "$PY" "$HERE/xdp_pass.py" "$1-eth0" "$1-eth1"
    addr "$1" eth0 "$2"
    addr "$1" eth1 "$3"
    sysctl_in "$1" net.ipv4.ip_forward=1
    # Reverse-NATed replies leave with the VIP as source but arrive on eth1:
    # strict reverse-path filtering would drop them.
    sysctl_in "$1" net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 \
        net.ipv4.conf.eth0.rp_filter=0 net.ipv4.conf.eth1.rp_filter=0
}

make_lb() {
    make_balancer lb 10.1.1.1/24 10.1.11.1/24
    route lb 198.51.100.0/24 via 10.1.1.2
    # Deliberately no route to 10.1.12.0/24: the databases stay out of clients' reach.
}

make_was() {   # make_was NODE LAST-OCTET
    plug "$1" eth0 br-int
    plug "$1" eth1 br-db
    addr "$1" eth0 "10.1.11.$2/24"
    addr "$1" eth1 "10.1.12.$2/24"
    route "$1" default via 10.1.11.1
}

make_db() {    # make_db NODE LAST-OCTET; no default route: reachable from the WAS only
    plug "$1" eth0 br-db
    addr "$1" eth0 "10.1.12.$2/24"
}

# --- commands -------------------------------------------------------------------

# The topology was completed by an up (the marker is written last) and still exists.
lab_built() {
    local n
    [ -f "$RUN/up" ] || return 1
    for n in $NODES; do ns_exists "$n" || return 1; done
}

lab_is_up() {
    local n
    lab_built || return 1
    for n in $SERVER_NODES; do server_pid "$n" >/dev/null || return 1; done
}

lab_exists_any() {
    local n
    [ -e "$RUN" ] && return 0
    for n in $NODES; do ns_exists "$n" && return 0; done
    return 1
}

summary() {
    cat <<EOF
lab[$P]: up. Namespaces $P-{${NODES// /,}}
  client  10.1.1.10      default via lb 10.1.1.1        VIP 10.1.1.101:80 (xlb answers its ARP)
  remote  198.51.100.10  via fwex 198.51.100.1 / 10.1.1.2
  lb      eth0 10.1.1.1  eth1 10.1.11.1   (start xlb here: lab.sh exec lb ...)
  was1/2  10.1.11.101/102:8080 http+udp   10.1.12.101/102 on br-db
  db1/2   10.1.12.201/202:5432
  logs, pidfiles: $RUN
EOF
}

up_failed() {
    local rc=$?
    trap - EXIT INT TERM
    if [ "$rc" -ne 0 ]; then
        echo "lab[$P]: up failed (exit $rc): tearing down what was made" >&2
        set +e
        cmd_down >/dev/null
    fi
    exit "$rc"
}

cmd_up() {
    local n
    if lab_is_up; then
        say "already up"
        return 0
    fi
    if lab_exists_any; then
        say "partially present: tearing it down to rebuild"
        cmd_down
    fi
    trap up_failed EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    mkdir -p "$RUN"
    make_namespaces
    make_switch
    make_client
    make_fwex_remote
    make_lb
    make_was was1 101
    make_was was2 102
    make_db db1 201
    make_db db2 202
    for n in $SERVER_NODES; do server_start "$n"; done
    touch "$RUN/up"
    trap - EXIT INT TERM
    summary
}

cmd_down() {
    local n pids round ino
    if ! lab_exists_any; then
        say "nothing to tear down"
        return 0
    fi
    for n in $SERVER_NODES; do server_stop "$n"; done
    for n in $NODES; do
        ns_exists "$n" || continue
        # Anything else still running there (xlb in lb, a shell from lab.sh exec...);
        # a few rounds, for children forked while their parents were being stopped.
        for round in 1 2 3; do
            pids=$(ip netns pids "$P-$n" 2>/dev/null || true)
            [ -n "$pids" ] || break
            # shellcheck disable=SC2086
            terminate $pids
        done
        # xlb's state and control socket directories for this namespace
        # (control/state.py, control/ctl.py): nothing can start there again.
        ino=$(stat -c %i "/run/netns/$P-$n")
        rm -rf "${XLB_STATE_DIR:-/var/lib/xlb}/netns-$ino" "/run/xlb/netns-$ino"
        ip netns del "$P-$n"
    done
    rm -rf "$RUN"
    rmdir /run/xlb-lab 2>/dev/null || true   # when no other prefix's lab is left
    say "down"
}

cmd_status() {
    local n pid
    if lab_is_up; then say "up"; else say "not (fully) up"; fi
    for n in $NODES; do
        if ns_exists "$n"; then echo "  $P-$n: present"; else echo "  $P-$n: absent"; fi
    done
    for n in $SERVER_NODES; do
        if pid=$(server_pid "$n"); then echo "  server $n: pid $pid"; else echo "  server $n: stopped"; fi
    done
    lab_is_up
}

# probe DESCRIPTION EXPECTED NODE CMD...: CMD in NODE must print EXPECTED.
CHECK_FAILED=0
probe() {
    local desc=$1 want=$2 node=$3 got; shift 3
    got=$(nsx "$node" timeout 5 "$@" 2>&1) || true
    if [ "$got" = "$want" ]; then
        echo "  ok    $desc"
    else
        echo "  FAIL  $desc: wanted '$want', got '${got//$'\n'/ }'"
        CHECK_FAILED=1
    fi
}

cmd_check() {
    local w d
    # Only the topology is required: a stopped server shows as a failed probe.
    lab_built || die "lab is not up (lab.sh up)"
    say "checks"
    for w in was1 was2; do
        for d in 1 2; do
            probe "$w reads DB$d at 10.1.12.20$d:5432" "DB$d" "$w" \
                timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1" && cat <&3' "10.1.12.20$d" 5432
        done
    done
    probe "client gets WAS1 over http at 10.1.11.101:8080 (routed by lb)" WAS1 client \
        curl -sS --noproxy '*' --connect-timeout 2 --max-time 3 http://10.1.11.101:8080/
    probe "client gets WAS1 over udp at 10.1.11.101:8080" WAS1 client \
        "$PY" "$SERVERS" udp-probe 10.1.11.101 8080 --timeout 2
    probe "remote gets WAS2 over http at 10.1.11.102:8080 (via fwex, lb)" WAS2 remote \
        curl -sS --noproxy '*' --connect-timeout 2 --max-time 3 http://10.1.11.102:8080/
    # The databases must be out of the clients' reach (lb has no route there).
    if nsx client timeout 2 bash -c 'exec 3<>/dev/tcp/10.1.12.201/5432' 2>/dev/null; then
        echo "  FAIL  client must not reach db1 at 10.1.12.201:5432, but connected"
        CHECK_FAILED=1
    else
        echo "  ok    client cannot reach db1 at 10.1.12.201:5432"
    fi
    [ "$CHECK_FAILED" = 0 ] || die "check FAILED"
    say "all checks passed"
}

usage() {
    sed -n 's/^# Usage: //p' "$0" >&2
    exit 2
}

cmd_exec() {   # cmd_exec NODE CMD...
    [ $# -ge 2 ] || usage
    is_node "$1" || die "unknown node '$1' (nodes: $NODES)"
    ns_exists "$1" || die "namespace $P-$1 does not exist (up first)"
    local node=$1; shift
    exec ip netns exec "$P-$node" "$@"
}

# Sourced (by ha-pair.sh, ha-ecmp.sh): the helpers above, no command.
[ "${BASH_SOURCE[0]}" = "$0" ] || return 0
[ "$(id -u)" = 0 ] || die "must run as root (network namespaces)"
cmd=${1:-}
[ $# -gt 0 ] && shift
case $cmd in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    check) cmd_check ;;
    exec) cmd_exec "$@" ;;
    server)
        [ $# -eq 2 ] || usage
        case $1 in
            stop) server_args "$2" >/dev/null || die "node '$2' has no server (have: $SERVER_NODES)"
                  server_stop "$2"; say "server $2 stopped" ;;
            start) server_start "$2"; say "server $2 started (pid $(server_pid "$2"))" ;;
            *) usage ;;
        esac ;;
    *) usage ;;
esac
