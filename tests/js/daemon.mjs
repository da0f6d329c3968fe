// A live `warren serve` for the JS SDK tests, like tests/sdk/warren_helpers.py: a fresh data dir,
// a free loopback port and a random API key; the SDK is pointed at it through the environment.
// `stop()` kills what is left, stops the daemon and removes its host state (bridge, nftables
// tables, cgroup parents), which the daemon keeps on purpose for restarts.
import { spawn, execFileSync } from 'node:child_process'
import { mkdtempSync, rmSync, existsSync, readdirSync, rmdirSync, openSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve, dirname } from 'node:path'
import { createServer } from 'node:net'
import { randomBytes } from 'node:crypto'
import { fileURLToPath } from 'node:url'

const repo = resolve(dirname(fileURLToPath(import.meta.url)), '../..')

function freePort() {
  return new Promise((ok) => {
    const s = createServer()
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address()
      s.close(() => ok(port))
    })
  })
}

// The `w<tag>` prefix the daemon derives from its data dir (FNV-1a, LinuxRuntimeConfig::derived).
function prefixOf(dataDir) {
  let h = 0xcbf29ce484222325n
  for (const b of Buffer.from(resolve(dataDir))) {
    h ^= BigInt(b)
    h = (h * 0x100000001b3n) & 0xffffffffffffffffn
  }
  const abc = 'abcdefghijklmnopqrstuvwxyz0123456789'
  let tag = 'w'
  for (let i = 0n; i < 3n; i++) tag += abc[Number((h >> (i * 8n)) % 36n)]
  return tag
}

function removeHostState(prefix) {
  const quiet = (cmd, args) => {
    try {
      execFileSync(cmd, args, { stdio: 'ignore' })
    } catch {}
  }
  const links = execFileSync('ip', ['-o', 'link', 'show']).toString()
  for (const line of links.split('\n')) {
    const name = (line.split(':')[1] || '').trim().split('@')[0]
    if (name.startsWith(prefix)) quiet('ip', ['link', 'del', name])
  }
  quiet('nft', ['delete', 'table', 'inet', `warren_${prefix}`])
  quiet('nft', ['delete', 'table', 'bridge', `warren_${prefix}`])
  for (const c of readdirSync('/sys/fs/cgroup')) {
    for (const p of [join('/sys/fs/cgroup', c, `warren-${prefix}`), join('/sys/fs/cgroup', `warren-${prefix}`)]) {
      if (existsSync(p)) {
        try {
          rmdirSync(p)
        } catch {}
      }
    }
  }
}

export async function startDaemon() {
  const bin = resolve(repo, process.env.WARREN_BIN || 'target/debug/warren')
  let lastError
  for (let attempt = 0; attempt < 6; attempt++) {
    const dataDir = mkdtempSync(join(tmpdir(), 'warren-jstest-'))
    const port = await freePort()
    const apiKey = 'wjs_' + randomBytes(16).toString('hex')
    const logPath = dataDir + '.log'
    const log = openSync(logPath, 'w')
    const proc = spawn(
      bin,
      ['serve', '--listen', `127.0.0.1:${port}`, '--data-dir', dataDir, '--api-key', apiKey,
        '--envd-binary', join(dirname(bin), 'warren-envd')],
      { stdio: ['ignore', log, log], env: { ...process.env, RUST_LOG: 'info' } },
    )
    const url = `http://127.0.0.1:${port}`
    const deadline = Date.now() + 30000
    let up = false
    while (Date.now() < deadline && proc.exitCode === null) {
      try {
        if ((await fetch(url + '/health')).ok) {
          up = true
          break
        }
      } catch {}
      await new Promise((r) => setTimeout(r, 50))
    }
    if (up) {
      Object.assign(process.env, { E2B_API_KEY: apiKey, E2B_API_URL: url, E2B_SANDBOX_URL: url })
      delete process.env.E2B_DEBUG
      delete process.env.E2B_DOMAIN
      return makeHandle({ proc, url, apiKey, dataDir, logPath })
    }
    proc.kill('SIGKILL')
    const text = execFileSync('tail', ['-5', logPath]).toString()
    removeHostState(prefixOf(dataDir))
    rmSync(dataDir, { recursive: true, force: true })
    lastError = new Error(`warren did not start: ${text}`)
    if (!text.includes('overlaps')) break
  }
  throw lastError
}

function makeHandle({ proc, url, apiKey, dataDir, logPath }) {
  return {
    url,
    apiKey,
    prefix: prefixOf(dataDir),
    async api(method, path, body, headers = {}) {
      const r = await fetch(url + path, {
        method,
        headers: { 'X-API-KEY': apiKey, 'content-type': 'application/json', ...headers },
        body: body === undefined ? undefined : JSON.stringify(body),
      })
      const text = await r.text()
      return { status: r.status, text, json: () => JSON.parse(text) }
    },
    async stop() {
      const list = await this.api('GET', '/v2/sandboxes')
      for (const s of list.json()) await this.api('DELETE', `/sandboxes/${s.sandboxID}`)
      proc.kill('SIGTERM')
      await new Promise((r) => (proc.exitCode !== null ? r() : proc.once('exit', r)))
      removeHostState(prefixOf(dataDir))
      rmSync(dataDir, { recursive: true, force: true })
      rmSync(logPath, { force: true })
      return proc.exitCode
    },
  }
}
