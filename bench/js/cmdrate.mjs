// commands.run("true") round trips per second through the router with the official JS SDK:
// `clients` concurrent callers in one Node process for `seconds`. Prints one JSON line.
// Usage: node cmdrate.mjs SANDBOX_ID CLIENTS SECONDS (E2B_API_KEY, E2B_API_URL, E2B_SANDBOX_URL set).
import { Sandbox } from 'e2b'

const [id, clients, seconds] = [process.argv[2], Number(process.argv[3]), Number(process.argv[4])]
const sbx = await Sandbox.connect(id)
for (let i = 0; i < 20; i++) await sbx.commands.run('true') // warm connections
let done = 0
let errors = 0
let lastError = null
const end = performance.now() + seconds * 1000
const t0 = performance.now()
await Promise.all(
  Array.from({ length: clients }, async () => {
    while (performance.now() < end) {
      try {
        await sbx.commands.run('true')
        done++
      } catch (e) {
        errors++
        lastError = String(e).slice(0, 200)
      }
    }
  }),
)
const elapsed = (performance.now() - t0) / 1000
console.log(JSON.stringify({ clients, rate: done / elapsed, errors, lastError }))
