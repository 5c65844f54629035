#!/usr/bin/env python3
"""Real clients and servers for the gateway's end-to-end tests.

Each subcommand runs inside a network namespace the test made (the test starts
it with `ip netns exec`), prints one JSON line with what it saw (the streaming
client prints its backend first), and is bounded in time and count. Addresses
are the test's, all in 198.18.0.0/15.
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

def serve(name, addr, seconds):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self):
            body = (name + "\n").encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    ThreadingHTTPServer.allow_reuse_address = True
    ThreadingHTTPServer.daemon_threads = True
    http = ThreadingHTTPServer((addr, HTTP_PORT), Handler)
    threading.Thread(target=http.serve_forever, daemon=True).start()

    # Stream: greet with our name, then echo everything back.
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind((addr, STREAM_PORT))
    lst.listen(64)

    def echo(conn):
        with conn:
            conn.sendall((name + "\n").encode())
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)

    def accept():
        while True:
            c, _ = lst.accept()
            threading.Thread(target=echo, args=(c,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()

    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((addr, UDP_PORT))

    def udp_echo():
        while True:
            data, peer = udp.recvfrom(65536)
            udp.sendto(name.encode() + b":" + data, peer)

    threading.Thread(target=udp_echo, daemon=True).start()
    out({"serving": name})
    time.sleep(seconds)


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

def http_spread(vip, port, n):
    counts, errors = {}, []
    for i in range(n):
        try:
            with socket.create_connection((vip, port), timeout=3) as c:
                c.sendall(b"GET / HTTP/1.0\r\nHost: vip\r\n\r\n")
                data = b""
                while True:
                    chunk = c.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            name = data.split(b"\r\n\r\n", 1)[1].decode().strip()
            counts[name] = counts.get(name, 0) + 1
        except Exception as e:  # noqa: BLE001 - every failure is reported
            errors.append(f"{i}: {e!r}")
            if len(errors) > 20:
                break
    out({"counts": counts, "errors": errors})


def stream(vip, port, seconds, chunk):
    """One long-lived connection: send a counter pattern, read the echo, check
    every byte; report the backend first, then the totals."""
    c = socket.create_connection((vip, port), timeout=5)
    greeting = b""
    while not greeting.endswith(b"\n"):
        b = c.recv(1)
        if not b:
            break
        greeting += b
    backend = greeting.decode().strip()
    out({"backend": backend})
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


def udp(vip, port, n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1)
    answered, names, errors = 0, {}, []
    for i in range(n):
        payload = f"ping-{i}".encode()
        s.sendto(payload, (vip, port))
        try:
            data, peer = s.recvfrom(65536)
            name, _, echo = data.partition(b":")
            if echo == payload and peer == (vip, port):
                answered += 1
                names[name.decode()] = names.get(name.decode(), 0) + 1
            else:
                errors.append(f"{i}: unexpected {data!r} from {peer}")
        except Exception as e:  # noqa: BLE001
            errors.append(f"{i}: {e!r}")
    out({"answered": answered, "names": names, "errors": errors[:10]})


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
    elif cmd == "listen":
        listen(args[0], int(args[1]), float(args[2]))
    elif cmd == "http":
        http_spread(args[0], int(args[1]), int(args[2]))
    elif cmd == "stream":
        stream(args[0], int(args[1]), float(args[2]), int(args[3]))
    elif cmd == "udp":
        udp(args[0], int(args[1]), int(args[2]))
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
