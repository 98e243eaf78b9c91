"""fleetbus bus API, worked example: a plain NATS client (nats-py), no fleetbus code.

Runs `uname -a` on the server `local` with live output, writes a small file there
inline, reads it back, and prints what happened. Exits 0 when all of it worked.

    pip install nats-py
    python bus_example.py [REMOTE_PATH]      # default /tmp/fleetbus-bus-example.txt

It finds the embedded NATS the way fleetbus does: the URL (and subject prefix) in
$FLEETBUS_HOME/run.json, written by `fleetbus up`, and the token in
$FLEETBUS_HOME/nats.token. FLEETBUS_HOME defaults to ~/.fleetbus.
"""

import asyncio
import base64
import hashlib
import json
import os
import sys
import uuid

import nats
import nats.errors

SERVER = "local"
CONTENT = b"hello from the fleetbus bus API example\n"


class Failed(Exception):
    pass


def check(reply, what):
    """Bus replies are {"ok": true, ...} or {"ok": false, "error": {"code", "message"}}."""
    if not reply.get("ok"):
        error = reply.get("error") or {}
        raise Failed(f"{what} failed: {error.get('code')}: {error.get('message')}")
    return reply


async def request(nc, subject, body, timeout):
    headers = {"Fleetbus-Requester": "bus-example"}  # self-declared; goes to the audit trail
    try:
        msg = await nc.request(subject, json.dumps(body).encode(), timeout=timeout, headers=headers)
    except nats.errors.NoRespondersError:
        # Nobody serves that server: it is not registered, or no worker runs its transport.
        # (Ask <prefix>.v1.admin.servers.get to tell which.)
        raise Failed(f"no responders on {subject}: nobody serves server {SERVER!r}") from None
    return json.loads(msg.data)


def connection_settings():
    """The NATS URL, token and subject prefix of the running `fleetbus up`."""
    home = os.path.expanduser(os.environ.get("FLEETBUS_HOME") or "~/.fleetbus")
    try:
        with open(os.path.join(home, "run.json")) as f:
            run_info = json.load(f)  # {"nats_url": ..., "prefix": ..., ...}
    except FileNotFoundError:
        raise Failed(f"no {home}/run.json: is `fleetbus up` running?") from None
    with open(os.path.join(home, "nats.token")) as f:
        token = f.read().strip()
    return run_info["nats_url"], token, run_info.get("prefix", "fleetbus")


async def run(url, token, prefix, remote_path):
    subject = f"{prefix}.v1.servers.{SERVER}"

    async def on_error(exc):  # one line instead of nats-py's default traceback
        print(f"nats: {exc}", file=sys.stderr)

    # The embedded NATS's token is the password of its user "owner" (docs/security.md).
    nc = await nats.connect(url, user="owner", password=token, name="fleetbus-bus-example",
                            connect_timeout=5, max_reconnect_attempts=1, error_cb=on_error)
    try:
        # 1. exec with live output: chunks arrive on our inbox as raw bytes, the stream
        #    (stdout/stderr) in a header, then an end marker carrying the exit code.
        inbox = nc.new_inbox()
        live = {"stdout": b"", "stderr": b""}
        ended = asyncio.Event()
        end_headers = {}

        async def on_output(msg):
            headers = msg.headers or {}
            if headers.get("Fleetbus-End"):
                end_headers.update(headers)
                ended.set()
                return
            stream = headers.get("Fleetbus-Stream", "stdout")
            live[stream] += msg.data
            out = sys.stdout if stream == "stdout" else sys.stderr
            out.buffer.write(msg.data)
            out.flush()

        sub = await nc.subscribe(inbox, cb=on_output)
        print(f"== exec uname -a on {SERVER} (live output follows)", flush=True)
        reply = check(await request(nc, f"{subject}.exec", {
            "id": uuid.uuid4().hex,  # a retry with the same id is not run twice
            "argv": ["uname", "-a"],
            "timeout_s": 60,
            "output_subject": inbox,
        }, timeout=90), "exec")
        # The reply can overtake the last output chunks: wait for the end marker.
        try:
            await asyncio.wait_for(ended.wait(), timeout=10)
        except asyncio.TimeoutError:
            raise Failed("no end marker on the output subject within 10 s") from None
        await sub.unsubscribe()
        if reply["exit_code"] != 0:
            raise Failed(f"uname exited with {reply['exit_code']}: {reply['stderr']}")
        if live["stdout"].decode() != reply["stdout"]:
            raise Failed("the live output and the reply's stdout tail differ")
        print(f"== exit code {reply['exit_code']} (end marker exit code "
              f"{end_headers.get('Fleetbus-Exit-Code')}), command id {reply['id']}, "
              f"{reply['duration_s']} s")

        # 2. put a small file inline (base64 in the request body).
        reply = check(await request(nc, f"{subject}.put", {
            "id": uuid.uuid4().hex,
            "path": remote_path,
            "mode": "0644",
            "content_b64": base64.b64encode(CONTENT).decode(),
            "sha256": hashlib.sha256(CONTENT).hexdigest(),
        }, timeout=60), "put")
        print(f"== put {SERVER}:{reply['path']}: {reply['size']} bytes, mode {reply['mode']}, "
              f"sha256 {reply['sha256']}")

        # 3. get it back: inline when small, else the reply names an object-store object.
        reply = check(await request(nc, f"{subject}.get", {"path": remote_path}, timeout=60), "get")
        if "content_b64" in reply:
            data = base64.b64decode(reply["content_b64"])
        else:
            store = await nc.jetstream().object_store(reply["bucket"])
            data = (await store.get(reply["object"])).data
            await store.delete(reply["object"])
        print(f"== get {SERVER}:{reply['path']}: {reply['size']} bytes, sha256 {reply['sha256']}")
        sys.stdout.write(data.decode(errors="replace"))
        if data != CONTENT:
            raise Failed("the file read back differs from the file written")
        print("== all good")
    finally:
        await nc.close()


def main():
    remote_path = sys.argv[1] if len(sys.argv) > 1 else "/tmp/fleetbus-bus-example.txt"
    try:
        url, token, prefix = connection_settings()
        asyncio.run(run(url, token, prefix, remote_path))
    except (Failed, OSError, asyncio.TimeoutError, nats.errors.Error) as exc:
        print(f"bus_example: error: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
