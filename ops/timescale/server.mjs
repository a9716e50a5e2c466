// A real TimescaleDB (2.23, PGlite WASM build) served over the PostgreSQL wire protocol.
// Used by the tests to execute the TimescaleDB branch of the migrations; in-memory, one client at a time.
// Usage: node server.mjs --port PORT [--host 127.0.0.1]
import { parseArgs } from 'node:util'
import { PGlite } from '@electric-sql/pglite'
import { timescaledb } from '@electric-sql/pglite/timescaledb'
import { PGLiteSocketServer } from '@electric-sql/pglite-socket'

const { values } = parseArgs({
  options: { port: { type: 'string' }, host: { type: 'string', default: '127.0.0.1' } },
})
if (!values.port) {
  console.error('usage: node server.mjs --port PORT [--host HOST]')
  process.exit(2)
}

const db = await PGlite.create({ extensions: { timescaledb } })
const server = new PGLiteSocketServer({ db, host: values.host, port: Number(values.port) })
await server.start()
console.log(JSON.stringify({ event: 'timescale.ready', host: values.host, port: Number(values.port) }))

const shutdown = async () => {
  await server.stop()
  await db.close()
  process.exit(0)
}
process.on('SIGTERM', shutdown)
process.on('SIGINT', shutdown)
