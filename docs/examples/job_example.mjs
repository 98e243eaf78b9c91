// fleetbus bus API, worked example: a fleet job from Node.js (nats.js), no fleetbus code.
//
// Starts a job that runs `uname -a` on every server with the given labels, follows its
// kept records from the job's start to its summary, prints each server's result and the
// summary, and exits as `fleetbus run` does: 0 every server succeeded, 1 some failed,
// 2 the job was stopped, cancelled or abandoned (or its records could not be read to
// the end), 125 it could not start.
//
//     npm ci                      # in docs/examples: installs the pinned `nats`
//     FLEETBUS_NATS_URL=nats://127.0.0.1:4222 FLEETBUS_NATS_TOKEN="$(cat ~/.fleetbus/nats.token)" \
//       node job_example.mjs team=core [KEY=VALUE ...]
//
// FLEETBUS_PREFIX is the subject prefix (default fleetbus), as for fleetbus itself.
import { connect, JSONCodec } from "nats";

const EXIT = { succeeded: 0, failed: 1, cannotStart: 125, stopped: 2 };
const codec = JSONCodec();

function labelsFrom(args) {
  const labels = {};
  for (const arg of args) {
    const eq = arg.indexOf("=");
    if (eq < 1) throw new Error(`not a label KEY=VALUE: ${arg}`);
    labels[arg.slice(0, eq)] = arg.slice(eq + 1);
  }
  if (Object.keys(labels).length === 0) throw new Error("give at least one label KEY=VALUE");
  return labels;
}

// One line per server, as the CLI prints them: `web-3  ok  0.21s  Linux web-3 ...`.
function resultLine(r, width) {
  const status = r.outcome === "failed" ? `exit ${r.exit_code}` : r.outcome;
  const detail = r.outcome === "ok" || r.outcome === "failed"
    ? `${(r.duration_s ?? 0).toFixed(2)}s  ${(r.outcome === "ok" ? r.stdout : r.stderr).split("\n")[0]}`
    : (r.error?.message ?? "");
  return `${r.server.padEnd(width)}  ${status}  ${detail}`.trimEnd();
}

async function main() {
  const url = process.env.FLEETBUS_NATS_URL ?? "nats://127.0.0.1:4222";
  const prefix = process.env.FLEETBUS_PREFIX || "fleetbus";
  // The stream keeping job records: the prefix with - as _, upper case (docs/bus-api.md).
  const stream = `${prefix.replaceAll("-", "_").toUpperCase()}_JOBS`;
  let labels;
  try {
    labels = labelsFrom(process.argv.slice(2));
  } catch (err) {
    console.error(`job_example: ${err.message}`);
    return EXIT.cannotStart;
  }

  let nc;
  try {
    // The embedded NATS's token, from the environment (never on a command line others
    // can read), is the password of its user "owner" (docs/security.md).
    nc = await connect({ servers: url, user: "owner", pass: process.env.FLEETBUS_NATS_TOKEN, name: "fleetbus-job-example" });
  } catch (err) {
    console.error(`job_example: cannot connect to ${url}: ${err.message}`);
    return EXIT.cannotStart;
  }
  try {
    // 1. Start the job. The reply comes at once with the job id and its targets; the job
    //    runs on in the core whether or not we stay.
    let reply;
    try {
      const msg = await nc.request(`${prefix}.v1.jobs.start`, codec.encode({
        selection: { labels },
        op: "exec",
        exec: { argv: ["uname", "-a"] },
        max_concurrency: 10,
        timeout_s: 60,
        deadline_s: 300,
      }), { timeout: 30_000 });
      reply = codec.decode(msg.data);
    } catch (err) {
      console.error(`job_example: jobs.start: ${err.message}`); // no responders: no core runs
      return EXIT.cannotStart;
    }
    if (!reply.ok) {
      console.error(`job_example: jobs.start failed: ${reply.error.code}: ${reply.error.message}`);
      return EXIT.cannotStart;
    }
    const job = reply.id;
    console.log(`job ${job} on ${reply.targets.length} servers: ${reply.targets.join(" ")}`);

    // 2. Follow it. The job may finish before we could subscribe, so we do not subscribe
    //    to the live events: we read its kept records (started, result..., finished)
    //    from the stream with an ordered consumer, and miss none. Its default start, the
    //    stream's first record, delivers all of the job's. (Do not pass deliver_policy
    //    All: nats 2.29.3 then also sends opt_start_seq, which nats-server 2.15 refuses,
    //    and the consumer retries without a word and delivers nothing.)
    const consumer = await nc.jetstream().consumers.get(stream, {
      filterSubjects: `${prefix}.v1.events.jobs.${job}.*`,
    });
    const messages = await consumer.consume();
    // The job's deadline ends it in the core; give its end a margin to be recorded.
    const giveUp = setTimeout(() => messages.stop(), (300 + 30) * 1000);
    const width = Math.max(...reply.targets.map((t) => t.length));
    try {
      for await (const m of messages) {
        const kind = m.subject.split(".").pop();
        const body = codec.decode(m.data);
        if (kind === "result") {
          console.log(resultLine(body, width));
        } else if (kind === "finished") {
          const c = body.counts;
          console.log(`job ${job} ${body.state}${body.stop_reason ? ` (${body.stop_reason})` : ""}: `
            + `${c.ok} ok, ${c.failed} failed, ${c.cancelled} cancelled, ${c.skipped} skipped, `
            + `${c.unknown} unknown of ${c.total} in ${body.duration_s.toFixed(2)}s`);
          return body.state === "succeeded" ? EXIT.succeeded : body.state === "failed" ? EXIT.failed : EXIT.stopped;
        }
      }
    } finally {
      clearTimeout(giveUp);
      messages.stop();
    }
    console.error(`job_example: job ${job} recorded no end in time; it goes on (fleetbus jobs show ${job})`);
    return EXIT.stopped;
  } finally {
    await nc.close();
  }
}

process.exitCode = await main().catch((err) => {
  console.error(`job_example: error: ${err.message}`);
  return EXIT.stopped;
});
