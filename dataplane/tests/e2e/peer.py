#!/usr/bin/env python3
"""Real clients and servers for the gateway's end-to-end tests.

Each subcommand runs inside a network namespace the test made (the test starts
it with `ip netns exec`), prints one JSON line with what it saw (the streaming
client prints its backend first, `hold` what it holds before it closes), and
is bounded in time and count. Addresses are the test's, all in 198.18.0.0/15
or 2001:2::/48; every command takes either family, told by the address
(IPv6 has a colon). The servers name the peer they saw (`backend-N from
ADDR:PORT`, ADDR without brackets), so a test can tell source NAT (the
gateway's address) from DSR and routed (the client's).
"""
import json
import os
import select
import socket
import socketserver
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HTTP_PORT, STREAM_PORT, UDP_PORT = 8080, 9000, 9001


def out(obj):
    print(json.dumps(obj), flush=True)


def family(addr):
    """AF_INET6 for an IPv6 address, else AF_INET."""
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


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

    class Http(ThreadingHTTPServer):
        allow_reuse_address = True
        daemon_threads = True

        def server_bind(self):
            # HTTPServer's own looks the name of the address up (getfqdn):
            # seconds without a resolver in the namespace.
            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = "peer", self.server_address[1]

    class Http6(Http):
        address_family = socket.AF_INET6

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
        http = (Http6 if family(addr) == socket.AF_INET6 else Http)(
            (addr, HTTP_PORT), Handler)
        threading.Thread(target=http.serve_forever, daemon=True).start()
        lst = socket.socket(family(addr))
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind((addr, STREAM_PORT))
        lst.listen(64)
        threading.Thread(target=accept, args=(lst,), daemon=True).start()
        udp = socket.socket(family(addr), socket.SOCK_DGRAM)
        udp.bind((addr, UDP_PORT))
        threading.Thread(target=udp_echo, args=(udp,), daemon=True).start()
    out({"serving": name})
    time.sleep(seconds)


def decap(tun, seconds, families="4,6"):
    """Userspace IP-in-IP decapsulation for DSR where the kernel has no
    tunnel device: every IPv4-in-IPv4 (protocol 4) and IPv6-in-IPv6 (next
    header 41) packet to this namespace (a raw socket gets a copy; with no
    handler the kernel drops its own) goes, without its outer header, into
    the tun device `tun`, so the kernel receives the client's packet as an
    ipip or ip6tnl device would hand it over. `families` (`4`, `6` or `4,6`)
    says which: a family the kernel decapsulates itself is left to it. A raw
    IPv4 socket reads the outer header too; a raw IPv6 socket reads only
    what follows it, the inner packet."""
    TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
    import fcntl
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", tun.encode(), IFF_TUN | IFF_NO_PI))
    socks = {}
    for f in families.split(","):
        if f == "4":
            raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, 4)
        elif f == "6":
            raw = socket.socket(socket.AF_INET6, socket.SOCK_RAW, 41)
        else:
            sys.exit(f"decap: unknown family {f}")
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        socks[raw] = int(f)
    out({"decap": tun, "families": sorted(socks.values())})
    n = {4: 0, 6: 0}
    bad = 0
    end = time.time() + seconds
    while time.time() < end:
        r, _, _ = select.select(list(socks), [], [], 0.2)
        for raw in r:
            f = socks[raw]
            pkt = raw.recv(65536)
            if f == 4:
                inner = pkt[(pkt[0] & 0xF) * 4:]
                ok = len(inner) >= 20 and inner[0] >> 4 == 4
            else:
                inner = pkt
                ok = len(inner) >= 40 and inner[0] >> 4 == 6
            if not ok:
                bad += 1
                continue
            os.write(fd, inner)
            n[f] += 1
    out({"decapsulated": n[4] + n[6], "v4": n[4], "v6": n[6], "bad": bad})


def listen(addr, port, seconds):
    """A plain TCP listener on the gateway's own address (test 5)."""
    s = socket.socket(family(addr))
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


def udp(vip, port, n, timeout=3.0, size=0):
    """`n` request/response exchanges from one socket, one at a time. Each
    waits up to `timeout` for its own answer (`backend:payload` from
    (vip, port)); a late answer to an earlier request is counted as late and
    skipped, so one slow answer does not shift all the others. With `size`,
    each payload is padded to `size` bytes (larger than the MTU: the kernel
    fragments the datagram, and the backend's answer too). With $DSTOPTS set
    (IPv6), every datagram carries a destination options header (a PadN
    option) between the IPv6 header and UDP."""
    s = socket.socket(family(vip), socket.SOCK_DGRAM)
    if os.environ.get("DSTOPTS") and family(vip) == socket.AF_INET6:
        # Next header (filled in by the kernel), length 0 (8 bytes), PadN of 4.
        IPV6_DSTOPTS = 59
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_DSTOPTS, bytes([0, 0, 1, 4, 0, 0, 0, 0]))
    answered, late, names, errors = 0, 0, {}, []
    for i in range(n):
        payload = f"ping-{i}-".encode()
        payload += b"p" * max(size - len(payload), 0)
        s.sendto(payload, (vip, port))
        end = time.time() + timeout
        try:
            while True:
                s.settimeout(max(end - time.time(), 0.001))
                data, peer = s.recvfrom(65536)
                name, _, echo = data.partition(b":")
                peer = peer[:2]
                if echo == payload and peer == (vip, port):
                    answered += 1
                    names[name.decode()] = names.get(name.decode(), 0) + 1
                    break
                if echo.startswith(b"ping-") and peer == (vip, port):
                    late += 1
                    continue
                errors.append(f"{i}: unexpected {data[:40]!r} from {peer}")
                break
        except Exception as e:  # noqa: BLE001
            errors.append(f"{i}: {e!r}")
    out({"answered": answered, "late": late, "names": names, "errors": errors[:10]})


def pmtu(vip, port, size, seconds):
    """Path MTU discovery as a DF sender sees it: a connected UDP socket with
    IP_PMTUDISC_DO (IPv6: IPV6_PMTUDISC_DO, never fragmenting) sends
    `size`-byte payloads until the kernel's path MTU to `vip` drops (an ICMP
    fragmentation needed or ICMPv6 packet too big came back) or `seconds`
    pass."""
    if family(vip) == socket.AF_INET6:
        # IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO, IPV6_MTU
        level, opt_disc, opt_mtu = socket.IPPROTO_IPV6, 23, 24
    else:
        # IP_MTU_DISCOVER, IP_PMTUDISC_DO, IP_MTU
        level, opt_disc, opt_mtu = socket.IPPROTO_IP, 10, 14
    s = socket.socket(family(vip), socket.SOCK_DGRAM)
    s.setsockopt(level, opt_disc, 2)
    s.connect((vip, port))
    before = s.getsockopt(level, opt_mtu)
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
        mtu = s.getsockopt(level, opt_mtu)
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
        s = socket.socket(family(vip), socket.SOCK_DGRAM)
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
    s = socket.socket(family(vip), socket.SOCK_DGRAM)
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
    """ICMP echo over a raw socket (no ping binary needed); ICMPv6 echo for
    an IPv6 address (the kernel fills in its checksum)."""
    v6 = family(addr) == socket.AF_INET6
    if v6:
        s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    request, reply = (128, 129) if v6 else (8, 0)
    s.settimeout(1)
    ok = 0
    for seq in range(n):
        body = struct.pack("!BBHHH", request, 0, 0, 0x4347, seq) + b"clustergate"
        if not v6:
            csum = 0xFFFF - checksum(body)
            body = body[:2] + struct.pack("!H", csum) + body[4:]
        s.sendto(body, (addr, 0))
        try:
            end = time.time() + 1
            while time.time() < end:
                data, peer = s.recvfrom(1500)
                # A raw IPv4 socket reads the IP header, a raw IPv6 one not.
                ihl = 0 if v6 else (data[0] & 0xF) * 4
                if peer[0] == addr and data[ihl] == reply and data[ihl + 6: ihl + 8] == struct.pack("!H", seq):
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


def l4_ok(family_, src, dst, proto, l4):
    """The transport checksum of `l4` over the pseudo-header of `family_`
    (4 or 6); a UDP checksum 0 means none in IPv4, and is wrong in IPv6."""
    if proto == 17 and struct.unpack("!H", l4[6:8])[0] == 0:
        return family_ == 4
    if family_ == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, proto, len(l4))
    else:
        pseudo = src + dst + struct.pack("!IxxxB", len(l4), proto)
    return checksum(pseudo + l4) == 0xFFFF


def inspect_ip(ip, depth=0):
    """What an IP packet to a service port is: None when it is not one (not
    TCP/UDP, or another port), else (family, checksums right, what came
    between the IPv6 header and the transport: "" none, "ext" extension
    headers, "frag" a fragment, not looked into). IPv4 (in IPv4) and IPv6 (in
    IPv6), as DSR delivers them, are looked into once. IPv6 extension headers
    (hop-by-hop, routing, destination options) are skipped."""
    if len(ip) < 20:
        return None
    if ip[0] >> 4 == 4:
        ihl = (ip[0] & 0xF) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        proto = ip[9]
        if proto in (4, 41) and depth == 0:
            return inspect_ip(ip[ihl:total], 1)
        if proto not in (6, 17) or struct.unpack("!H", ip[6:8])[0] & 0x3FFF:
            return None
        l4 = ip[ihl:total]
        if len(l4) < 8 or struct.unpack("!H", l4[2:4])[0] not in (HTTP_PORT, STREAM_PORT, UDP_PORT):
            return None
        ok = checksum(ip[:ihl]) == 0xFFFF and l4_ok(4, ip[12:16], ip[16:20], proto, l4)
        return (4, ok, "")
    if ip[0] >> 4 == 6 and len(ip) >= 40:
        end = 40 + struct.unpack("!H", ip[4:6])[0]
        nh, off = ip[6], 40
        while nh in (0, 43, 60) and off + 8 <= end:
            nh, off = ip[off], off + 8 * (ip[off + 1] + 1)
        if nh in (4, 41) and depth == 0:
            return inspect_ip(ip[off:end], 1)
        if nh == 44 and off + 8 <= end and ip[off] == 17:
            return (6, True, "frag")
        if nh not in (6, 17):
            return None
        l4 = ip[off:end]
        if len(l4) < 8 or struct.unpack("!H", l4[2:4])[0] not in (HTTP_PORT, STREAM_PORT, UDP_PORT):
            return None
        return (6, l4_ok(6, ip[8:24], ip[24:40], nh, l4), "ext" if off > 40 else "")
    return None


def capture(ifname, seconds, stop_file):
    """Every IPv4 and IPv6 TCP/UDP frame arriving on `ifname` for the
    service ports (inside IP-in-IP too): check the IPv4 header checksum and
    the L4 checksum (over the IPv6 pseudo-header for IPv6). Counts per
    family (`seen4`, `seen6`), and the IPv6 frames with extension headers
    before the transport header (`ext6`) and the IPv6 UDP fragments
    (`frag6`, whose checksums are not checked)."""
    ETH_P_ALL = 0x0003
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((ifname, 0))
    s.settimeout(0.1)
    seen = {4: 0, 6: 0}
    extra = {"ext": 0, "frag": 0}
    bad = 0
    bad_examples = []
    end = time.time() + seconds
    while time.time() < end and not os.path.exists(stop_file):
        try:
            frame, meta = s.recvfrom(65536)
        except socket.timeout:
            continue
        if meta[2] == socket.PACKET_OUTGOING:
            continue
        if frame[12:14] not in (b"\x08\x00", b"\x86\xdd"):
            continue
        what = inspect_ip(frame[14:])
        if what is None:
            continue
        fam, ok, between = what
        seen[fam] += 1
        if between:
            extra[between] += 1
        if not ok:
            bad += 1
            if len(bad_examples) < 5:
                bad_examples.append(frame[:96].hex())
    out({"seen": seen[4] + seen[6], "seen4": seen[4], "seen6": seen[6],
         "ext6": extra["ext"], "frag6": extra["frag"], "bad": bad,
         "bad_examples": bad_examples})


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
        # decap TUN SECONDS [FAMILIES]
        decap(args[0], float(args[1]), args[2] if len(args) > 2 else "4,6")
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
        # udp VIP PORT N [TIMEOUT_S [SIZE]]
        udp(args[0], int(args[1]), int(args[2]), float(args[3]) if len(args) > 3 else 3.0,
            int(args[4]) if len(args) > 4 else 0)
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
