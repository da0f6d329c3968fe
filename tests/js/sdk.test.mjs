// The official E2B JS SDK against a live Warren daemon: each public Sandbox method of issue 3,
// and the error classes the SDK raises on E2B's cloud. Run by scripts/test.sh (`node --test`).
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import {
  Sandbox,
  CommandExitError,
  NotFoundError,
  SandboxNotFoundError,
  AuthenticationError,
  FileNotFoundError,
  InvalidArgumentError,
  SandboxError,
  TimeoutError,
} from 'e2b'
import { startDaemon } from './daemon.mjs'

let daemon
let sbx

before(async () => {
  daemon = await startDaemon()
  sbx = await Sandbox.create({ timeoutMs: 120_000, metadata: { suite: 'js' }, envs: { SUITE: 'js' } })
})

after(async () => {
  const status = await daemon.stop()
  assert.equal(status, 0, 'daemon exits cleanly')
})

test('commands: run, envs, cwd, user, exit errors', async () => {
  const r = await sbx.commands.run('echo $SUITE $X; pwd; whoami', { envs: { X: 'y' }, cwd: '/tmp' })
  assert.equal(r.stdout, 'js y\n/tmp\nuser\n')
  assert.equal((await sbx.commands.run('whoami', { user: 'root' })).stdout.trim(), 'root')
  await assert.rejects(sbx.commands.run('echo bad >&2; exit 3'), (e) => {
    assert.ok(e instanceof CommandExitError)
    assert.equal(e.exitCode, 3)
    assert.equal(e.stderr, 'bad\n')
    return true
  })
  await assert.rejects(sbx.commands.run('sleep 5', { timeoutMs: 300 }), TimeoutError)
})

test('commands: background, list, stdin, connect, kill', async () => {
  const h = await sbx.commands.run('read line; echo got:$line', { background: true, stdin: true })
  const listed = await sbx.commands.list()
  assert.ok(listed.some((p) => p.pid === h.pid))
  await sbx.commands.sendStdin(h.pid, 'hello\n')
  assert.equal((await h.wait()).stdout.trim(), 'got:hello')

  const long = await sbx.commands.run('sleep 60', { background: true })
  const other = await sbx.commands.connect(long.pid)
  assert.equal(await sbx.commands.kill(long.pid), true)
  await assert.rejects(other.wait(), CommandExitError)
  assert.equal(await sbx.commands.kill(999999), false)
})

test('pty: create, input, resize, kill', async () => {
  let out = ''
  const decoder = new TextDecoder()
  const pty = await sbx.pty.create({ cols: 91, rows: 23, onData: (d) => (out += decoder.decode(d)) })
  await sbx.pty.sendInput(pty.pid, new TextEncoder().encode('stty size; tty\n'))
  for (let i = 0; i < 50 && !out.includes('23 91'); i++) await new Promise((r) => setTimeout(r, 50))
  assert.match(out, /23 91/)
  assert.match(out, /\/dev\/pts\//)
  await sbx.pty.resize(pty.pid, { cols: 100, rows: 30 })
  assert.equal(await sbx.pty.kill(pty.pid), true)
})

test('files: write, read, list, info, exists, dirs, rename, remove, gzip', async () => {
  const info = await sbx.files.write('/tmp/js/a.txt', 'hello')
  assert.equal(info.path, '/tmp/js/a.txt')
  assert.equal(await sbx.files.read('/tmp/js/a.txt'), 'hello')
  await sbx.files.write([
    { path: '/tmp/js/b.bin', data: new Uint8Array([0, 255, 1]).buffer },
    { path: '/tmp/js/c.txt', data: 'c' },
  ])
  const bytes = await sbx.files.read('/tmp/js/b.bin', { format: 'bytes' })
  assert.deepEqual([...bytes], [0, 255, 1])
  const names = (await sbx.files.list('/tmp/js')).map((e) => e.name).sort()
  assert.deepEqual(names, ['a.txt', 'b.bin', 'c.txt'])
  const st = await sbx.files.getInfo('/tmp/js/a.txt')
  assert.equal(st.size, 5)
  assert.equal(st.type, 'file')
  assert.equal(st.owner, 'user')
  assert.equal(await sbx.files.exists('/tmp/js/zzz'), false)
  assert.equal(await sbx.files.makeDir('/tmp/js/d'), true)
  await sbx.files.rename('/tmp/js/c.txt', '/tmp/js/d/c.txt')
  await sbx.files.remove('/tmp/js/d')
  assert.equal(await sbx.files.exists('/tmp/js/d'), false)
  await sbx.files.write('/tmp/js/g.txt', 'zipped'.repeat(1000), { gzip: true })
  assert.equal(await sbx.files.read('/tmp/js/g.txt', { gzip: true }), 'zipped'.repeat(1000))
  await assert.rejects(sbx.files.read('/tmp/js/missing'), (e) => e instanceof FileNotFoundError || e instanceof NotFoundError)
  await assert.rejects(sbx.files.read('/tmp/js'), InvalidArgumentError)
})

test('files: watchDir', async () => {
  const events = []
  const w = await sbx.files.watchDir('/tmp', (e) => events.push(e))
  await sbx.files.write('/tmp/watched.txt', 'x')
  for (let i = 0; i < 50 && !events.some((e) => e.name === 'watched.txt'); i++) {
    await new Promise((r) => setTimeout(r, 50))
  }
  await w.stop()
  assert.ok(events.some((e) => e.name === 'watched.txt'), JSON.stringify(events))
  await assert.rejects(sbx.files.watchDir('/nope/none', () => {}), NotFoundError)
})

test('signed URLs and getHost', async () => {
  await sbx.files.write('/home/user/s.txt', 'signed')
  const url = await sbx.downloadUrl('/home/user/s.txt', { useSignatureExpiration: 60 })
  const r = await fetch(url)
  assert.equal(await r.text(), 'signed')
  assert.match(sbx.getHost(8000), new RegExp(`^8000-${sbx.sandboxId}\\.`))
})

test('control plane: info, list, setTimeout, connect, metrics, network', async () => {
  const info = await sbx.getInfo()
  assert.equal(info.sandboxId, sbx.sandboxId)
  assert.equal(info.metadata.suite, 'js')
  const page = await Sandbox.list({ query: { metadata: { suite: 'js' } } }).nextItems()
  assert.ok(page.some((s) => s.sandboxId === sbx.sandboxId))
  await sbx.setTimeout(200_000)
  const again = await Sandbox.connect(sbx.sandboxId)
  assert.equal((await again.commands.run('echo hi')).stdout, 'hi\n')
  const metrics = await sbx.getMetrics()
  assert.ok(metrics.length >= 1)
  assert.equal(metrics[0].memTotal, 512 * 1024 * 1024)
  await sbx.updateNetwork({ denyOut: ['10.0.0.0/8'], allowOut: ['10.1.2.3'] })
  await assert.rejects(sbx.updateNetwork({ denyOut: ['example.com'] }), SandboxError)
})

test('private traffic: trafficAccessToken', async () => {
  const p = await Sandbox.create({ timeoutMs: 60_000, network: { allowPublicTraffic: false } })
  try {
    assert.ok(p.trafficAccessToken)
    await p.commands.run('cd /tmp && python3 -m http.server 8000 >/dev/null 2>&1', { background: true })
    const get = async (headers) => {
      for (let i = 0; i < 50; i++) {
        const r = await fetch(daemon.url + '/', {
          headers: { 'E2b-Sandbox-Id': p.sandboxId, 'E2b-Sandbox-Port': '8000', ...headers },
        })
        if (r.status !== 502) return r.status
        await new Promise((res) => setTimeout(res, 100))
      }
      return 502
    }
    assert.equal(await get({}), 403)
    assert.equal(await get({ 'E2B-Traffic-Access-Token': p.trafficAccessToken }), 200)
  } finally {
    await p.kill()
  }
})

test('pause, resume by connect, kill', async () => {
  const p = await Sandbox.create({ timeoutMs: 60_000 })
  await p.files.write('/tmp/keep', 'kept')
  assert.equal(await p.pause(), true)
  assert.equal((await p.getInfo()).state, 'paused')
  const back = await Sandbox.connect(p.sandboxId)
  assert.equal(await back.files.read('/tmp/keep'), 'kept')
  assert.equal(await back.kill(), true)
  assert.equal(await Sandbox.kill(p.sandboxId), false)
})

test('errors map to the SDK classes', async () => {
  await assert.rejects(Sandbox.connect('nosuchsandbox'), (e) => e instanceof SandboxNotFoundError || e instanceof NotFoundError)
  await assert.rejects(Sandbox.getInfo('nosuchsandbox'), (e) => e instanceof SandboxNotFoundError || e instanceof NotFoundError)
  await assert.rejects(Sandbox.create({ apiKey: 'wrong' }), AuthenticationError)
  await assert.rejects(Sandbox.create('no-such-template'), SandboxError)
  await assert.rejects(Sandbox.setTimeout(sbx.sandboxId, -5000), SandboxError)
})
