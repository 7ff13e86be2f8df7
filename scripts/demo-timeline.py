#!/usr/bin/env python3
"""The failover demo's summary and timeline picture (standard library only).

    scripts/demo-timeline.py DEMO_DIR [--svg FILE]

Reads what scripts/demo writes in DEMO_DIR (tab-separated, times in wall-clock seconds
from bash's $EPOCHREALTIME, one clock for every file):

    events.tsv   time  kind  host  text     kind: meta step cmd fault answer status check end
    client.tsv   start  end  ok|failed  index  hash  message
    holders.tsv  time  host  held|downlink|none|end   (a line each time it changes)

prints the summary (client-visible outages per event, the holders of the address and
their epochs, whether two hosts ever held it at once) and writes DEMO_DIR/timeline.svg:
one lane per host showing when it held the address, a lane of the client's requests,
the commands and faults as markers, a time axis in seconds and a legend.

Exit status: 0; 3 if two hosts held the address at the same time; 1 on bad input.
"""

import html
import os
import re
import sys
import time

HOSTS = ("live", "standby")


def read_tsv(path, fields):
    rows = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) < fields:
                    continue
                rows.append(parts)
    except FileNotFoundError:
        pass
    return rows


class Run:
    def __init__(self, d):
        self.dir = d
        self.events = []
        for p in read_tsv(os.path.join(d, "events.tsv"), 4):
            self.events.append((float(p[0]), p[1], p[2], p[3]))
        self.client = []
        for p in read_tsv(os.path.join(d, "client.tsv"), 5):
            idx = int(p[3]) if p[3].isdigit() else None
            msg = p[5] if len(p) > 5 else ""
            self.client.append((float(p[0]), float(p[1]), p[2] == "ok", idx, msg))
        self.client.sort()
        self.holder_rows = []
        for p in read_tsv(os.path.join(d, "holders.tsv"), 3):
            self.holder_rows.append((float(p[0]), p[1], p[2]))
        self.holder_rows.sort()
        if not self.events:
            raise SystemExit("demo-timeline: no events in %s/events.tsv" % d)
        self.t0 = self.events[0][0]
        ends = [e[0] for e in self.events if e[1] == "end"]
        last = max([e[0] for e in self.events] + [c[1] for c in self.client]
                   + [h[0] for h in self.holder_rows])
        self.t1 = ends[-1] if ends else last
        self.meta = {}
        for e in self.events:
            if e[1] == "meta":
                for kv in e[3].split():
                    k, _, v = kv.partition("=")
                    self.meta[k] = v
        self.intervals = self._intervals()

    def _intervals(self):
        """{host: [(start, end, state)]} for states held and downlink."""
        out = {h: [] for h in HOSTS}
        cur = {}
        for t, h, s in self.holder_rows:
            if h not in out:
                continue
            if h in cur:
                st, state = cur.pop(h)
                if state in ("held", "downlink"):
                    out[h].append((st, t, state))
            if s != "end":
                cur[h] = (t, s)
        for h, (st, state) in cur.items():
            if state in ("held", "downlink"):
                out[h].append((st, self.t1, state))
        return out

    def held(self, h):
        return [(a, b) for a, b, s in self.intervals[h] if s == "held"]

    def overlaps(self):
        res = []
        for a1, b1 in self.held("live"):
            for a2, b2 in self.held("standby"):
                a, b = max(a1, a2), min(b1, b2)
                if b > a:
                    res.append((a, b))
        return res

    def epoch_at(self, h, a, b):
        """The epoch host h reported as live while holding [a, b)."""
        for t, kind, host, text in self.events:
            if kind == "status" and host == h and a - 0.5 <= t <= b + 0.5:
                f = dict(kv.partition("=")[::2] for kv in text.split())
                if f.get("role") == "live":
                    return f.get("epoch", "?")
        return "?"

    def incidents(self):
        """The events that interrupt service: (time, label, kind)."""
        res = []
        for t, kind, host, text in self.events:
            if kind == "cmd" and text.startswith("switchover"):
                res.append((t, text.replace("→", " → "), kind))
            elif kind == "fault" and text.startswith("kill"):
                res.append((t, "live killed → promote --force", kind))
            elif kind == "fault" and text.startswith("reboot"):
                res.append((t, "old live host reboots", kind))
        return res

    def outages(self):
        """Per incident: (t, label, outage seconds or None, failed count, first failed,
        next ok, longest gap between acknowledgements in the window)."""
        inc = self.incidents()
        res = []
        for i, (t, label, _) in enumerate(inc):
            end = inc[i + 1][0] if i + 1 < len(inc) else self.t1
            # Each request counts for the incident during which it ended.
            win = [c for c in self.client if t <= c[1] < end]
            failed = [c for c in win if not c[2]]
            outage = first = nxt = None
            if failed:
                first = failed[0]
                oks = [c for c in self.client if c[2] and c[0] > first[0]]
                if oks:
                    nxt = oks[0]
                    outage = nxt[1] - first[0]
            acks = [c[1] for c in self.client if c[2]]
            before = [a for a in acks if a <= t]
            points = ([before[-1]] if before else []) + [a for a in acks if t < a < end]
            gap = max((b - a for a, b in zip(points, points[1:])), default=None)
            res.append((t, label, outage, len(failed), first, nxt, gap))
        return res


def fmt_s(x):
    return "%.2f s" % x


def summary(run, svg_path):
    r = run.rel = lambda t: t - run.t0
    print("outages  (client-visible: from the first failed request to the next acknowledged block)")
    for t, label, outage, nfail, first, nxt, gap in run.outages():
        head = "  %-32s at %6.1f s: " % (label, r(t))
        if outage is not None:
            print(head + "%s  (%d failed request%s, %.1f s → %.1f s)"
                  % (fmt_s(outage), nfail, "" if nfail == 1 else "s", r(first[0]), r(nxt[1])))
        elif nfail:
            print(head + "%d failed requests, no success after them" % nfail)
        else:
            g = (", longest wait between blocks %s" % fmt_s(gap)) if gap is not None else ""
            print(head + "no failed request%s" % g)
    force = [e[0] for e in run.events if e[1] == "cmd" and e[3] == "promote --force"]
    kill = [e[0] for e in run.events if e[1] == "fault" and e[3].startswith("kill")]
    if force:
        after = [c for c in run.client if c[2] and c[0] >= force[0]]
        if after:
            line = "  promote --force → next block acknowledged: %s" % fmt_s(after[0][1] - force[0])
            if kill:
                line += "; kill → next block: %s (%s of it before promote --force)" % (
                    fmt_s(after[0][1] - kill[0]), fmt_s(force[0] - kill[0]))
            print(line)
    print("holders  (the VIP %s on an interface that is up; epochs from failoverd status)"
          % run.meta.get("vip", "?"))
    spans = []
    for h in HOSTS:
        for a, b in run.held(h):
            spans.append((a, b, h))
    for a, b, h in sorted(spans):
        print("  %6.1f s – %6.1f s  %-8s epoch %s" % (r(a), r(b), h, run.epoch_at(h, a, b)))
    for h in HOSTS:
        for a, b, s in run.intervals[h]:
            if s == "downlink":
                print("  %6.1f s – %6.1f s  %-8s the VIP on a link that is down (unreachable)"
                      % (r(a), r(b), h))
    ov = run.overlaps()
    n = len(run.holder_rows)
    if ov:
        for a, b in ov:
            print("  TWO HOLDERS: live and standby both held the VIP from %.3f s to %.3f s"
                  % (r(a), r(b)))
    else:
        print("  never two holders at once (%d changes in the holder log: ip monitor events"
              " and a poll every %s s)" % (n, os.environ.get("DEMO_POLL", "0.1")))
    print("timeline %s" % svg_path)
    return 3 if ov else 0


# ---------------------------------------------------------------------------------------
# SVG

C_HELD = "#2e9e4f"
BAR_H = 24
# A white outline under text drawn over lines.
HALO = 'stroke="white" stroke-width="3" paint-order="stroke" stroke-linejoin="round"'
C_DOWNLINK = "#b0b0b0"
C_DEAD = "#f6d3d0"
C_OK = "#2e9e4f"
C_FAIL = "#d62728"
C_CMD = "#1f5fbf"
C_FAULT = "#d62728"
C_OVERLAP = "#ff00ff"


def esc(s):
    return html.escape(str(s), quote=True)


def nice_step(span):
    for s in (0.5, 1, 2, 5, 10, 15, 20, 30, 60, 120, 300):
        if span / s <= 16:
            return s
    return 600


def svg(run, path):
    W = 1200
    left, right = 150, 30
    plot_w = W - left - right
    span = max(run.t1 - run.t0, 1.0)

    def x(t):
        return left + (t - run.t0) / span * plot_w

    def text_w(s, size=11):
        return len(s) * size * 0.56

    out = []
    # Markers: commands and faults.
    markers = []
    for t, kind, host, text in run.events:
        if kind not in ("cmd", "fault"):
            continue
        if kind == "cmd" and text.startswith("failoverd run") and t - run.t0 < 0.3 * span:
            continue  # the first start of both daemons: part of the set-up
        label = text if kind == "fault" else "%s: %s" % (host, text)
        label = re.sub(r" \(pid \d+\)", "", label)
        markers.append((t, kind, label))
    # Marker labels in rows, each row left to right without overlapping.
    rows_end = []
    placed = []
    for t, kind, label in markers:
        xs = x(t) + 3
        w = text_w(label)
        if xs + w > W - 5:
            xs = max(left, x(t) - 3 - w)
        row = None
        for i, e in enumerate(rows_end):
            if xs > e + 6:
                row = i
                break
        if row is None:
            rows_end.append(0)
            row = len(rows_end) - 1
        rows_end[row] = xs + w
        placed.append((t, kind, label, xs, row))
    nrows = max(len(rows_end), 1)

    title_h = 56
    label_h = 16 * nrows + 8
    lane_h, lane_gap = 46, 10
    lanes_top = title_h + label_h
    lanes = ["live", "standby", "client"]
    lane_y = {name: lanes_top + i * (lane_h + lane_gap) for i, name in enumerate(lanes)}
    lanes_bottom = lanes_top + len(lanes) * (lane_h + lane_gap) - lane_gap
    axis_y = lanes_bottom + 8
    legend_y = axis_y + 58
    H = legend_y + 40

    out.append('<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" '
               'viewBox="0 0 %d %d" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">'
               % (W, H, W, H))
    out.append('<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
               'patternTransform="rotate(45)"><rect width="6" height="6" fill="#e6e6e6"/>'
               '<line x1="0" y1="0" x2="0" y2="6" stroke="%s" stroke-width="3"/></pattern></defs>'
               % C_DOWNLINK)
    out.append('<rect width="%d" height="%d" fill="white"/>' % (W, H))
    acked = sum(1 for c in run.client if c[2])
    failed = sum(1 for c in run.client if not c[2])
    ov = run.overlaps()
    out.append('<text x="%d" y="24" font-size="18" font-weight="bold">failoverd demo: who held '
               'the virtual IP %s, and what the client saw</text>'
               % (left - 140, esc(run.meta.get("vip", "?"))))
    sub = "%s · %d blocks acknowledged, %d failed request%s · %s" % (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.t0)), acked, failed,
        "" if failed == 1 else "s",
        "TWO HOLDERS AT ONCE" if ov else "never two holders at once")
    out.append('<text x="%d" y="44" font-size="12" fill="#444">%s</text>' % (left - 140, esc(sub)))

    # Host down: from the kill to the reboot.
    kills = [e for e in run.events if e[1] == "fault" and e[3].startswith("kill")]
    reboots = [e for e in run.events if e[1] == "fault" and e[3].startswith("reboot")]
    # Lanes.
    for name in lanes:
        y = lane_y[name]
        out.append('<rect x="%d" y="%d" width="%d" height="%d" fill="#f7f7f7" stroke="#ddd"/>'
                   % (left, y, plot_w, lane_h))
        sub_label = {"live": "host (netns live)", "standby": "host (netns standby)",
                     "client": "chain add via VIP"}[name]
        out.append('<text x="%d" y="%d" font-size="14" font-weight="bold" text-anchor="end">%s</text>'
                   % (left - 10, y + lane_h / 2, esc(name)))
        out.append('<text x="%d" y="%d" font-size="10" fill="#666" text-anchor="end">%s</text>'
                   % (left - 10, y + lane_h / 2 + 14, esc(sub_label)))
    for k in kills:
        h = k[2] if k[2] in lane_y else "live"
        end = next((r[0] for r in reboots if r[0] > k[0] and r[2] == k[2]), run.t1)
        y = lane_y[h]
        out.append('<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="%s"/>'
                   % (x(k[0]), y, x(end) - x(k[0]), lane_h, C_DEAD))
        out.append('<text x="%.1f" y="%d" font-size="10" fill="#a33" %s>host down '
                   '(processes killed, link down)</text>' % (x(k[0]) + 4, y + lane_h - 3, HALO))
    for h in HOSTS:
        y = lane_y[h]
        for a, b, s in run.intervals[h]:
            if s == "held":
                out.append('<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="%s" rx="2">'
                           '<title>%s holds the VIP %.3f s to %.3f s</title></rect>'
                           % (x(a), y + 6, max(x(b) - x(a), 1.5), BAR_H, C_HELD, h,
                              a - run.t0, b - run.t0))
                ep = run.epoch_at(h, a, b)
                for lab in ("holds VIP · epoch %s" % ep, "epoch %s" % ep, "e%s" % ep):
                    if x(b) - x(a) > text_w(lab, 11) + 6:
                        out.append('<text x="%.1f" y="%d" font-size="11" fill="white">%s</text>'
                                   % (x(a) + 4, y + 6 + BAR_H / 2 + 4, esc(lab)))
                        break
            else:
                out.append('<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="url(#hatch)" '
                           'stroke="%s"/>' % (x(a), y + 6, max(x(b) - x(a), 1.5), BAR_H,
                                              C_DOWNLINK))
    for a, b in ov:
        out.append('<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="%s" opacity="0.5"/>'
                   % (x(a), lane_y["live"], max(x(b) - x(a), 3), 2 * lane_h + lane_gap, C_OVERLAP))
        out.append('<text x="%.1f" y="%d" font-size="12" font-weight="bold" fill="%s">TWO HOLDERS'
                   '</text>' % (x(a) + 4, lane_y["standby"] - 1, C_OVERLAP))

    # Markers over the lanes, labels above.
    for t, kind, label, xs, row in placed:
        color = C_FAULT if kind == "fault" else C_CMD
        ly = title_h + 12 + 16 * row
        out.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="%s" stroke-width="1.2" '
                   'stroke-dasharray="4,3"/>' % (x(t), ly + 3, x(t), lanes_bottom, color))
        out.append('<text x="%.1f" y="%d" font-size="11" fill="%s">%s</text>'
                   % (xs, ly, color, esc(label)))

    # Client lane: the read-back, outage bands, then a tick per request.
    y = lane_y["client"]
    rb = [e for e in run.events if e[1] == "readback"]
    if len(rb) >= 2:
        a, b = rb[0][0], rb[-1][0]
        out.append('<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="%s" opacity="0.12"/>'
                   % (x(a), y, x(b) - x(a), lane_h, C_CMD))
        res = rb[-1][3].replace("end: ", "")
        # Two short lines inside the band; right-aligned to its end if it would overflow.
        w = max(text_w("read back:"), text_w(res))
        tx, anchor = x(a) + 4, "start"
        if tx + w > W - 2:
            tx, anchor = W - 2, "end"
        for j, lab in enumerate(("read back:", res)):
            out.append('<text x="%.1f" y="%d" font-size="11" fill="%s" text-anchor="%s" %s>%s</text>'
                       % (tx, y + 19 + 14 * j, C_CMD, anchor, HALO, esc(lab)))
    for t, label, outage, nfail, first, nxt, gap in run.outages():
        if outage is None:
            continue
        a, b = first[0], nxt[1]
        out.append('<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="%s" opacity="0.15"/>'
                   % (x(a), y, x(b) - x(a), lane_h, C_FAIL))
        out.append('<text x="%.1f" y="%d" font-size="11" font-weight="bold" fill="%s" %s>%s outage'
                   '</text>' % (x(a) + 2, y + 11, C_FAIL, HALO, esc(fmt_s(outage))))
    for s, e, ok, idx, msg in run.client:
        if ok:
            out.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="%s" stroke-width="1"/>'
                       % (x(e), y + 16, x(e), y + 30, C_OK))
        else:
            out.append('<rect x="%.1f" y="%d" width="%.1f" height="6" fill="%s" opacity="0.5">'
                       '<title>%s</title></rect>'
                       % (x(s), y + 34, max(x(e) - x(s), 1), C_FAIL, esc(msg)))
            out.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="%s" stroke-width="1.5"/>'
                       % (x(e), y + 14, x(e), y + 40, C_FAIL))

    # Time axis.
    out.append('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#333"/>'
               % (left, axis_y, left + plot_w, axis_y))
    step = nice_step(span)
    k = 0
    while k * step <= span + 1e-9:
        tx = x(run.t0 + k * step)
        out.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#333"/>'
                   % (tx, axis_y, tx, axis_y + 5))
        out.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#000" opacity="0.06"/>'
                   % (tx, lanes_top, tx, lanes_bottom))
        lab = ("%g" % (k * step))
        out.append('<text x="%.1f" y="%d" font-size="11" text-anchor="middle">%s</text>'
                   % (tx, axis_y + 18, lab))
        k += 1
    out.append('<text x="%d" y="%d" font-size="11" text-anchor="end" fill="#444">'
               'seconds since the demo started</text>' % (left + plot_w, axis_y + 34))

    # Legend.
    items = [
        ("rect", C_HELD, "holds the VIP (on a link that is up)"),
        ("hatch", C_DOWNLINK, "VIP on a link that is down"),
        ("rect", C_DEAD, "host down"),
        ("tick", C_OK, "block acknowledged"),
        ("tick", C_FAIL, "request failed (bar: its duration)"),
        ("band", C_FAIL, "client-visible outage"),
        ("bandb", C_CMD, "acknowledged blocks read back"),
        ("dash", C_CMD, "operator command"),
        ("dash", C_FAULT, "fault"),
    ]
    lx, ly = left - 140, legend_y
    for kind, color, label in items:
        w = 26 + text_w(label, 11) + 18
        if lx + w > W - 5:
            lx, ly = left - 140, ly + 22
        if kind == "rect":
            out.append('<rect x="%d" y="%d" width="18" height="12" fill="%s"/>' % (lx, ly - 10, color))
        elif kind == "hatch":
            out.append('<rect x="%d" y="%d" width="18" height="12" fill="url(#hatch)" stroke="%s"/>'
                       % (lx, ly - 10, color))
        elif kind in ("band", "bandb"):
            out.append('<rect x="%d" y="%d" width="18" height="12" fill="%s" opacity="0.15"/>'
                       % (lx, ly - 10, color))
        elif kind == "tick":
            out.append('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="2"/>'
                       % (lx + 9, ly - 11, lx + 9, ly + 3, color))
        else:
            out.append('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="1.5" '
                       'stroke-dasharray="4,3"/>' % (lx + 9, ly - 12, lx + 9, ly + 4, color))
        out.append('<text x="%d" y="%d" font-size="11">%s</text>' % (lx + 24, ly, esc(label)))
        lx += w
    out.append("</svg>")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")
    os.replace(path + ".tmp", path)


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if len(argv) >= 2 else 1
    d = argv[1]
    svg_path = os.path.join(d, "timeline.svg")
    if len(argv) >= 4 and argv[2] == "--svg":
        svg_path = argv[3]
    run = Run(d)
    svg(run, svg_path)
    return summary(run, svg_path)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
