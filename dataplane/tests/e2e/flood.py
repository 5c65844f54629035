#!/usr/bin/env python3
"""The end-to-end flood test's client side (tests/flood_e2e.rs), run in the
client namespace. Every loop is bounded in count and time.

  flood.py hold VIP PORT N STOP_FILE SECONDS
      Opens N connections to the streaming echo at VIP:PORT, reads each
      greeting, reports them; then, every 0.1 s until STOP_FILE exists (and
      once more after it does) or SECONDS pass, sends 8 bytes on every
      connection and checks that exactly those come back within 2 s. Reports
      the rounds, the round trips that worked and those that failed.

  flood.py send IFACE FRAMES_FILE PPS SECONDS
      Sends the Ethernet frames of FRAMES_FILE (each prefixed by its length,
      16 bits big-endian) on IFACE through an AF_PACKET socket, at most PPS
      per second and for at most SECONDS; reports how many went out.
"""

import json
import os
import socket
import struct
import sys
import time


def out(obj):
    print(json.dumps(obj), flush=True)


def greeting(c):
    g = b""
    while not g.endswith(b"\n"):
        b = c.recv(1)
        if not b:
            raise OSError(f"closed during the greeting {g!r}")
        g += b
    return g.decode().strip()


def hold(vip, port, n, stop_file, seconds):
    conns, errors, greetings = [], [], []
    for _ in range(n):
        try:
            c = socket.create_connection((vip, port), timeout=3)
            greetings.append(greeting(c))
            c.settimeout(2)
            conns.append(c)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
    out({"held": len(conns), "errors": errors, "greetings": greetings})
    rounds = ok = failed = 0
    examples = []
    broken = set()
    end = time.time() + seconds
    while time.time() < end:
        stop = os.path.exists(stop_file)
        rounds += 1
        for i, c in enumerate(conns):
            if i in broken:
                failed += 1
                continue
            msg = struct.pack("!II", i, rounds)
            try:
                c.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    d = c.recv(len(msg) - len(got))
                    if not d:
                        raise OSError("closed by the peer")
                    got += d
                if got != msg:
                    raise OSError(f"echo {got!r} for {msg!r}")
                ok += 1
            except Exception as e:  # noqa: BLE001
                failed += 1
                broken.add(i)
                if len(examples) < 10:
                    examples.append(f"connection {i}, round {rounds}: {e!r}")
        if stop:
            break
        time.sleep(0.1)
    for c in conns:
        c.close()
    out({"rounds": rounds, "ok": ok, "failed": failed, "examples": examples})


def send(iface, path, pps, seconds):
    with open(path, "rb") as f:
        data = f.read()
    frames, off = [], 0
    while off + 2 <= len(data):
        (n,) = struct.unpack_from("!H", data, off)
        frames.append(data[off + 2: off + 2 + n])
        off += 2 + n
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    start = time.time()
    deadline = start + seconds
    sent = 0
    for f in frames:
        now = time.time()
        if now > deadline:
            break
        ahead = start + sent / pps - now
        if ahead > 0.002:
            time.sleep(ahead)
        for _ in range(100):
            try:
                s.send(f)
                sent += 1
                break
            except OSError:  # ENOBUFS: the queue is full, wait a little
                time.sleep(0.001)
    out({"sent": sent, "of": len(frames), "secs": round(time.time() - start, 3)})


def main():
    cmd = sys.argv[1]
    if cmd == "hold":
        hold(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], float(sys.argv[6]))
    elif cmd == "send":
        send(sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5]))
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
