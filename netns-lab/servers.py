#!/usr/bin/python3
"""Backend servers of the netns lab (Python standard library only).

    servers.py web --name WAS1 --port 8080 [--pidfile F]
        HTTP/1.1 (keep-alive) on TCP PORT: every GET answers 200 "WAS1\\n",
        GET /delay/S after S seconds (at most MAX_DELAY: a response in flight),
        GET /pad/N the name padded with dots to N bytes (at most MAX_PAD: a
        response in many full-size segments),
        GET /hold/NAME once a file NAME (letters, digits, _) exists beside the
        pidfile (at most MAX_HOLD seconds: a response in flight until a test
        releases it), the file NAME.held made there as the request comes (for
        a test to know it reached a server);
        UDP on the same port: every datagram is answered with "WAS1\\n", padded
        with dots to the datagram's length where that is longer (a large answer).
    servers.py db --name DB1 --port 5432 [--pidfile F]
        TCP: sends "DB1\\n" to each connection, then closes it.
    servers.py web ... --status 500
        The same web server, answering every GET with that status.
    servers.py web ... --tls PEM
        The same web server, HTTPS on its TCP port: PEM holds the certificate
        and its key (each connection's handshake on its own thread).
    servers.py hang --name X --port N
        Accepts TCP connections and never answers (a stuck server).
    servers.py udp-probe HOST PORT [--timeout S]
        Client helper: sends one datagram, prints the reply (exit 1 on timeout).

The servers write their pidfile once their sockets listen, log nothing per
request, and exit cleanly (exit status 0) on SIGTERM or SIGINT.
"""

import argparse
import http.server
import os
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time

# Load tests open many connections at once: keep the accept queue long.
BACKLOG = 1024
# An idle keep-alive connection is dropped after this many seconds, so that
# clients that vanish (e.g. flows the balancer dropped) do not pin threads forever.
IDLE_TIMEOUT = 120
MAX_DELAY = 10.0
MAX_HOLD = 60.0
MAX_PAD = 1 << 20
ANY = "0.0.0.0"     # the servers listen on every address of their namespace


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def write_pidfile(path):
    if not path:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.rename(tmp, path)  # atomic: readers never see a half-written file


def remove_pidfile(path):
    if not path:
        return
    try:
        with open(path) as f:
            mine = f.read().strip() == str(os.getpid())
        if mine:  # a newer instance may already own it
            os.unlink(path)
    except OSError:
        pass


def _terminate(signum, _frame):
    # Raised in the main thread, which sits in serve_forever(): unwinds to `finally`.
    raise SystemExit(0)


class LabServer:
    """What the web and db servers share: a long accept queue, and a stop that
    waits for no connection's thread."""
    request_queue_size = BACKLOG
    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False


class QuietHTTPServer(LabServer, http.server.ThreadingHTTPServer):

    def server_bind(self):
        # HTTPServer.server_bind() resolves the host name (socket.getfqdn), which
        # can stall on DNS inside an isolated namespace; nothing here needs it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class QuietHTTPSServer(QuietHTTPServer):

    def __init__(self, address, handler, pem):
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(pem)
        super().__init__(address, handler)

    def finish_request(self, request, client_address):
        # On the connection's thread: a client slow to shake hands holds no other.
        request.settimeout(IDLE_TIMEOUT)
        try:
            tls = self.tls.wrap_socket(request, server_side=True)
        except OSError:     # no TLS client, or gone: nothing to answer
            return
        with tls:
            super().finish_request(tls, client_address)


def held(path):
    """Waits until path exists, at most MAX_HOLD seconds."""
    deadline = time.monotonic() + MAX_HOLD
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)


def make_web_handler(body, status=200, run_dir=None):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: needs Content-Length
        timeout = IDLE_TIMEOUT
        # Buffered: the response leaves in one segment, as nginx sends a small
        # one. Written unbuffered, the body waits (Nagle) for the ACK of the
        # header; if a balancer node dies just then, the client waits silently
        # and the server retransmits to the dead node until the client gives
        # up (the HA labs' servers reply through the node that last delivered).
        # handle_one_request flushes after every response.
        wbufsize = -1

        def _answer(self, with_body, answer=body):
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            if with_body:
                self.wfile.write(answer)

        def do_GET(self):
            prefix, _, seconds = self.path.partition("/delay/")
            if not prefix and seconds:
                try:
                    time.sleep(min(max(float(seconds), 0.0), MAX_DELAY))
                except ValueError:
                    pass
            prefix, _, name = self.path.partition("/hold/")
            if not prefix and run_dir and name.isidentifier():
                open(os.path.join(run_dir, f"{name}.held"), "w").close()
                held(os.path.join(run_dir, name))
            prefix, _, size = self.path.partition("/pad/")
            if not prefix and size.isdigit():
                self._answer(True, body.ljust(min(int(size), MAX_PAD), b"."))
                return
            self._answer(True)

        def do_HEAD(self):
            self._answer(False)

        def log_message(self, *args):  # quiet: no line per request
            pass

    return Handler


def udp_echo_name(sock, body):
    while True:
        try:
            data, peer = sock.recvfrom(65535)
            sock.sendto(body.ljust(len(data), b"."), peer)
        except OSError:
            if sock.fileno() < 0:
                return


def run_web(args):
    body = f"{args.name}\n".encode()
    # UDP first: once the TCP listener accepts (what lab.sh waits for), both are ready.
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    udp.bind((ANY, args.port))
    threading.Thread(target=udp_echo_name, args=(udp, body), daemon=True).start()
    handler = make_web_handler(body, args.status,
                               args.pidfile and os.path.dirname(os.path.abspath(args.pidfile)))
    if args.tls:
        httpd = QuietHTTPSServer((ANY, args.port), handler, args.tls)
    else:
        httpd = QuietHTTPServer((ANY, args.port), handler)
    serve(httpd, args, f"{args.name}: {'https' if args.tls else 'http'}+udp on "
                       f"{ANY}:{args.port}")
    udp.close()


class DBHandler(socketserver.BaseRequestHandler):
    def handle(self):
        sock = self.request
        sock.settimeout(2)
        try:
            sock.sendall(self.server.body)
            # Half-close, then drain: closing with unread input would send a RST,
            # which can make the client lose the name it has not read yet.
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(4096):
                pass
        except OSError:
            pass


class DBServer(LabServer, socketserver.ThreadingTCPServer):
    pass


def run_db(args):
    server = DBServer((ANY, args.port), DBHandler)
    server.body = f"{args.name}\n".encode()
    serve(server, args, f"{args.name}: tcp on {ANY}:{args.port}")


def serve(server, args, what):
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    write_pidfile(args.pidfile)
    log(f"{what} (pid {os.getpid()})")
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        remove_pidfile(args.pidfile)
        log(f"{args.name}: stopped")


def run_udp_probe(args):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(args.timeout)
        try:
            s.sendto(b"ping\n", (args.host, args.port))
            data, _ = s.recvfrom(65535)
        except OSError as e:  # socket.timeout is an OSError
            print(f"udp-probe {args.host}:{args.port}: {e or 'timed out'}", file=sys.stderr)
            return 1
    sys.stdout.write(data.decode(errors="replace"))
    return 0


def run_hang(args):
    """Accepts connections and never answers: a server that is up but stuck."""
    held = []
    with socket.create_server((ANY, args.port), backlog=BACKLOG, reuse_port=False) as srv:
        srv.settimeout(0.2)
        write_pidfile(args.pidfile)
        signal.signal(signal.SIGTERM, _terminate)
        try:
            while True:
                try:
                    held.append(srv.accept()[0])
                except socket.timeout:
                    pass
        finally:
            for conn in held:
                conn.close()
            remove_pidfile(args.pidfile)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for cmd in ("web", "db", "hang"):
        p = sub.add_parser(cmd)
        p.add_argument("--name", required=True)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--pidfile")
        if cmd == "web":
            p.add_argument("--status", type=int, default=200)
            p.add_argument("--tls", metavar="PEM")
    p = sub.add_parser("udp-probe")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--timeout", type=float, default=2.0)
    args = ap.parse_args(argv)
    if args.cmd == "web":
        run_web(args)
    elif args.cmd == "db":
        run_db(args)
    elif args.cmd == "hang":
        run_hang(args)
    else:
        return run_udp_probe(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
