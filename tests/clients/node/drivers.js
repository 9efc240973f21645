// The driver matrix's checks for node-postgres (npm `pg`), the same ones and the same JSON lines as
// tests/clients/py_drivers.py; tests/e2e/test_pg_drivers.py runs it and asserts on them.
//
//   node drivers.js PHASE HOST PORT USER PASSWORD DATABASE CA_PEM      (PHASE: main | wake)
//
// TLS is verify-full (the gateway's CA, and the certificate must name HOST); authentication is
// SCRAM-SHA-256 with channel binding, the gateway offering nothing weaker.
'use strict'

const fs = require('fs')
const pg = require('pg')

const LARGE_ROWS = 4096
// Cancel only once the server runs the sleep, seen from a second connection: a CancelRequest that
// arrived before the query would be lost, and the check would wait 30 s.
const SLEEPERS_SQL =
  "select count(*)::int as n from pg_stat_activity where query = 'select pg_sleep(30)' and state = 'active'"
const CHECK_TIMEOUT_MS = 30000

function emit(check, fields) {
  process.stdout.write(JSON.stringify({ check, ...fields }) + '\n')
}

async function bounded(name, fn) {
  let timer
  const timeout = new Promise((resolve) => {
    timer = setTimeout(() => resolve({ hung: true }), CHECK_TIMEOUT_MS)
  })
  try {
    const result = await Promise.race([fn().then((value) => ({ value })), timeout])
    if (result.hung) {
      emit(name, { error: `no answer in ${CHECK_TIMEOUT_MS / 1000} s` })
      process.exit(1) // the connection is stuck mid-protocol: nothing after this can be trusted
    }
    emit(name, result.value)
  } catch (err) {
    emit(name, { error: String(err && err.stack ? err.stack : err) })
  } finally {
    clearTimeout(timer)
  }
}

async function main() {
  const [phase, host, port, user, password, database, ca] = process.argv.slice(2)
  const config = {
    host,
    port: Number(port),
    user,
    password,
    database,
    ssl: { ca: fs.readFileSync(ca, 'utf8'), rejectUnauthorized: true },
    // SCRAM-SHA-256-PLUS (tls-server-end-point) when the gateway offers it, as libpq does.
    enableChannelBinding: true,
    connectionTimeoutMillis: 45000, // past the gateway's 30 s wake timeout
  }
  const client = new pg.Client(config)
  await client.connect()
  // A named query is prepared on the server once per connection and reused by name after that.
  const selectV = (k) => ({ name: 'select-v', text: 'select v from kv where k = $1', values: [k] })

  if (phase === 'wake') {
    await bounded('wake', async () => ({ value: (await client.query(selectV(1))).rows[0].v }))
    await client.end()
    return
  }

  await bounded('connect', async () => {
    const r = await client.query('select current_user as u, current_database() as d')
    await client.query('create table kv (k int primary key, v text)')
    await client.query("insert into kv values (1, 'v0')")
    return { user: r.rows[0].u, database: r.rows[0].d, tls: client.connection.stream.encrypted === true }
  })

  await bounded('param', async () => {
    const r = await client.query({ text: "select $1::int + 1, $2::text || '!'", values: [41, 'hi'], rowMode: 'array' })
    return { value: r.rows[0] }
  })

  await bounded('large', async () => {
    const r = await client.query({
      text: "select repeat('x', 1024) from generate_series(1, $1)",
      values: [LARGE_ROWS],
      rowMode: 'array',
    })
    return { rows: r.rows.length, bytes: r.rows.reduce((n, row) => n + row[0].length, 0) }
  })

  await bounded('prepared', async () => {
    const seen = []
    for (const i of [1, 2, 3]) {
      await client.query('begin')
      await client.query('update kv set v = $1 where k = 1', [`v${i}`])
      seen.push((await client.query(selectV(1))).rows[0].v)
      await client.query('commit')
    }
    seen.push((await client.query(selectV(1))).rows[0].v)
    return { values: seen }
  })

  await bounded('rollback', async () => {
    await client.query('begin')
    await client.query("insert into kv values (99, 'gone')")
    await client.query('rollback')
    const r = await client.query('select count(*)::int as n from kv where k = 99')
    return { count: r.rows[0].n }
  })

  await bounded('cancel', async () => {
    // node-postgres's cancel: a second client (plain TCP, as libpq does it) sends the
    // CancelRequest with the first one's backend key.
    const sleeping = new pg.Query('select pg_sleep(30)')
    const done = new Promise((resolve) => {
      sleeping.on('error', (err) => resolve(err))
      sleeping.on('end', () => resolve(null))
    })
    const t0 = Date.now()
    client.query(sleeping)
    const watcher = new pg.Client(config)
    await watcher.connect()
    const deadline = Date.now() + 10000
    while ((await watcher.query(SLEEPERS_SQL)).rows[0].n !== 1 && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 20))
    }
    await watcher.end()
    new pg.Client({ host, port: Number(port) }).cancel(client, sleeping)
    const err = await done
    if (!err) return { error: 'pg_sleep was not cancelled' }
    const seconds = (Date.now() - t0) / 1000
    const after = (await client.query({ text: 'select 1', rowMode: 'array' })).rows[0][0]
    return { sqlstate: err.code, seconds, after }
  })

  await client.end()
}

main().catch((err) => {
  emit('fatal', { error: String(err && err.stack ? err.stack : err) })
  process.exit(1)
})
