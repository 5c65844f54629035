#!/usr/bin/env python3
"""Real clients and servers for the gateway's end-to-end tests.

Each subcommand runs inside a network namespace the test made (the test starts
it with `ip netns exec`), prints one JSON line with what it saw (the streaming
client prints its backend first, `hold` what it holds before it closes), and
is bounded in time and count. Addresses are the test's, all in 198.18.0.0/15.
The servers name the peer they saw (`backend-N from ADDR:PORT`), so a test
can tell source NAT (the gateway's address) from DSR and routed (the
client's).
"""
import json
import os
import select
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HTTP_PORT, STREAM_PORT, UDP_PORT = 8080, 9000, 9001


def out(obj):
    print(json.dumps(obj), flush=True)


# --- servers (backend namespaces) -------------------------------------------

def serve(name, addrs, seconds):
    """HTTP, a streaming echo and a UDP echo on each of `addrs` (comma
    separated: the backend's own address, and for DSR the VIP on lo). Each
    answer names the backend and the peer address and port it saw."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self):
            peer = "%s:%d" % self.client_address[:2]
            body = f"{name} from {peer}\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    ThreadingHTTPServer.allow_reuse_address = True
    ThreadingHTTPServer.daemon_threads = True

    # Stream: greet with our name and the peer, then echo everything back.
    def echo(conn, peer):
        with conn:
            conn.sendall(f"{name} from {peer[0]}:{peer[1]}\n".encode())
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)

    def accept(lst):
        while True:
            c, peer = lst.accept()
            threading.Thread(target=echo, args=(c, peer), daemon=True).start()

    # UDP: `name:payload`; `whoami` is answered with the peer it came from.
    def udp_echo(udp):
        while True:
            data, peer = udp.recvfrom(65536)
            if data == b"whoami":
                data = f"whoami from {peer[0]}:{peer[1]}".encode()
            udp.sendto(name.encode() + b":" + data, peer)

    for addr in addrs.split(","):
        http = ThreadingHTTPServer((addr, HTTP_PORT), Handler)
        threading.Thread(target=http.serve_forever, daemon=True).start()
        lst = socket.socket()
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind((addr, STREAM_PORT))
        lst.listen(64)
        threading.Thread(target=accept, args=(lst,), daemon=True).start()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((addr, UDP_PORT))
        threading.Thread(target=udp_echo, args=(udp,), daemon=True).start()
    out({"serving": name})
    time.sleep(seconds)


def decap(tun, seconds):
    """Userspace IPv4-in-IPv4 decapsulation for DSR where the kernel has no
    IPIP: every protocol-4 packet to this namespace (a raw socket gets a copy;
    with no IPIP handler the kernel drops its own) goes, without its outer
    header, into the tun device `tun`, so the kernel receives the client's
    packet as an ipip device would hand it over."""
    TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
    import fcntl
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", tun.encode(), IFF_TUN | IFF_NO_PI))
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, 4)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    out({"decap": tun})
    n = bad = 0
    end = time.time() + seconds
    while time.time() < end:
        r, _, _ = select.select([raw], [], [], 0.2)
        if not r:
            continue
        pkt = raw.recv(65536)
        ihl = (pkt[0] & 0xF) * 4
        inner = pkt[ihl:]
        if len(inner) < 20 or inner[0] >> 4 != 4:
            bad += 1
            continue
        os.write(fd, inner)
        n += 1
    out({"decapsulated": n, "bad": bad})


def listen(addr, port, seconds):
    """A plain TCP listener on the gateway's own address (test 5)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(16)
    out({"listening": port})
    s.settimeout(seconds)
    try:
        while True:
            c, _ = s.accept()
            c.sendall(b"node\n")
            c.close()
    except socket.timeout:
        pass


# --- clients (client namespace) ---------------------------------------------

def http_spread(vip, port, n, timeout=3.0, max_errors=20):
    """`n` HTTP/1.0 requests, one connection each: answers per backend, and
    per backend the peer addresses and ports it reported. With $BIND set,
    the connections come from that local address."""
    counts, errors, peers = {}, [], {}
    source = (os.environ["BIND"], 0) if os.environ.get("BIND") else None
    for i in range(n):
        try:
            with socket.create_connection((vip, port), timeout=timeout,
                                          source_address=source) as c:
                c.sendall(b"GET / HTTP/1.0\r\nHost: vip\r\n\r\n")
                data = b""
                while True:
                    chunk = c.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            body = data.split(b"\r\n\r\n", 1)[1].decode().split()
            name = body[0]
            counts[name] = counts.get(name, 0) + 1
            if len(body) == 3 and body[1] == "from":
                addr, _, p = body[2].rpartition(":")
                peers.setdefault(name, {}).setdefault(addr, []).append(int(p))
        except Exception as e:  # noqa: BLE001 - every failure is reported
            errors.append(f"{i}: {e!r}")
            if len(errors) >= max_errors:
                break
    out({"counts": counts, "errors": errors, "peers": peers})


def read_greeting(c):
    """The backend's one-line greeting on a new connection (`backend-N from
    ADDR:PORT\n`), as bytes; shorter if the connection closes first."""
    greeting = b""
    while not greeting.endswith(b"\n"):
        b = c.recv(1)
        if not b:
            break
        greeting += b
    return greeting


def stream(vip, port, seconds, chunk):
    """One long-lived connection: send a counter pattern, read the echo, check
    every byte; report the backend first, then the totals."""
    c = socket.create_connection((vip, port), timeout=5)
    greeting = read_greeting(c)
    words = greeting.decode().split()
    backend = words[0] if words else ""
    out({"backend": backend, "peer": words[2] if len(words) == 3 else None})
    c.setblocking(False)
    sent = received = 0
    mismatch = None
    error = None
    # Long enough for any offset plus a whole read (65536) or chunk.
    pattern = bytes(range(256)) * (max(chunk, 65536) // 256 + 2)
    deadline = time.time() + seconds
    pending = b""
    try:
        while time.time() < deadline or received < sent:
            if time.time() > deadline + 5:
                error = "echo did not catch up within 5 s"
                break
            want_write = time.time() < deadline and sent - received < 1 << 20
            r, w, _ = select.select([c], [c] if want_write else [], [], 0.05)
            if w:
                off = sent % 256
                n = c.send(pattern[off: off + chunk])
                sent += n
                time.sleep(0.001)
            if r:
                data = c.recv(65536)
                if not data:
                    error = "connection closed by the peer"
                    break
                pending += data
            if pending:
                off = received % 256
                expect = pattern[off: off + len(pending)]
                if pending != expect and mismatch is None:
                    mismatch = received
                received += len(pending)
                pending = b""
    except Exception as e:  # noqa: BLE001
        error = repr(e)
    c.close()
    out({"sent": sent, "received": received, "mismatch": mismatch, "error": error})


def udp(vip, port, n, timeout=3.0):
    """`n` request/response exchanges from one socket, one at a time. Each
    waits up to `timeout` for its own answer (`backend:payload` from
    (vip, port)); a late answer to an earlier request is counted as late and
    skipped, so one slow answer does not shift all the others."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    answered, late, names, errors = 0, 0, {}, []
    for i in range(n):
        payload = f"ping-{i}".encode()
        s.sendto(payload, (vip, port))
        end = time.time() + timeout
        try:
            while True:
                s.settimeout(max(end - time.time(), 0.001))
                data, peer = s.recvfrom(65536)
                name, _, echo = data.partition(b":")
                if echo == payload and peer == (vip, port):
                    answered += 1
                    names[name.decode()] = names.get(name.decode(), 0) + 1
                    break
                if echo.startswith(b"ping-") and peer == (vip, port):
                    late += 1
                    continue
                errors.append(f"{i}: unexpected {data!r} from {peer}")
                break
        except Exception as e:  # noqa: BLE001
            errors.append(f"{i}: {e!r}")
    out({"answered": answered, "late": late, "names": names, "errors": errors[:10]})


def pmtu(vip, port, size, seconds):
    """Path MTU discovery as a DF sender sees it: a connected UDP socket with
    IP_PMTUDISC_DO sends `size`-byte payloads until the kernel's path MTU to
    `vip` drops (an ICMP fragmentation needed came back) or `seconds` pass."""
    IP_MTU_DISCOVER, IP_PMTUDISC_DO, IP_MTU = 10, 2, 14
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
    s.connect((vip, port))
    before = s.getsockopt(socket.IPPROTO_IP, IP_MTU)
    mtu, sent, refused, errors = before, 0, 0, []
    end = time.time() + seconds
    while time.time() < end and mtu >= before:
        try:
            s.send(b"x" * size)
            sent += 1
        except OSError as e:
            # EMSGSIZE once the kernel knows the smaller MTU.
            refused += 1
            if len(errors) < 3:
                errors.append(repr(e))
        time.sleep(0.2)
        mtu = s.getsockopt(socket.IPPROTO_IP, IP_MTU)
    out({"mtu_before": before, "mtu": mtu, "sent": sent, "refused": refused, "errors": errors})


def hold(vip, port, n, connect_timeout, stop_file, seconds):
    """Opens `n` TCP connections to the streaming echo one after the other and
    keeps the ones that connect; reports, per connection, the backend and the
    peer it saw, or the error. Then waits for `stop_file` (at most `seconds`),
    closes them all with a FIN (with a reset when the file says `rst`) and
    reports that."""
    conns, held = [], []
    for i in range(n):
        try:
            c = socket.create_connection((vip, port), timeout=connect_timeout)
            greeting = read_greeting(c)
            words = greeting.decode().split()
            if len(words) != 3:
                raise OSError(f"greeting {greeting!r}")
            conns.append(c)
            held.append({"backend": words[0], "peer": words[2]})
        except Exception as e:  # noqa: BLE001
            held.append({"error": repr(e)})
    out({"held": held})
    end = time.time() + seconds
    while time.time() < end and not os.path.exists(stop_file):
        time.sleep(0.05)
    try:
        with open(stop_file) as f:
            how = f.read().strip()
    except OSError:
        how = ""
    for c in conns:
        if how == "rst":
            # SO_LINGER 0: close() sends a reset instead of a FIN.
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
    out({"closed": len(conns), "with": "rst" if how == "rst" else "fin"})


def udp_whoami(vip, port, n, timeout):
    """`n` UDP flows, each from its own socket (its own source port), sent one
    after the other before any answer is awaited: one `whoami` each, answered
    with the peer the backend saw, or a timeout `timeout` after the last send."""
    socks = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b"whoami", (vip, port))
        socks.append(s)
    answers = [None] * n
    end = time.time() + timeout
    while time.time() < end and any(a is None for a in answers):
        waiting = [s for s, a in zip(socks, answers) if a is None]
        r, _, _ = select.select(waiting, [], [], max(end - time.time(), 0))
        for s in r:
            i = socks.index(s)
            data, _ = s.recvfrom(1500)
            name, _, rest = data.decode().partition(":")
            words = rest.split()
            answers[i] = {"backend": name, "peer": words[2] if len(words) == 3 else rest}
    answers = [a if a is not None else {"error": "timed out"} for a in answers]
    for s in socks:
        s.close()
    out({"answers": answers})


def reject(vip, tcp_port, udp_port):
    """TCP: connect must be refused by a RST; UDP: recv must fail with the
    ICMP port unreachable the gateway sends."""
    res = {}
    t0 = time.time()
    try:
        socket.create_connection((vip, tcp_port), timeout=3).close()
        res["tcp"] = "connected"
    except ConnectionRefusedError:
        res["tcp"] = "refused"
    except Exception as e:  # noqa: BLE001
        res["tcp"] = repr(e)
    res["tcp_ms"] = round((time.time() - t0) * 1000)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.connect((vip, udp_port))
    try:
        s.send(b"hello")
        s.recv(100)
        res["udp"] = "answered"
    except ConnectionRefusedError:
        res["udp"] = "unreachable"
    except Exception as e:  # noqa: BLE001
        res["udp"] = repr(e)
    out(res)


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ping(addr, n):
    """ICMP echo over a raw socket (no ping binary needed)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.settimeout(1)
    ok = 0
    for seq in range(n):
        body = struct.pack("!BBHHH", 8, 0, 0, 0x4347, seq) + b"clustergate"
        csum = 0xFFFF - checksum(body)
        body = body[:2] + struct.pack("!H", csum) + body[4:]
        s.sendto(body, (addr, 0))
        try:
            end = time.time() + 1
            while time.time() < end:
                data, peer = s.recvfrom(1500)
                ihl = (data[0] & 0xF) * 4
                if peer[0] == addr and data[ihl] == 0 and data[ihl + 6: ihl + 8] == struct.pack("!H", seq):
                    ok += 1
                    break
        except socket.timeout:
            pass
    out({"replies": ok})


def tcp_probe(addr, port):
    try:
        with socket.create_connection((addr, port), timeout=3) as c:
            out({"answer": c.recv(100).decode().strip()})
    except Exception as e:  # noqa: BLE001
        out({"error": repr(e)})


def capture(ifname, seconds, stop_file):
    """Every IPv4 TCP/UDP frame arriving on `ifname` for the service ports:
    check the IPv4 header checksum and the L4 checksum."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    s.bind((ifname, 0))
    s.settimeout(0.1)
    seen = bad = 0
    bad_examples = []
    end = time.time() + seconds
    while time.time() < end and not os.path.exists(stop_file):
        try:
            frame, meta = s.recvfrom(65536)
        except socket.timeout:
            continue
        if meta[2] == socket.PACKET_OUTGOING:
            continue
        ip = frame[14:]
        if len(ip) < 20 or ip[0] >> 4 != 4:
            continue
        ihl = (ip[0] & 0xF) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        proto = ip[9]
        if proto not in (6, 17):
            continue
        l4 = ip[ihl:total]
        dport = struct.unpack("!H", l4[2:4])[0]
        if dport not in (HTTP_PORT, STREAM_PORT, UDP_PORT):
            continue
        seen += 1
        ok_ip = checksum(ip[:ihl]) == 0xFFFF
        pseudo = ip[12:20] + struct.pack("!BBH", 0, proto, len(l4))
        if proto == 17 and struct.unpack("!H", l4[6:8])[0] == 0:
            ok_l4 = True
        else:
            ok_l4 = checksum(pseudo + l4) == 0xFFFF
        if not (ok_ip and ok_l4):
            bad += 1
            if len(bad_examples) < 5:
                bad_examples.append(frame[:64].hex())
    out({"seen": seen, "bad": bad, "bad_examples": bad_examples})


def get(url):
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            out({"status": r.status, "body": r.read().decode()})
    except urllib.error.HTTPError as e:
        out({"status": e.code, "body": e.read().decode()})
    except Exception as e:  # noqa: BLE001
        out({"status": 0, "body": repr(e)})


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "serve":
        serve(args[0], args[1], float(args[2]))
    elif cmd == "decap":
        decap(args[0], float(args[1]))
    elif cmd == "listen":
        listen(args[0], int(args[1]), float(args[2]))
    elif cmd == "http":
        # http VIP PORT N [TIMEOUT_S [MAX_ERRORS]]
        timeout = float(args[3]) if len(args) > 3 else 3.0
        max_errors = int(args[4]) if len(args) > 4 else 20
        http_spread(args[0], int(args[1]), int(args[2]), timeout, max_errors)
    elif cmd == "stream":
        stream(args[0], int(args[1]), float(args[2]), int(args[3]))
    elif cmd == "udp":
        # udp VIP PORT N [TIMEOUT_S]
        udp(args[0], int(args[1]), int(args[2]), float(args[3]) if len(args) > 3 else 3.0)
    elif cmd == "pmtu":
        pmtu(args[0], int(args[1]), int(args[2]), float(args[3]))
    elif cmd == "hold":
        hold(args[0], int(args[1]), int(args[2]), float(args[3]), args[4], float(args[5]))
    elif cmd == "whoami":
        udp_whoami(args[0], int(args[1]), int(args[2]), float(args[3]))
    elif cmd == "reject":
        reject(args[0], int(args[1]), int(args[2]))
    elif cmd == "ping":
        ping(args[0], int(args[1]))
    elif cmd == "probe":
        tcp_probe(args[0], int(args[1]))
    elif cmd == "get":
        get(args[0])
    elif cmd == "capture":
        capture(args[0], float(args[1]), args[2])
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
