"""Domain names in allow_out: the daemon's DNS filter answers a sandbox only for allowed names
and opens the addresses it resolved for them; everything else stays closed.

Nothing here leaves the machine: the upstream DNS server (tests/sdk/helpers/fake_dns.py) and the
listeners run in network namespaces this module creates (10.254.253.2 and 10.254.254.2), the
daemon forwards to the former (--dns-upstream in warren_helpers), and sandboxes are pointed at it
in their own /etc/resolv.conf, so even a broken redirect would only reach the fake server.
"""

import os
import subprocess
import tempfile

import pytest

from test_parity_network import Outside, reaches
from warren_helpers import DNS_UPSTREAM

HERE = os.path.dirname(__file__)
RESOLVE = "python3 -c 'import socket,sys; print(socket.gethostbyname(sys.argv[1]))' "
# One DNS question over TCP, to the given server, printing the answer's first A record or the rcode.
TCP_QUERY = r"""python3 - {server} {name} <<'PY'
import socket, struct, sys
server, name = sys.argv[1], sys.argv[2]
q = struct.pack(">HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
s = socket.create_connection((server, 53), timeout=5)
s.sendall(struct.pack(">H", len(q)) + q)
n = struct.unpack(">H", s.recv(2))[0]
r = b""
while len(r) < n:
    r += s.recv(n - len(r))
rcode, answers = r[3] & 15, struct.unpack(">H", r[6:8])[0]
print(socket.inet_ntoa(r[-4:]) if rcode == 0 and answers else f"rcode={{rcode}}")
PY"""


@pytest.fixture(scope="module")
def world():
    assert DNS_UPSTREAM == "10.254.253.2"
    a, b = Outside("dna", 253), Outside("dnb", 254)
    log = tempfile.NamedTemporaryFile(prefix="warren-fake-dns-", suffix=".log", delete=False).name
    table = [f"allowed.test={a.addr}", f"api.wild.test={b.addr}", f"other.test={b.addr}", f"wild.test={b.addr}"]
    dns = subprocess.Popen(["ip", "netns", "exec", a.ns, "python3", os.path.join(HERE, "helpers", "fake_dns.py"), log, *table])
    yield a, b, log
    dns.kill()
    dns.wait()
    a.close()
    b.close()
    os.unlink(log)


def asked(log):
    with open(log) as f:
        return f.read().split()


def resolve(sbx, name):
    r = sbx.commands.run(RESOLVE + name + " 2>&1; true", timeout=20)
    return r.stdout.strip()


def use_resolver(sbx, server):
    sbx.commands.run(f"echo 'nameserver {server}' > /etc/resolv.conf", user="root")


def test_allowed_names_resolve_and_open_their_addresses_only(new_sandbox, world):
    a, b, log = world
    sbx = new_sandbox(network={"allow_out": ["allowed.test", "*.wild.test"], "deny_out": ["0.0.0.0/0"]})
    use_resolver(sbx, a.addr)
    assert sbx.get_info().network["allow_out"] == ["allowed.test", "*.wild.test"]
    assert not reaches(sbx, a.addr), "nothing is open before a name is resolved"

    assert resolve(sbx, "allowed.test") == a.addr
    assert reaches(sbx, a.addr)
    assert not reaches(sbx, b.addr), "resolving one name opens only its addresses"

    assert resolve(sbx, "api.wild.test") == b.addr
    assert reaches(sbx, b.addr)

    # Names outside the list are refused by the filter and never reach the upstream server.
    for name in ("other.test", "wild.test"):
        assert "Errno" in resolve(sbx, name) or "gaierror" in resolve(sbx, name)
        assert name not in asked(log)
    # Over TCP as well.
    assert sbx.commands.run(TCP_QUERY.format(server=a.addr, name="allowed.test"), timeout=20).stdout.strip() == a.addr
    assert sbx.commands.run(TCP_QUERY.format(server=a.addr, name="other.test"), timeout=20).stdout.strip() == "rcode=5"
    assert "other.test" not in asked(log)


def test_update_network_drops_the_opened_addresses(new_sandbox, world):
    a, _, _ = world
    sbx = new_sandbox(network={"allow_out": ["allowed.test"], "deny_out": ["0.0.0.0/0"]})
    use_resolver(sbx, a.addr)
    assert resolve(sbx, "allowed.test") == a.addr and reaches(sbx, a.addr)
    sbx.update_network({"deny_out": ["0.0.0.0/0"]})
    assert not reaches(sbx, a.addr)
    # and names can be added to a running sandbox
    sbx.update_network({"allow_out": ["allowed.test"], "deny_out": ["0.0.0.0/0"]})
    assert not reaches(sbx, a.addr)
    assert resolve(sbx, "allowed.test") == a.addr and reaches(sbx, a.addr)


def test_sandboxes_without_names_are_not_filtered(new_sandbox, world):
    a, b, log = world
    sbx = new_sandbox()
    use_resolver(sbx, a.addr)
    # Its DNS goes straight to the server it names (here the fake one), unfiltered.
    assert resolve(sbx, "other.test") == b.addr
    assert "other.test" in asked(log)


def test_domain_rules_survive_a_daemon_restart(world):
    from e2b import Sandbox

    from test_restart import _restart
    from warren_helpers import remove_data_dir, remove_host_state, start_daemon

    a, b, log = world
    daemons = [start_daemon()]
    try:
        d = daemons[0]
        opts = dict(api_key=d.api_key, api_url=d.url, sandbox_url=d.url)
        sbx = Sandbox.create(timeout=120, network={"allow_out": ["allowed.test"], "deny_out": ["0.0.0.0/0"]}, **opts)
        use_resolver(sbx, a.addr)
        d2 = _restart(daemons)
        sbx = Sandbox.connect(sbx.sandbox_id, api_key=d2.api_key, api_url=d2.url, sandbox_url=d2.url)
        assert resolve(sbx, "allowed.test") == a.addr and reaches(sbx, a.addr)
        assert "Errno" in resolve(sbx, "other.test")
        sbx.kill()
    finally:
        for x in daemons:
            if x.alive():
                x.stop()
        remove_host_state(daemons[0].prefix)
        remove_data_dir(daemons[0])
