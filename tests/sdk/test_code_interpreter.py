"""The unmodified `e2b-code-interpreter` SDK against the `code-interpreter-v1` template: stateful
`run_code` over real Jupyter kernels (ipykernel, bash_kernel) behind warren-code-interpreter on
port 49999, reached through the daemon's router."""

from __future__ import annotations

import asyncio
import base64
import time

import pytest
from e2b import NotFoundException, SandboxException, TimeoutException
from e2b_code_interpreter import AsyncSandbox, Context, Sandbox

from warren_helpers import sandbox_factory


@pytest.fixture
def new_ci(daemon):
    yield from sandbox_factory(daemon, Sandbox)


@pytest.fixture
def ci(new_ci):
    return new_ci()


def test_default_template_and_state(ci):
    info = Sandbox.get_info(ci.sandbox_id)
    assert info.template_id == "code-interpreter-v1"
    first = ci.run_code("x = 1")
    assert first.error is None and first.results == []
    second = ci.run_code("x + 1")
    assert second.text == "2"
    assert second.results[0].is_main_result is True
    assert second.execution_count == first.execution_count + 1
    r = ci.run_code("print('hello'); 'quoted'")
    assert r.logs.stdout == ["hello\n"]
    assert r.text == "quoted"
    # The server is the template's start command, a process envd tracks.
    procs = ci.commands.list()
    assert any("warren-code-interpreter" in " ".join([p.cmd] + p.args) for p in procs)
    assert ci.commands.run("curl -s localhost:49999/health").stdout == '"OK"'


def test_callbacks_fire_while_the_cell_runs(ci):
    seen = []
    start = time.monotonic()
    r = ci.run_code(
        "import sys, time\nprint('a', flush=True)\nprint('e', file=sys.stderr, flush=True)\n"
        "time.sleep(1.5)\nprint('b')\n7",
        on_stdout=lambda m: seen.append(("out", m.line, time.monotonic() - start)),
        on_stderr=lambda m: seen.append(("err", m.line, time.monotonic() - start)),
        on_result=lambda res: seen.append(("result", res.text, time.monotonic() - start)),
    )
    end = time.monotonic() - start
    assert [(k, v) for k, v, _ in seen] == [("out", "a\n"), ("err", "e\n"), ("out", "b\n"), ("result", "7")]
    assert seen[0][2] < end - 1.0, seen
    assert r.logs.stdout == ["a\n", "b\n"] and r.logs.stderr == ["e\n"]


def test_errors(ci):
    errors = []
    r = ci.run_code("1/0", on_error=errors.append)
    assert r.error.name == "ZeroDivisionError"
    assert r.error.value == "division by zero"
    assert "ZeroDivisionError" in r.error.traceback
    assert errors and errors[0].name == "ZeroDivisionError"
    assert ci.run_code("def f(:\n  pass").error.name == "SyntaxError"
    assert ci.run_code("undefined_name").error.name == "NameError"
    # The kernel keeps serving after errors.
    assert ci.run_code("40 + 2").text == "42"


def test_contexts(ci):
    ci.run_code("v = 'default'")
    ctx = ci.create_code_context(cwd="/tmp")
    assert ctx.language == "python" and ctx.cwd == "/tmp"
    assert ci.run_code("import os; os.getcwd()", context=ctx).text == "/tmp"
    assert ci.run_code("'v' in globals()", context=ctx).text == "False"
    ci.run_code("v = 'ctx'", context=ctx)
    assert ci.run_code("v").text == "default"
    assert ci.run_code("v", context=ctx).text == "ctx"
    ids = [c.id for c in ci.list_code_contexts()]
    assert ctx.id in ids and len(ids) == 2  # the default python context and this one

    ci.restart_code_context(ctx)
    assert ci.run_code("v", context=ctx).error.name == "NameError"
    assert ci.run_code("v").text == "default"

    ci.remove_code_context(ctx.id)
    assert ctx.id not in [c.id for c in ci.list_code_contexts()]
    with pytest.raises(NotFoundException):
        ci.run_code("1", context=ctx)
    with pytest.raises(NotFoundException):
        ci.remove_code_context(ctx.id)
    with pytest.raises(NotFoundException):
        ci.restart_code_context(ctx.id)


def test_bash(ci):
    ctx = ci.create_code_context(language="bash", cwd="/tmp")
    assert ctx.language == "bash"
    r = ci.run_code("echo $((1 + 2)); pwd; X=5", context=ctx)
    assert "".join(r.logs.stdout) == "3\n/tmp\n"
    assert "".join(ci.run_code("echo $X", context=ctx).logs.stdout) == "5\n"
    # The default bash context, by language.
    ci.run_code("Y=7", language="bash")
    assert "".join(ci.run_code("echo $Y", language="bash").logs.stdout) == "7\n"
    assert ci.run_code("exit_status_test_cmd_that_does_not_exist", language="bash").error is not None
    assert {c.language for c in ci.list_code_contexts()} == {"python", "bash"}


def test_javascript_and_typescript(ci):
    # Deno's kernel (`deno jupyter`), from the npm registry's deno package.
    r = ci.run_code("const x = 20; console.log('hi'); x + 1", language="js")
    assert r.error is None, r.error
    assert r.text == "21" and r.logs.stdout == ["hi\n"]
    assert ci.run_code("x * 2", language="javascript").text == "40"  # the same default context
    assert ci.run_code("Deno.env.get('FOO')", language="js", envs={"FOO": "bar"}).text == "bar"
    assert ci.run_code("Deno.env.get('FOO') ?? 'unset'", language="js").text == "unset"
    err = ci.run_code("throw new TypeError('boom')", language="js").error
    assert (err.name, err.value) == ("TypeError", "boom")
    ctx = ci.create_code_context(language="ts", cwd="/tmp")
    assert ctx.language == "typescript"
    assert ci.run_code("const n: number = 6; n * 7", context=ctx).text == "42"
    assert ci.run_code("Deno.cwd()", context=ctx).text == "/tmp"
    # Deno ignores SIGINT: the timeout's interrupt goes as an interrupt_request; state is kept.
    ci.run_code("let kept = 41", language="js")
    with pytest.raises(TimeoutException):
        ci.run_code("while (true) {}", language="js", timeout=2)
    start = time.monotonic()
    assert ci.run_code("kept + 1", language="js").text == "42"
    assert time.monotonic() - start < 3
    assert {c.language for c in ci.list_code_contexts()} >= {"javascript", "typescript"}


def test_envs(ci):
    r = ci.run_code("import os; print(os.environ.get('FOO'), os.environ['HOME'])", envs={"FOO": "bar 'q'"})
    assert r.logs.stdout == ["bar 'q' /root\n"]
    # Per-execution: gone (or back to what it was) afterwards.
    assert ci.run_code("import os; print(os.environ.get('FOO'))").logs.stdout == ["None\n"]
    ci.run_code("os.environ['KEEP'] = 'old'")
    assert ci.run_code("print(os.environ['KEEP'])", envs={"KEEP": "new"}).logs.stdout == ["new\n"]
    assert ci.run_code("print(os.environ['KEEP'])").logs.stdout == ["old\n"]
    r = ci.run_code("echo \"$FOO\"", language="bash", envs={"FOO": "it's $HOME"})
    assert r.logs.stdout == ["it's $HOME\n"]
    assert ci.run_code('echo "[${FOO-unset}]"', language="bash").logs.stdout == ["[unset]\n"]


def test_sandbox_env_vars_reach_the_kernel(new_ci):
    sbx = new_ci(envs={"SANDBOX_WIDE": "yes"})
    assert sbx.run_code("import os; os.environ['SANDBOX_WIDE']").text == "yes"


def test_timeout_interrupts_and_keeps_state(ci):
    ci.run_code("kept = 41")
    start = time.monotonic()
    with pytest.raises(TimeoutException):
        ci.run_code("import time; time.sleep(60)", timeout=2)
    assert time.monotonic() - start < 10
    # Interrupted, not restarted: the state is still there, and the kernel answers at once.
    start = time.monotonic()
    assert ci.run_code("kept + 1").text == "42"
    assert time.monotonic() - start < 5


def test_kernel_death_is_reported_and_the_next_run_works(ci):
    ci.run_code("before = 1")
    r = ci.run_code("import os; os._exit(1)")
    assert r.error is not None and r.error.name == "DeadKernelError"
    assert ci.run_code("1 + 1").text == "2"
    assert ci.run_code("before").error.name == "NameError"  # a new kernel


def test_a_killed_server_leaves_no_kernel_behind(ci):
    def pids(pattern):
        # `[x]yz`: the shell running pgrep has the pattern in its command line, not the match.
        r = ci.commands.run(f"pgrep -f '[{pattern[0]}]{pattern[1:]}' || true", user="root")
        return r.stdout.split()

    # A process the kernel started, in the kernel's process group.
    ci.run_code("import subprocess; p = subprocess.Popen(['sleep', '1234'])")
    ci.create_code_context(language="bash")
    assert pids("ipykernel_launcher") and pids("bash_kernel") and pids("sleep 1234")
    ci.commands.run("kill -9 $(pidof warren-code-interpreter)", user="root")
    # The kernels die with the server (PDEATHSIG).
    assert wait_for(lambda: not pids("ipykernel_launcher") and not pids("bash_kernel")), (
        pids("kernel_launch")
    )
    # What they started is killed by the next server's start-up clean-up.
    assert pids("sleep 1234")
    ci.commands.run(
        "/opt/warren/bin/warren-code-interpreter 2>>/var/log/warren-code-interpreter.log",
        user="root",
        background=True,
    )
    assert wait_for(lambda: not pids("sleep 1234"))
    assert wait_for(lambda: ci.commands.run("curl -s localhost:49999/health || true").stdout == '"OK"')
    assert ci.run_code("1 + 1").text == "2"


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def test_matplotlib_png(ci):
    r = ci.run_code(
        "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.title('squares')\nplt.show()"
    )
    assert r.error is None, r.error
    pngs = [res.png for res in r.results if res.png]
    assert len(pngs) == 1
    assert base64.b64decode(pngs[0]).startswith(b"\x89PNG\r\n\x1a\n")
    assert "png" in r.results[0].formats()


def test_pandas_dataframe(ci):
    r = ci.run_code("import pandas as pd\npd.DataFrame({'name': ['a', 'b'], 'n': [1, 2]})")
    assert r.error is None, r.error
    res = r.results[0]
    assert res.is_main_result
    assert "<table" in res.html and "name" in res.html
    assert "name" in res.text and "n" in res.text
    assert set(res.formats()) >= {"text", "html"}


def test_charts(ci):
    from e2b_code_interpreter.charts import BarChart, ChartType, LineChart, PieChart, ScatterChart

    def chart_of(code):
        r = ci.run_code("import matplotlib.pyplot as plt\n" + code + "\nplt.show()")
        assert r.error is None, r.error
        [res] = r.results
        assert res.png and "chart" in res.formats(), res.formats()
        return res.chart

    line = chart_of(
        "plt.plot([1, 2, 3], [1, 4, 9], label='squares')\nplt.plot([1, 2, 3], [1, 2, 3], label='id')\n"
        "plt.title('growth'); plt.xlabel('n'); plt.ylabel('value')"
    )
    assert isinstance(line, LineChart) and line.type == ChartType.LINE
    assert (line.title, line.x_label, line.y_label) == ("growth", "n", "value")
    assert [e.label for e in line.elements] == ["squares", "id"]
    assert line.elements[0].points == [(1, 1), (2, 4), (3, 9)]
    assert line.x_scale == "linear" and line.x_ticks and line.y_tick_labels

    bar = chart_of("plt.bar(['a', 'b', 'c'], [3, 1, 2])\nplt.title('bars')")
    assert isinstance(bar, BarChart) and bar.type == ChartType.BAR
    assert [(e.label, e.value) for e in bar.elements] == [("a", 3), ("b", 1), ("c", 2)]

    scatter = chart_of("plt.scatter([1, 2, 3], [3, 1, 2], label='pts')")
    assert isinstance(scatter, ScatterChart) and scatter.type == ChartType.SCATTER
    assert scatter.elements[0].label == "pts"
    assert scatter.elements[0].points == [(1, 3), (2, 1), (3, 2)]

    pie = chart_of("plt.pie([1, 2, 3], labels=['x', 'y', 'z'])\nplt.title('shares')")
    assert isinstance(pie, PieChart) and pie.type == ChartType.PIE and pie.title == "shares"
    assert [(e.label, e.angle) for e in pie.elements] == [("x", 60), ("y", 120), ("z", 180)]

    box = chart_of("plt.boxplot([[1, 2, 3, 4, 5, 20], [2, 3, 4]], tick_labels=['a', 'b'], patch_artist=True)")
    assert box.type == ChartType.BOX_AND_WHISKER
    assert [e.label for e in box.elements] == ["a", "b"]
    assert box.elements[0].median == 3.5 and box.elements[0].outliers == [20]

    several = chart_of("fig, (a, b) = plt.subplots(1, 2)\na.plot([1, 2], [3, 4])\nb.bar(['p'], [1])\nfig.suptitle('two')")
    assert several.type == ChartType.SUPERCHART and several.title == "two"
    assert [c.type for c in several.elements] == [ChartType.LINE, ChartType.BAR]

    # Axes with nothing drawn have no chart data, but still their picture.
    r = ci.run_code("import matplotlib.pyplot as plt\nplt.subplots()\nplt.show()")
    assert r.results[0].png and r.results[0].chart is None


def test_dataframe_data(ci):
    r = ci.run_code(
        "import pandas as pd\n"
        "pd.DataFrame({'name': ['a', 'b'], 'n': [1, 2], 'x': [0.5, None],"
        " 'when': pd.to_datetime(['2024-01-01', '2024-01-02'])})"
    )
    assert r.error is None, r.error
    res = r.results[0]
    assert "data" in res.formats() and "html" in res.formats()
    # Columns in the frame's order, values as lists, timestamps in ISO form.
    assert list(res.data) == ["name", "n", "x", "when"]
    assert res.data["name"] == ["a", "b"] and res.data["n"] == [1, 2]
    assert res.data["x"][0] == 0.5
    assert res.data["when"] == ["2024-01-01T00:00:00", "2024-01-02T00:00:00"]
    # Other objects get no data.
    assert ci.run_code("[1, 2]").results[0].data is None


def test_several_display_results(ci):
    r = ci.run_code(
        "from IPython.display import display, HTML, Markdown, JSON, Latex, SVG\n"
        "display(1)\ndisplay(HTML('<b>x</b>'))\ndisplay(Markdown('# t'))\n"
        "display(Latex('$x$'))\ndisplay(JSON({'a': 1}))\n"
        "display(SVG('<svg xmlns=\"http://www.w3.org/2000/svg\"></svg>'))\n'last'"
    )
    assert r.error is None, r.error
    assert [res.is_main_result for res in r.results] == [False] * 6 + [True]
    assert r.results[0].text == "1"
    assert r.results[1].html == "<b>x</b>"
    assert r.results[2].markdown == "# t"
    assert r.results[3].latex == "$x$"
    assert r.results[4].json == {"a": 1}
    assert r.results[5].svg.startswith("<svg")
    assert r.text == "last"


def test_bad_input(ci):
    with pytest.raises(SandboxException, match="unsupported language"):
        ci.run_code("1", language="cobol")
    with pytest.raises(SandboxException, match="unsupported language"):
        ci.create_code_context(language="cobol")
    with pytest.raises(SandboxException, match="not an existing directory"):
        ci.create_code_context(cwd="/nonexistent")
    with pytest.raises(NotFoundException):
        ci.run_code("1", context=Context("no-such-context", "python", "/"))
    with pytest.raises(SandboxException, match="not both"):
        ci.run_code("1", language="python", context=Context("x", "python", "/"))
    # Binary garbage on stdout is decoded lossily, not fatal.
    r = ci.run_code("import os, time; os.write(1, bytes(range(256)) + b'\\n'); time.sleep(0.3)")
    assert r.error is None
    assert "".join(r.logs.stdout).endswith("\n") and "\ufffd" in "".join(r.logs.stdout)
    # input() cannot hang the kernel: stdin is not offered.
    assert ci.run_code("input()").error.name == "StdinNotImplementedError"
    assert ci.run_code("1 + 1").text == "2"


def test_huge_output(ci):
    r = ci.run_code("print('x' * 20_000_000)")
    assert r.error is None
    assert sum(len(s) for s in r.logs.stdout) == 20_000_001
    # Huge results and errors too, whole.
    r = ci.run_code("'r' * 5_000_000")
    assert len(r.text) == 5_000_000
    r = ci.run_code("raise ValueError('v' * 3_000_000)")
    assert r.error.name == "ValueError" and len(r.error.value) == 3_000_000
    # Huge code (data inline in a cell) is taken up to 32 MiB, and beyond that refused clearly.
    assert ci.run_code("len('" + "c" * 5_000_000 + "')").text == "5000000"
    with pytest.raises(SandboxException, match="over 32 MiB"):
        ci.run_code("len('" + "c" * 40_000_000 + "')")
    assert ci.run_code("1 + 1").text == "2"
    assert server_memory_kib(ci)["VmHWM"] < 200 * 1024


def test_binary_and_odd_output(ci):
    # Bytes that are not UTF-8, NULs and a line with no end, from Python and from a subprocess,
    # on both streams: decoded lossily, delivered, and the kernel keeps serving.
    r = ci.run_code(
        "import os, sys, subprocess, time\n"
        "os.write(1, b'\\xff\\xfe\\x00raw')\n"
        "os.write(2, b'\\x80err\\x00')\n"
        "subprocess.run(['head', '-c', '4096', '/dev/urandom'])\n"
        "time.sleep(0.3)\n"
        "print('done')"
    )
    assert r.error is None, r.error
    out, err = "".join(r.logs.stdout), "".join(r.logs.stderr)
    assert "raw" in out and "\ufffd" in out and "\x00" in out and out.endswith("done\n")
    assert "err" in err and "\ufffd" in err
    # Characters that Python's str.splitlines (the SDK's line reader) takes for line ends.
    r = ci.run_code("print('a\\x85b\\u2028c\\u2029d\\x1ce')")
    assert r.logs.stdout == ["a\x85b\u2028c\u2029d\x1ce\n"]
    r = ci.run_code("printf 'a\\x00b\\xff'; echo", language="bash")
    assert r.error is None and "a" in "".join(r.logs.stdout)
    assert ci.run_code("1 + 1").text == "2"


def test_bad_requests_get_clear_errors(ci):
    def post(path, body):
        r = ci.commands.run(
            f"curl -s -w ' %{{http_code}}' -XPOST localhost:49999{path} -d '{body}'", user="root"
        )
        text, _, status = r.stdout.rpartition(" ")
        return int(status), text

    assert post("/execute", "{nope") == (400, "invalid request body: key must be a string at line 1 column 2")
    status, text = post("/execute", '{"language": "python"}')
    assert status == 400 and "missing field `code`" in text
    status, text = post("/execute", '{"code": 1}')
    assert status == 400 and "expected a string" in text
    status, text = post("/execute", '{"code": "1", "env_vars": {"A": 1}}')
    assert status == 400 and "expected a string" in text
    status, text = post("/contexts", '{"language": 7}')
    assert status == 400 and "invalid request body" in text
    assert post("/nope", "{}")[0] == 404
    # Through the SDK: names a shell cannot have.
    with pytest.raises(SandboxException, match="invalid environment variable name"):
        ci.run_code("echo hi", language="bash", envs={"1BAD": "x"})
    assert ci.run_code("1 + 1").text == "2"


def server_memory_kib(sbx) -> dict:
    """VmRSS and VmHWM (peak) of the code-interpreter server, from /proc inside the sandbox."""
    out = sbx.commands.run(
        "grep -E '^Vm(RSS|HWM):' /proc/$(pidof warren-code-interpreter)/status", user="root"
    ).stdout
    return {line.split(":")[0]: int(line.split()[1]) for line in out.splitlines()}


def test_endless_output_is_bounded_and_the_server_keeps_serving(ci):
    ci.run_code("kept = 41")
    other = ci.create_code_context()
    chunks = []
    errors = []

    def meanwhile():
        # While the kernel of the default context prints as fast as it can, the server still
        # answers, and another context runs cells.
        try:
            time.sleep(1)
            t0 = time.monotonic()
            assert len(ci.list_code_contexts()) == 2
            assert ci.run_code("40 + 2", context=other).text == "42"
            assert time.monotonic() - t0 < 5
        except Exception as e:  # reported by the main thread
            errors.append(e)

    import threading

    t = threading.Thread(target=meanwhile)
    t.start()
    start = time.monotonic()
    with pytest.raises(TimeoutException):
        ci.run_code("while True: print('y' * 1000)", timeout=4, on_stdout=lambda m: chunks.append(len(m.line)))
    t.join()
    assert not errors, errors
    assert time.monotonic() - start < 10
    # Streamed in small pieces as it came, not held back.
    assert sum(chunks) > 1_000_000 and max(chunks) <= 64 * 1024, (len(chunks), max(chunks))
    # The SDK's timeout closed the connection, the server interrupted the kernel: state kept.
    start = time.monotonic()
    assert ci.run_code("kept + 1").text == "42"
    assert time.monotonic() - start < 5
    mem = server_memory_kib(ci)
    assert mem["VmHWM"] < 64 * 1024, mem


def test_huge_output_reaches_a_slow_client_whole(ci):
    # Backpressure, not loss: a client that reads slowly gets every byte, and neither the server
    # nor the kernel holds it all meanwhile.
    seen = 0

    def slow(m):
        nonlocal seen
        seen += len(m.line)
        time.sleep(0.005)

    r = ci.run_code("for i in range(20_000): print('z' * 999)", on_stdout=slow)
    assert r.error is None
    assert seen == 20_000_000
    assert "".join(r.logs.stdout).count("\n") == 20_000
    assert server_memory_kib(ci)["VmHWM"] < 64 * 1024


@pytest.mark.asyncio
async def test_async_sdk(daemon):
    sbx = await AsyncSandbox.create(timeout=120)
    daemon.register(sbx.sandbox_id)
    try:
        await sbx.run_code("x = 20")
        lines = []

        async def on_stdout(m):
            lines.append(m.line)

        r = await sbx.run_code("print('hi'); x + 1", on_stdout=on_stdout)
        assert r.text == "21" and lines == ["hi\n"]
        ctx = await sbx.create_code_context(language="bash")
        r = await sbx.run_code("echo $((6 * 7))", context=ctx)
        assert r.logs.stdout == ["42\n"]
        assert ctx.id in [c.id for c in await sbx.list_code_contexts()]
        with pytest.raises(TimeoutException):
            await sbx.run_code("import time; time.sleep(30)", timeout=1)
        assert (await sbx.run_code("x")).text == "20"
        # Two contexts run at the same time.
        other = await sbx.create_code_context()
        t0 = time.monotonic()
        await asyncio.gather(
            sbx.run_code("import time; time.sleep(1)"),
            sbx.run_code("import time; time.sleep(1)", context=other),
        )
        assert time.monotonic() - t0 < 1.9
        await sbx.remove_code_context(other)
    finally:
        await sbx.kill()
