#!/bin/bash
# An active/backup pair of balancers, elected by keepalived (VRRP), in network
# namespaces "$XLB_LAB-<node>" (default prefix "xlbk"). Built from lab.sh's
# helpers; nothing is added to the root namespace.
#
#   node    dev   address             segment   notes
#   client  eth0  10.1.1.10/24        br-ext    ARPs for the VIP 10.1.1.101 itself
#   lb1     eth0  10.1.1.11/24        br-ext    xlb; keepalived priority 250
#           eth1  10.1.11.11/24       br-int    + 10.1.11.1/24 while active (keepalived)
#   lb2     eth0  10.1.1.12/24        br-ext    xlb; keepalived priority 240
#           eth1  10.1.11.12/24       br-int    + 10.1.11.1/24 while active (keepalived)
#   was1/2  eth0  10.1.11.101|102/24  br-int    default via 10.1.11.1: the active node
#
# Both nodes run the same xlb config (`xlb up --config FILE --role backup`);
# keepalived, started with `keepalived NODE FILE`, runs VRRP on eth1 (unicast
# to the peer, advert_int $HA_ADVERT_INT, default 0.1 s) and tells xlb its
# role through `xlb ha follow`. The priorities are close (250, 240): a backup
# waits (256 - priority)/256 of an advert interval beyond 3 missed adverts.
#
# Usage: ha-pair.sh up | down | keepalived NODE CONFIG | stop-keepalived NODE | crash NODE | exec NODE CMD...
set -eu
export XLB_LAB=${XLB_LAB:-xlbk}
# shellcheck source=lab.sh
. "$(dirname "$(readlink -f "$0")")/lab.sh"
NODES="sw client lb1 lb2 was1 was2"
SERVER_NODES="was1 was2"
XLB=$(readlink -f "$HERE/..")/.venv/bin/xlb
ADVERT_INT=${HA_ADVERT_INT:-0.1}

pair_up() {
    local n
    if lab_is_up; then say "already up"; return 0; fi
    if lab_exists_any; then cmd_down; fi
    trap up_failed EXIT
    mkdir -p "$RUN"
    make_namespaces
    make_switch
    make_client
    make_balancer lb1 10.1.1.11/24 10.1.11.11/24
    make_balancer lb2 10.1.1.12/24 10.1.11.12/24
    make_was was1 101
    make_was was2 102
    for n in $SERVER_NODES; do server_start "$n"; done
    touch "$RUN/up"
    trap - EXIT
    say "up: client 10.1.1.10, lb1 10.1.1.11/10.1.11.11, lb2 10.1.1.12/10.1.11.12, was1/2 10.1.11.101/102 (gateway 10.1.11.1)"
}

# keepalived NODE CONFIG: keepalived's config from `xlb ha keepalived`, run in
# NODE as on a real node (it checks the links it names there), then keepalived
# (VRRP only) in the background of NODE; its log is $RUN/NODE-keepalived.log.
start_keepalived() {
    local node=$1 config=$2 peer prio conf
    case $node in
        lb1) peer=10.1.11.12; prio=250 ;;
        lb2) peer=10.1.11.11; prio=240 ;;
        *) die "keepalived runs on lb1 or lb2, not '$node'" ;;
    esac
    conf=$RUN/$node-keepalived.conf
    nsx "$node" "$XLB" ha keepalived --peer "$peer" --interface eth1 --priority "$prio" \
        --advert-int "$ADVERT_INT" --gateway 10.1.11.1/24 --fifo "$RUN/$node-keepalived.fifo" \
        --track-file "$RUN/$node-xlb.serving" "$config" >"$conf"
    # Own pid files: the defaults under /run are shared by every namespace.
    ip netns exec "$P-$node" setsid keepalived --vrrp --dont-fork --log-console \
        --use-file "$conf" --pid "$RUN/$node-keepalived.pid" \
        --vrrp_pid "$RUN/$node-keepalived-vrrp.pid" \
        </dev/null >>"$RUN/$node-keepalived.log" 2>&1 &
}

# stop-keepalived NODE: keepalived stops as `systemctl stop` stops it: SIGTERM to
# every process of its unit at once (KillMode=control-group), here of its session
# (setsid): keepalived, its VRRP process and `xlb ha follow`, which keepalived ends
# too (SIGTERM again). keepalived resigns (priority 0) and gives up the gateway.
stop_keepalived() {
    local pid i
    pid=$(cat "$RUN/$1-keepalived.pid") || die "no keepalived runs on '$1'"
    # shellcheck disable=SC2046
    kill -TERM $(ps -o pid= -s "$pid") 2>/dev/null || true    # one may have ended since
    for i in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    die "keepalived on '$1' did not stop within 5 s"
}

# crash NODE: the node dies at once: every process in it (keepalived, its VRRP
# child, xlb ha follow, xlb) is frozen, the switch drops its frames (see silence
# in lab.sh), then the processes are killed. Frozen first: keepalived's VRRP child
# gets SIGTERM when its parent dies and would resign (priority 0) as in a clean stop.
# Prints when the node froze (Unix time), for measuring what follows.
crash() {
    local pids
    pids=$(ip netns pids "$P-$1")
    # shellcheck disable=SC2086
    [ -z "$pids" ] || kill -STOP $pids
    date +%s.%N
    silence "$1"
    # shellcheck disable=SC2086
    [ -z "$pids" ] || kill -KILL $pids
}

[ "$(id -u)" = 0 ] || die "must run as root (network namespaces)"
cmd=${1:-}
[ $# -gt 0 ] && shift
case $cmd in
    up) pair_up ;;
    down) cmd_down ;;
    keepalived) [ $# -eq 2 ] || usage; start_keepalived "$1" "$2" ;;
    stop-keepalived) [ $# -eq 1 ] || usage; stop_keepalived "$1" ;;
    crash) [ $# -eq 1 ] || usage; crash "$1" ;;
    exec) cmd_exec "$@" ;;
    *) usage ;;
esac
