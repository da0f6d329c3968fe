// The JS SDK's own template builder (`Template().fromTemplate().copy().runCmd()` and
// `Template.build`) against Warren: uploads by hash, the build and its logs, a sandbox of the
// result, a failing step's error.
import { test, before, after } from 'node:test'
import assert from 'node:assert/strict'
import { mkdtempSync, mkdirSync, writeFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Sandbox, Template, BuildError } from 'e2b'
import { startDaemon } from './daemon.mjs'

let daemon
let context

before(async () => {
  daemon = await startDaemon()
  context = mkdtempSync(join(tmpdir(), 'warren-js-template-'))
  mkdirSync(join(context, 'app'))
  writeFileSync(join(context, 'app', 'hello.txt'), 'hi from js\n')
})

after(async () => {
  rmSync(context, { recursive: true, force: true })
  const status = await daemon.stop()
  assert.equal(status, 0, 'daemon exits cleanly')
})

test('Template.build builds, and a sandbox of it has its files, env and user', async () => {
  const template = Template({ fileContextPath: context })
    .fromTemplate('base')
    .copy('app/hello.txt', '/home/user/')
    .runCmd('echo built-by-$(whoami) > /home/user/marker')
    .setEnvs({ GREETING: 'hello from js' })
  const logs = []
  const info = await Template.build(template, 'js-built', { onBuildLogs: (e) => logs.push(String(e.message)) })
  assert.equal(info.templateId, 'js-built')
  assert.ok(logs.some((m) => m.includes('RUN echo built-by')), logs.join('\n'))
  assert.equal(await Template.exists('js-built'), true)

  const sbx = await Sandbox.create('js-built', { timeoutMs: 60_000 })
  try {
    assert.equal(await sbx.files.read('/home/user/hello.txt'), 'hi from js\n')
    assert.equal(await sbx.files.read('/home/user/marker'), 'built-by-user\n')
    const r = await sbx.commands.run('echo $GREETING')
    assert.equal(r.stdout, 'hello from js\n')
  } finally {
    await sbx.kill()
  }
})

test('a failing step rejects with its message', async () => {
  const template = Template().fromTemplate('base').runCmd('exit 7')
  await assert.rejects(Template.build(template, 'js-broken'), (e) => {
    assert.ok(e instanceof BuildError, `${e?.name}: ${e?.message}`)
    assert.match(e.message, /7/)
    return true
  })
})

test('tags: a build with tags, a sandbox by tag, assignTags, getTags, removeTags', async () => {
  const template = Template().fromTemplate('base').runCmd('echo tagged > /home/user/v')
  const info = await Template.build(template, 'js-tags:v1', { tags: ['stable'] })
  assert.deepEqual(info.tags, ['v1', 'stable'])
  const sbx = await Sandbox.create('js-tags:stable', { timeoutMs: 60_000 })
  try {
    assert.equal(await sbx.files.read('/home/user/v'), 'tagged\n')
  } finally {
    await sbx.kill()
  }
  const assigned = await Template.assignTags('js-tags:v1', 'prod')
  assert.deepEqual(assigned.tags, ['prod'])
  let tags = (await Template.getTags('js-tags')).map((t) => t.tag).sort()
  assert.deepEqual(tags, ['prod', 'stable', 'v1'])
  await Template.removeTags('js-tags', ['v1', 'prod'])
  tags = (await Template.getTags('js-tags')).map((t) => t.tag)
  assert.deepEqual(tags, ['stable'])
  await assert.rejects(Template.removeTags('js-tags', 'never'), /no tag never/)
})
