// node-postgres: a large last result, then client.end(); any 'error' event is a failure.
// Usage: node close_after_big_result.js URL ROUNDS [ssl]
const { Client } = require("pg");

async function once(url, ssl) {
  const client = new Client({ connectionString: url, ssl: ssl ? { rejectUnauthorized: false } : false });
  const errors = [];
  client.on("error", (e) => errors.push(`${e.code || ""} ${e.message}`));
  await client.connect();
  const res = await client.query("select g, md5(g::text) from generate_series(1, 50000) g");
  if (res.rows.length !== 50000) throw new Error(`got ${res.rows.length} rows`);
  const pid = (await client.query("select pg_backend_pid() as pid")).rows[0].pid;
  if (client.processID !== pid) throw new Error(`processID ${client.processID} != backend ${pid}`);
  await client.end();
  // An error event after end() arrives on a later tick: give it the chance.
  await new Promise((r) => setTimeout(r, 50));
  return errors;
}

(async () => {
  const [url, rounds, ssl] = process.argv.slice(2);
  let failed = 0;
  for (let i = 0; i < Number(rounds); i++) {
    const errors = await once(url, ssl === "ssl");
    if (errors.length) {
      failed++;
      console.log(`round ${i}: ${errors.join("; ")}`);
    }
  }
  console.log(`${failed} of ${rounds} closes got an error`);
  process.exit(failed ? 1 : 0);
})().catch((e) => {
  console.log(`failed: ${e.stack}`);
  process.exit(2);
});
