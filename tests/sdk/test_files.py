"""sandbox.files through the official SDK."""

from datetime import datetime, timedelta, timezone

import pytest
from e2b import FileType, NotFoundException
from e2b.exceptions import FileNotFoundException
from e2b.sandbox.filesystem.filesystem import WriteEntry


def test_write_read_text_roundtrip(sandbox):
    text = "hello\nwörld ✓\n"
    info = sandbox.files.write("/home/user/t.txt", text)
    assert info.path == "/home/user/t.txt"
    assert info.name == "t.txt"
    assert info.type == FileType.FILE
    assert sandbox.files.read("/home/user/t.txt") == text
    # what the process side sees is the same bytes
    assert sandbox.commands.run("cat /home/user/t.txt").stdout == text


def test_write_read_binary_all_byte_values(sandbox):
    data = bytes(range(256)) * 8
    sandbox.files.write("/tmp/bin.dat", data)
    got = sandbox.files.read("/tmp/bin.dat", format="bytes")
    assert isinstance(got, (bytes, bytearray))
    assert bytes(got) == data
    assert sandbox.commands.run("wc -c < /tmp/bin.dat").stdout == "2048\n"
    assert sandbox.commands.run("md5sum < /tmp/bin.dat").stdout.split()[0] == __import__(
        "hashlib"
    ).md5(data).hexdigest()


def test_write_overwrites(sandbox):
    sandbox.files.write("/tmp/o.txt", "a long first version\n")
    sandbox.files.write("/tmp/o.txt", "short")
    assert sandbox.files.read("/tmp/o.txt") == "short"


def test_empty_file(sandbox):
    sandbox.files.write("/tmp/empty", b"")
    assert sandbox.files.read("/tmp/empty") == ""
    assert sandbox.files.get_info("/tmp/empty").size == 0


def test_read_missing_file(sandbox):
    with pytest.raises(FileNotFoundException):
        sandbox.files.read("/home/user/nope.txt")


def test_list(sandbox):
    sandbox.commands.run("mkdir -p /home/user/ld/c && printf 12 > /home/user/ld/a && printf 1 > /home/user/ld/b")
    entries = sorted(sandbox.files.list("/home/user/ld"), key=lambda e: e.name)
    assert [e.name for e in entries] == ["a", "b", "c"]
    assert [e.type for e in entries] == [FileType.FILE, FileType.FILE, FileType.DIR]
    assert [e.path for e in entries] == ["/home/user/ld/a", "/home/user/ld/b", "/home/user/ld/c"]
    assert [e.size for e in entries[:2]] == [2, 1]


def test_list_depth(sandbox):
    sandbox.commands.run("mkdir -p /tmp/dp/x/y && touch /tmp/dp/x/y/z")
    assert sorted(e.path for e in sandbox.files.list("/tmp/dp")) == ["/tmp/dp/x"]
    assert sorted(e.path for e in sandbox.files.list("/tmp/dp", depth=3)) == [
        "/tmp/dp/x",
        "/tmp/dp/x/y",
        "/tmp/dp/x/y/z",
    ]


def test_list_missing_dir(sandbox):
    with pytest.raises(NotFoundException):
        sandbox.files.list("/home/user/no-such-dir")


def test_exists(sandbox):
    sandbox.files.write("/tmp/ex.txt", "x")
    assert sandbox.files.exists("/tmp/ex.txt") is True
    assert sandbox.files.exists("/tmp") is True
    assert sandbox.files.exists("/tmp/not-there.txt") is False


def test_make_dir(sandbox):
    assert sandbox.files.make_dir("/home/user/newdir") is True
    assert sandbox.files.make_dir("/home/user/newdir") is False
    assert sandbox.files.get_info("/home/user/newdir").type == FileType.DIR
    # parents are created
    assert sandbox.files.make_dir("/tmp/p/q/r") is True
    assert sandbox.commands.run("test -d /tmp/p/q/r && echo yes").stdout == "yes\n"
    # made as the default user
    assert sandbox.commands.run("stat -c %U /home/user/newdir").stdout == "user\n"


def test_rename(sandbox):
    sandbox.files.write("/home/user/old.txt", "content")
    info = sandbox.files.rename("/home/user/old.txt", "/home/user/new.txt")
    assert info.path == "/home/user/new.txt"
    assert info.name == "new.txt"
    assert sandbox.files.exists("/home/user/old.txt") is False
    assert sandbox.files.read("/home/user/new.txt") == "content"


def test_rename_missing_source(sandbox):
    with pytest.raises(NotFoundException):
        sandbox.files.rename("/home/user/ghost", "/home/user/ghost2")


def test_remove_file_and_dir(sandbox):
    sandbox.files.write("/tmp/rm/sub/f.txt", "x")
    sandbox.files.remove("/tmp/rm/sub/f.txt")
    assert sandbox.files.exists("/tmp/rm/sub/f.txt") is False
    assert sandbox.files.exists("/tmp/rm/sub") is True
    sandbox.files.write("/tmp/rm/sub/g.txt", "y")
    sandbox.files.remove("/tmp/rm")  # recursive
    assert sandbox.files.exists("/tmp/rm") is False


def test_get_info(sandbox):
    before = datetime.now(timezone.utc)
    sandbox.files.write("/home/user/gi.txt", "12345")
    info = sandbox.files.get_info("/home/user/gi.txt")
    assert info.name == "gi.txt"
    assert info.path == "/home/user/gi.txt"
    assert info.type == FileType.FILE
    assert info.size == 5
    assert info.owner == "user"
    assert info.group == "user"
    octal = sandbox.commands.run("stat -c %a /home/user/gi.txt").stdout.strip()
    assert info.mode == int(octal, 8)
    assert info.permissions == sandbox.commands.run("stat -c %A /home/user/gi.txt").stdout.strip()
    assert before - timedelta(seconds=5) <= info.modified_time <= datetime.now(timezone.utc) + timedelta(seconds=5)
    d = sandbox.files.get_info("/home/user")
    assert d.type == FileType.DIR
    assert d.permissions.startswith("d")


def test_get_info_symlink(sandbox):
    sandbox.commands.run("echo x > /tmp/target && ln -s /tmp/target /tmp/link")
    info = sandbox.files.get_info("/tmp/link")
    assert info.symlink_target == "/tmp/target"


def test_write_files(sandbox):
    infos = sandbox.files.write_files(
        [
            WriteEntry(path="/tmp/wf/a.txt", data="A"),
            WriteEntry(path="/tmp/wf/b.bin", data=b"\x00\xffB"),
        ]
    )
    assert sorted(i.path for i in infos) == ["/tmp/wf/a.txt", "/tmp/wf/b.bin"]
    assert sandbox.files.read("/tmp/wf/a.txt") == "A"
    assert bytes(sandbox.files.read("/tmp/wf/b.bin", format="bytes")) == b"\x00\xffB"


def test_write_into_new_nested_dir(sandbox):
    info = sandbox.files.write("/home/user/n1/n2/n3/f.txt", "deep")
    assert info.path == "/home/user/n1/n2/n3/f.txt"
    assert sandbox.files.read("/home/user/n1/n2/n3/f.txt") == "deep"
    assert sandbox.commands.run("stat -c %U /home/user/n1/n2").stdout == "user\n"


def test_relative_path_resolves_to_home(sandbox):
    info = sandbox.files.write("rel.txt", "relative")
    assert info.path == "/home/user/rel.txt"
    assert sandbox.commands.run("cat /home/user/rel.txt").stdout == "relative"
    assert sandbox.files.read("rel.txt") == "relative"
    assert sandbox.files.exists("rel.txt") is True


def test_write_as_root(sandbox):
    info = sandbox.files.write("/root/r.txt", "r", user="root")
    assert info.path == "/root/r.txt"
    assert sandbox.files.get_info("/root/r.txt", user="root").owner == "root"
    # relative paths resolve to root's home for root
    assert sandbox.files.write("x.txt", "x", user="root").path == "/root/x.txt"


def test_user_cannot_write_root_owned_dir(sandbox):
    from e2b import SandboxException

    with pytest.raises(SandboxException):
        sandbox.files.write("/root/denied.txt", "no")
    assert sandbox.commands.run("test -e /root/denied.txt || echo absent", user="root").stdout == "absent\n"


def _http(method, url, body=None, headers=None):
    import http.client
    import urllib.parse

    p = urllib.parse.urlsplit(url)
    c = http.client.HTTPConnection(p.hostname, p.port, timeout=30)
    try:
        c.request(method, p.path + "?" + p.query, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def test_signed_download_and_upload_urls_without_headers(sandbox):
    import json

    sandbox.files.write("/home/user/d.txt", "download me")
    # a plain client: no E2b-Sandbox-Id / X-Access-Token headers, only the signature
    assert _http("GET", sandbox.download_url("/home/user/d.txt")) == (200, b"download me")
    assert _http("GET", sandbox.download_url("/home/user/d.txt", use_signature_expiration=30)) == (
        200,
        b"download me",
    )
    boundary = "wptboundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="up.txt"\r\n'
        f"Content-Type: text/plain\r\n\r\nuploaded\r\n--{boundary}--\r\n"
    ).encode()
    status, resp = _http(
        "POST",
        sandbox.upload_url("/home/user/up.txt"),
        body,
        {"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert status == 200, resp
    assert json.loads(resp) == [{"name": "up.txt", "path": "/home/user/up.txt", "type": "file"}]
    assert sandbox.files.read("/home/user/up.txt") == "uploaded"


def test_signed_url_expired_and_tampered(sandbox):
    import json
    import time

    sandbox.files.write("/home/user/d.txt", "x")
    url = sandbox.download_url("/home/user/d.txt", use_signature_expiration=1)
    time.sleep(2.1)
    status, body = _http("GET", url)
    assert status == 401
    assert json.loads(body) == {"code": 401, "message": "signature is already expired"}
    # a signature for another path opens nothing
    status, body = _http("GET", sandbox.download_url("/home/user/d.txt").replace("d.txt", "e.txt"))
    assert status in (401, 404), (status, body)
    assert json.loads(body)["code"] == status
