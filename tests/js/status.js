#!/usr/bin/env node
// Ask one server of a roster for its status with the real @dedis/cothority client
// (the same code browsers and Node tools use), and print the reply as JSON on stdout.
//
// usage: node status.js ROSTER.toml [index]
//   index: which server of the roster to ask (default 0).
//   env STATUS_TIMEOUT_MS: per-request timeout of the client (default 10000).
//   env NODE_EXTRA_CA_CERTS: extra CA for wss:// (Node's own option).
//
// Output: {"websocket": "...", "serverIdentity": {...}, "status": {section: {key: value}}}
// where serverIdentity.public is the hex of the raw 32-byte point (as in public.toml's
// Public) and serverIdentity.publicTagged the hex of the wire bytes ("ed.point" + 32 bytes).
// Exit status: 0 on success; 1 with the error on stderr if the request failed; 2 on bad usage.
// The client leaves timers behind, so this always ends with process.exit.
"use strict";

const fs = require("fs");
const Log = require("@dedis/cothority/log").default;
const { Roster } = require("@dedis/cothority/network");
const { StatusRPC } = require("@dedis/cothority/status");

// The client logs with console.log; keep stdout for the JSON only.
Log.out = (...s) => process.stderr.write(s.join(" ") + "\n");

function hex(b) {
    return Buffer.from(b || []).toString("hex");
}

async function main() {
    const args = process.argv.slice(2);
    if (args.length < 1 || args.length > 2) {
        process.stderr.write("usage: node status.js ROSTER.toml [index]\n");
        process.exit(2);
    }
    const index = args.length > 1 ? Number(args[1]) : 0;
    const timeout = Number(process.env.STATUS_TIMEOUT_MS || "10000");
    if (!Number.isInteger(index) || index < 0 || !(timeout > 0)) {
        process.stderr.write("index must be a non-negative integer, STATUS_TIMEOUT_MS a positive number\n");
        process.exit(2);
    }
    // Hard stop, should the client never call back (e.g. a TLS handshake that hangs).
    setTimeout(() => {
        process.stderr.write(`status.js: no answer within ${timeout + 5000} ms\n`);
        process.exit(1);
    }, timeout + 5000).unref();

    const roster = Roster.fromTOML(fs.readFileSync(args[0], "utf8"));
    if (index >= roster.list.length) {
        throw new Error(`index ${index} out of range: the roster has ${roster.list.length} servers`);
    }
    const rpc = new StatusRPC(roster);
    rpc.setTimeout(timeout);
    const r = await rpc.getStatus(index);

    const si = r.serverIdentity;
    const status = {};
    for (const name of Object.keys(r.status).sort()) {
        const fields = r.status[name].field || {};
        status[name] = {};
        for (const k of Object.keys(fields).sort()) {
            status[name][k] = fields[k];
        }
    }
    const out = {
        websocket: roster.list[index].getWebSocketAddress(),
        serverIdentity: {
            public: si.getPublic().marshalBinary().toString("hex"),
            publicTagged: hex(si.public),
            id: hex(si.id),
            address: si.address,
            description: si.description,
            url: si.url,
            serviceIdentities: (si.serviceIdentities || []).map((s) => ({
                name: s.name,
                suite: s.suite,
                public: hex(s.public),
            })),
        },
        status,
    };
    process.stdout.write(JSON.stringify(out, null, 2) + "\n");
}

main().then(
    () => process.exit(0),
    (e) => {
        process.stderr.write(`status.js: ${e && e.stack ? e.stack : e}\n`);
        process.exit(1);
    },
);
