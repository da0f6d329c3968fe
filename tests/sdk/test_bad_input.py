"""Bad input: raw HTTP against the API and the sandbox router, and the SDK's error mapping."""

import pytest
from e2b import AuthenticationException, Sandbox, SandboxException
from e2b.exceptions import SandboxNotFoundException

ENVD = "49983"


@pytest.fixture
def no_new_sandboxes(daemon):
    """Asserts the test leaves the set of sandboxes (API list and on-disk dirs) unchanged."""
    before_ids, before_dirs = daemon.list_ids(), daemon.sandbox_dirs()
    yield
    assert daemon.list_ids() == before_ids
    assert daemon.sandbox_dirs() == before_dirs


def test_unknown_template(daemon, no_new_sandboxes):
    r = daemon.request("POST", "/v2/sandboxes", {"templateID": "no-such-template-xyz", "metadata": {}, "envVars": {}})
    assert 400 <= r.status < 500, r
    assert "no-such-template-xyz" in r.error_body()["message"]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"templateID":',
        b"not json",
        b'{"templateID":"base",}',
        b"",
    ],
    ids=["truncated", "not-json", "trailing-comma", "empty"],
)
def test_malformed_json_create(daemon, no_new_sandboxes, raw):
    r = daemon.request("POST", "/v2/sandboxes", raw=raw)
    assert r.status == 400, (r.status, r.body)
    assert r.error_body()["code"] == 400


@pytest.mark.parametrize(
    "body",
    [
        {"templateID": 5},
        {"templateID": "base", "timeout": "60"},
        {"templateID": "base", "metadata": {"a": 1}},
        {"templateID": "base", "envVars": ["A=1"]},
        [],
        {"metadata": {}},
    ],
    ids=["template-int", "timeout-string", "metadata-int-value", "envvars-list", "array", "no-templateID"],
)
def test_wrongly_typed_create_is_400(daemon, no_new_sandboxes, body):
    r = daemon.request("POST", "/v2/sandboxes", body)
    assert r.status == 400, (r.status, r.body)
    r.error_body()


def test_negative_timeout(daemon, no_new_sandboxes):
    r = daemon.request("POST", "/v2/sandboxes", {"templateID": "base", "timeout": -1})
    assert r.status == 400, (r.status, r.body)
    r.error_body()


def test_negative_set_timeout(daemon, sandbox):
    r = daemon.request("POST", f"/sandboxes/{sandbox.sandbox_id}/timeout", {"timeout": -5})
    assert r.status == 400, (r.status, r.body)
    r.error_body()
    assert sandbox.is_running() is True


@pytest.mark.parametrize(
    "method,path,body",
    [
        ("GET", "/sandboxes/doesnotexist", None),
        ("DELETE", "/sandboxes/doesnotexist", None),
        ("POST", "/sandboxes/doesnotexist/pause", {}),
        ("POST", "/sandboxes/doesnotexist/timeout", {"timeout": 30}),
        ("POST", "/v2/sandboxes/doesnotexist/connect", {"timeout": 30}),
    ],
    ids=["get", "delete", "pause", "timeout", "connect"],
)
def test_unknown_sandbox_is_404(daemon, method, path, body):
    r = daemon.request(method, path, body)
    assert r.status == 404, (r.status, r.body)
    assert "doesnotexist" in r.error_body()["message"]


@pytest.mark.parametrize("key", [None, "", "wrong-key"], ids=["missing", "empty", "wrong"])
def test_bad_api_key_is_401(daemon, no_new_sandboxes, key):
    for method, path, body in [
        ("GET", "/v2/sandboxes", None),
        ("POST", "/v2/sandboxes", {"templateID": "base", "metadata": {}, "envVars": {}}),
        ("GET", "/sandboxes/doesnotexist", None),
    ]:
        r = daemon.request(method, path, body, api_key=key)
        assert r.status == 401, (method, path, r.status, r.body)
        assert r.error_body()["code"] == 401


def test_wrong_api_key_cannot_touch_existing_sandbox(daemon, sandbox):
    sid = sandbox.sandbox_id
    for method, path, body in [
        ("DELETE", f"/sandboxes/{sid}", None),
        ("POST", f"/sandboxes/{sid}/pause", {}),
        ("POST", f"/sandboxes/{sid}/timeout", {"timeout": 1}),
        ("GET", f"/sandboxes/{sid}", None),
    ]:
        r = daemon.request(method, path, body, api_key="wrong-key")
        assert r.status == 401, (method, path, r.status, r.body)
        r.error_body()
    assert sandbox.is_running() is True
    assert sandbox.commands.run("echo still").stdout == "still\n"


def _create_raw(daemon):
    r = daemon.request("POST", "/v2/sandboxes", {"templateID": "base", "timeout": 60, "metadata": {}, "envVars": {}})
    assert r.status == 201, (r.status, r.body)
    body = r.json()
    daemon.register(body["sandboxID"])
    return body


def test_envd_access_token_through_router(daemon):
    body = _create_raw(daemon)
    sid, token = body["sandboxID"], body.get("envdAccessToken")
    try:
        assert isinstance(token, str) and token
        route = {"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": ENVD}

        def rpc(extra):
            return daemon.request(
                "POST", "/process.Process/List", raw=b"{}", api_key=None, headers={**route, **extra}
            )

        ok = rpc({"X-Access-Token": token})
        assert ok.status == 200, (ok.status, ok.body)
        assert ok.json() == {"processes": []}
        for extra in ({"X-Access-Token": "wrong"}, {}, {"X-Access-Token": token[:-1]}):
            r = rpc(extra)
            assert r.status == 401, (extra, r.status, r.body)
            assert r.error_body()["code"] == 401
        # the file API too (no signature either)
        r = daemon.request(
            "GET", "/files?path=/etc/hostname", api_key=None, headers={**route, "X-Access-Token": "wrong"}
        )
        assert r.status == 401, (r.status, r.body)
        r.error_body()
        Sandbox.connect(sid).files.write("/home/user/tok.txt", sid)
        r = daemon.request(
            "GET", "/files?path=/home/user/tok.txt", api_key=None, headers={**route, "X-Access-Token": token}
        )
        assert (r.status, r.body) == (200, sid.encode())
        # health needs no token
        assert daemon.request("GET", "/health", api_key=None, headers=route).status == 204
        # one sandbox's token does not open another sandbox
        other = _create_raw(daemon)
        try:
            r = daemon.request(
                "POST",
                "/process.Process/List",
                raw=b"{}",
                api_key=None,
                headers={"E2b-Sandbox-Id": other["sandboxID"], "E2b-Sandbox-Port": ENVD, "X-Access-Token": token},
            )
            assert r.status == 401, (r.status, r.body)
        finally:
            assert daemon.request("DELETE", f"/sandboxes/{other['sandboxID']}").status == 204
    finally:
        assert daemon.request("DELETE", f"/sandboxes/{sid}").status == 204


def test_router_unknown_sandbox_is_502_not_found(daemon):
    r = daemon.request(
        "GET", "/health", api_key=None, headers={"E2b-Sandbox-Id": "doesnotexist", "E2b-Sandbox-Port": ENVD}
    )
    assert r.status == 502, (r.status, r.body)
    assert "was not found" in r.error_body()["message"]


def test_router_missing_port_header_and_bad_port(daemon, sandbox):
    r = daemon.request("GET", "/health", api_key=None, headers={"E2b-Sandbox-Id": sandbox.sandbox_id})
    assert 400 <= r.status < 500, (r.status, r.body)
    assert "E2b-Sandbox-Port" in r.error_body()["message"]
    r = daemon.request(
        "GET", "/health", api_key=None, headers={"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": "abc"}
    )
    assert 400 <= r.status < 500, (r.status, r.body)
    r.error_body()
    r = daemon.request(
        "GET", "/health", api_key=None, headers={"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": "1234"}
    )
    assert r.status == 502, (r.status, r.body)
    assert "port is not open" in r.error_body()["message"]


# ---- through the SDK ------------------------------------------------------------------


def test_sdk_connect_unknown_sandbox(daemon):
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect("doesnotexist")


def test_sdk_unknown_sandbox_info_timeout_kill(daemon):
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info("doesnotexist")
    with pytest.raises(SandboxNotFoundException):
        Sandbox.set_timeout("doesnotexist", 30)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.pause("doesnotexist")
    assert Sandbox.kill("doesnotexist") is False


def test_sdk_unknown_template(daemon, no_new_sandboxes):
    with pytest.raises(SandboxException) as ei:
        Sandbox.create(template="no-such-template-xyz")
    assert "no-such-template-xyz" in str(ei.value)


def test_sdk_wrong_api_key(daemon, no_new_sandboxes):
    with pytest.raises(AuthenticationException):
        Sandbox.create(api_key="wrong-key")
    with pytest.raises(AuthenticationException):
        Sandbox.list(api_key="wrong-key").next_items()


@pytest.mark.parametrize(
    "timeout", [86401, 10**12, 2**63 - 1], ids=["day-plus-one", "huge", "i64-max"]
)
def test_timeout_above_maximum(daemon, sandbox, timeout):
    before_ids = daemon.list_ids()
    r = daemon.request("POST", "/v2/sandboxes", {"templateID": "base", "timeout": timeout})
    assert r.status == 400, (r.status, r.body)
    assert str(timeout) in r.error_body()["message"]
    r = daemon.request("POST", f"/sandboxes/{sandbox.sandbox_id}/timeout", {"timeout": timeout})
    assert r.status == 400, (r.status, r.body)
    r.error_body()
    assert daemon.list_ids() == before_ids


@pytest.mark.parametrize(
    "query",
    ["state=bogus", "limit=0", "limit=-1", "limit=abc", "nextToken=garbage", "order=sideways", "startedAfter=notadate"],
)
def test_bad_list_query_is_400(daemon, query):
    r = daemon.request("GET", f"/v2/sandboxes?{query}")
    assert r.status == 400, (r.status, r.body)
    r.error_body()


@pytest.mark.parametrize("name", ["A=B", ""], ids=["equals", "empty"])
def test_bad_env_var_name_is_400(daemon, no_new_sandboxes, name):
    r = daemon.request("POST", "/v2/sandboxes", {"templateID": "base", "envVars": {name: "1"}})
    assert r.status == 400, (r.status, r.body)
    r.error_body()


def test_env_var_value_with_nul_is_400(daemon):
    before = daemon.list_ids()
    r = daemon.request("POST", "/v2/sandboxes", {"templateID": "base", "timeout": 30, "envVars": {"X": "a\u0000b"}})
    if r.status == 201:
        sid = daemon.register(r.json()["sandboxID"])
        try:
            # show what the accepted sandbox is good for
            Sandbox.connect(sid).commands.run("echo hi")
        except SandboxException:
            pass
        finally:
            assert daemon.request("DELETE", f"/sandboxes/{sid}").status == 204
    assert r.status == 400, (r.status, r.body)
    r.error_body()
    assert daemon.list_ids() == before


def test_unknown_route_is_json_404(daemon):
    r = daemon.request("GET", "/v2/no-such-endpoint")
    assert r.status == 404, (r.status, r.body)
    r.error_body()


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"network": {"egress_proxy": {"address": "127.0.0.1:1080"}}}, "egressProxy"),
        ({"network": {"mask_request_host": "${PORT}-x.example"}}, "maskRequestHost"),
        ({"network": {"https_ports": [3000]}}, "httpsPorts"),
        ({"volume_mounts": {"v1": "/mnt/v"}}, "volumeMounts"),
        ({"mcp": {"exa": {"apiKey": "k"}}}, "mcp"),
    ],
)
def test_features_warren_lacks_are_refused_not_ignored(daemon, no_new_sandboxes, kwargs, named):
    # A sandbox without the proxy, volume or gateway its creator asked for would quietly do less.
    with pytest.raises(SandboxException) as e:
        Sandbox.create(**kwargs)
    assert named in str(e.value) and "400" in str(e.value), str(e.value)
