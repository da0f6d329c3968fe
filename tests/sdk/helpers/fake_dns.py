"""A tiny authoritative DNS server for tests: answers A questions from a fixed table over UDP and
TCP on 0.0.0.0:53 (run inside a test network namespace), NXDOMAIN otherwise, and appends every
question it hears to a log file so tests can tell what reached it.

Usage: fake_dns.py LOGFILE name=ip [name=ip ...]
"""

import socket
import struct
import sys
import threading

LOG = sys.argv[1]
TABLE = dict(arg.split("=", 1) for arg in sys.argv[2:])
lock = threading.Lock()


def question(msg: bytes):
    at, labels = 12, []
    while msg[at]:
        n = msg[at]
        labels.append(msg[at + 1 : at + 1 + n].decode())
        at += 1 + n
    qtype = struct.unpack(">H", msg[at + 1 : at + 3])[0]
    return ".".join(labels).lower(), qtype, at + 5


def answer(msg: bytes) -> bytes:
    name, qtype, end = question(msg)
    with lock, open(LOG, "a") as f:
        f.write(name + "\n")
    ip = TABLE.get(name)
    found = ip is not None and qtype == 1
    flags = 0x8180 if ip is not None else 0x8183
    out = msg[:2] + struct.pack(">HHHHH", flags, 1, 1 if found else 0, 0, 0) + msg[12:end]
    if found:
        out += b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 5, 4) + socket.inet_aton(ip)
    return out


def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 53))
    while True:
        msg, peer = s.recvfrom(4096)
        s.sendto(answer(msg), peer)


def tcp():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 53))
    s.listen()
    while True:
        c, _ = s.accept()
        with c:
            n = struct.unpack(">H", c.recv(2))[0]
            msg = b""
            while len(msg) < n:
                msg += c.recv(n - len(msg))
            reply = answer(msg)
            c.sendall(struct.pack(">H", len(reply)) + reply)


threading.Thread(target=tcp, daemon=True).start()
udp()
