// The official @e2b/code-interpreter JS package against the code-interpreter-v1 template: state,
// streaming callbacks, errors, contexts (bash, JavaScript, TypeScript too), envs, timeout, rich
// results (charts and DataFrame data too), bad input.
// Calls that get an error status pass a short `requestTimeoutMs`: the SDK (2.8.0) leaves its
// request timer running when it throws on an error status, which would hold the test process open
// for the default 60 s.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { Sandbox } from '@e2b/code-interpreter'
import { NotFoundError, SandboxError, TimeoutError } from 'e2b'
import { startDaemon } from './daemon.mjs'

let daemon
let sbx

before(async () => {
  daemon = await startDaemon()
  sbx = await Sandbox.create({ timeoutMs: 120_000 })
})

after(async () => {
  await sbx?.kill()
  const status = await daemon.stop()
  assert.equal(status, 0, 'daemon exits cleanly')
})

test('state persists between runCode calls', async () => {
  await sbx.runCode('x = 1')
  const r = await sbx.runCode('x + 1')
  assert.equal(r.text, '2')
  assert.equal(r.results[0].isMainResult, true)
  assert.ok(r.executionCount >= 2)
})

test('callbacks fire before the cell ends', async () => {
  const seen = []
  const t0 = Date.now()
  const r = await sbx.runCode("import time\nprint('a', flush=True)\ntime.sleep(1.5)\nprint('b')\n3", {
    onStdout: (m) => seen.push([m.line, Date.now() - t0]),
    onResult: (res) => seen.push([res.text, Date.now() - t0]),
  })
  const end = Date.now() - t0
  assert.deepEqual(seen.map((s) => s[0]), ['a\n', 'b\n', '3'])
  assert.ok(seen[0][1] < end - 1000, JSON.stringify(seen))
  assert.deepEqual(r.logs.stdout, ['a\n', 'b\n'])
})

test('errors, rich results and display', async () => {
  const r = await sbx.runCode('1/0')
  assert.equal(r.error.name, 'ZeroDivisionError')
  assert.equal(r.error.value, 'division by zero')
  const png = await sbx.runCode('import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.show()')
  assert.ok(Buffer.from(png.results[0].png, 'base64').subarray(0, 4).equals(Buffer.from([0x89, 0x50, 0x4e, 0x47])))
  const df = await sbx.runCode("import pandas as pd\npd.DataFrame({'a': [1, 2]})")
  assert.match(df.results[0].html, /<table/)
  const d = await sbx.runCode("from IPython.display import display, HTML\ndisplay(HTML('<i>1</i>'))\ndisplay(2)\n'z'")
  assert.deepEqual(d.results.map((x) => x.isMainResult), [false, false, true])
  assert.equal(d.results[0].html, '<i>1</i>')
})

test('chart and data results, JavaScript contexts', async () => {
  const bar = await sbx.runCode("import matplotlib.pyplot as plt\nplt.bar(['a', 'b'], [3, 1])\nplt.title('t')\nplt.show()")
  const chart = bar.results[0].chart
  assert.equal(chart.type, 'bar')
  assert.equal(chart.title, 't')
  assert.deepEqual(chart.elements.map((e) => [e.label, e.value]), [['a', 3], ['b', 1]])
  const df = await sbx.runCode("import pandas as pd\npd.DataFrame({'b': [1, 2], 'a': ['x', None]})")
  assert.deepEqual(df.results[0].data, { b: [1, 2], a: ['x', null] })
  const js = await sbx.runCode("const n = 6; console.log('hi'); n * 7", { language: 'js' })
  assert.equal(js.text, '42')
  assert.deepEqual(js.logs.stdout, ['hi\n'])
  const ctx = await sbx.createCodeContext({ language: 'ts' })
  assert.equal(ctx.language, 'typescript')
  assert.equal((await sbx.runCode('const s: string = "ok"; s', { context: ctx })).text, 'ok')
})

test('contexts, bash and envs', async () => {
  const ctx = await sbx.createCodeContext({ language: 'bash', cwd: '/tmp' })
  assert.equal(ctx.language, 'bash')
  const r = await sbx.runCode('echo "$GREETING from $(pwd)"', { context: ctx, envs: { GREETING: 'hi' } })
  assert.deepEqual(r.logs.stdout, ['hi from /tmp\n'])
  assert.ok((await sbx.listCodeContexts()).some((c) => c.id === ctx.id))
  await sbx.restartCodeContext(ctx)
  await sbx.removeCodeContext(ctx)
  await assert.rejects(sbx.runCode('echo', { context: ctx, requestTimeoutMs: 2000 }), NotFoundError)
  const py = await sbx.runCode("import os; print(os.environ.get('V'))", { envs: { V: 'per-run' } })
  assert.deepEqual(py.logs.stdout, ['per-run\n'])
})

test('timeout interrupts; the kernel keeps its state', async () => {
  await sbx.runCode('kept = 5')
  await assert.rejects(sbx.runCode('import time; time.sleep(30)', { timeoutMs: 1000 }), TimeoutError)
  assert.equal((await sbx.runCode('kept')).text, '5')
})

test('bad input', async () => {
  await assert.rejects(sbx.runCode('1', { language: 'cobol', requestTimeoutMs: 2000 }), SandboxError)
  const dead = await sbx.runCode('import os; os._exit(1)')
  assert.equal(dead.error.name, 'DeadKernelError')
  assert.equal((await sbx.runCode('1 + 1')).text, '2')
})
