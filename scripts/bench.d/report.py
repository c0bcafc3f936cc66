"""Build docs/bench-results.json, docs/BENCHMARKS.md and docs/benchmarks.png from one scripts/bench run.

Every figure in the report comes from the run's records ({system, workload, metric, value, unit, note}); nothing
is typed in by hand. Run it again on an existing JSON with --from-json docs/bench-results.json.
"""
import argparse
import json
import os
import statistics
import sys

SYSTEMS = [
    ("raw", "raw aws-sdk-s3 client"),
    ("s3crypt-cse-kms", "s3crypt cse-kms"),
    ("s3crypt-cse-local", "s3crypt cse-local"),
    ("s3crypt-sse-s3", "s3crypt sse-s3"),
    ("s3fs-sse", "s3fs (SSE-S3)"),
    ("rclone-crypt", "rclone crypt"),
    ("gocryptfs-tmpfs", "gocryptfs on tmpfs (no S3)"),
    ("s3crypt-memory", "s3crypt cse-local, in-memory store (no S3)"),
]
CHART_LABELS = {
    "raw": "raw\nclient",
    "s3crypt-cse-kms": "s3crypt\ncse-kms",
    "s3crypt-cse-local": "s3crypt\ncse-local",
    "s3crypt-sse-s3": "s3crypt\nsse-s3",
    "s3fs-sse": "s3fs\nSSE-S3",
    "rclone-crypt": "rclone\ncrypt",
    "gocryptfs-tmpfs": "gocryptfs\ntmpfs\n(no S3)",
    "s3crypt-memory": "s3crypt\nmemory\n(no S3)",
}
S3CRYPT_S3 = ["s3crypt-cse-kms", "s3crypt-cse-local", "s3crypt-sse-s3"]

# Columns of the absolute table: (header, workload, metric, decimals).
COLUMNS = [
    ("seq write MB/s", "seq_write", "throughput", 0),
    ("seq read MB/s", "seq_read", "throughput", 0),
    ("4K rand read IOPS", "randread_4k", "iops", 0),
    ("p50 µs", "randread_4k", "p50", 0),
    ("p99 µs", "randread_4k", "p99", 0),
    ("GET/read", "randread_4k", "gets_per_read", 2),
    ("overwrite s", "overwrite_4k", "time", 3),
    ("overwrite MiB up", "overwrite_4k", "bytes_uploaded", 1),
    ("small files/s", "small_files", "rate", 0),
    ("ls -l s", "listing", "time", 2),
    ("ls -l req/file", "listing", "requests_per_file", 3),
    ("find s", "find_files", "time", 2),
    ("find req/file", "find_files", "requests_per_file", 3),
    ("missing name req/lookup", "missing_lookup", "requests_per_lookup", 2),
    ("peak RSS MiB", "sequential", "peak_rss", 0),
    ("write's MiB to disk", "sequential", "disk_mib", 0),
    ("KMS calls/file", "small_files", "kms_calls_per_file", 2),
]


class Results:
    def __init__(self, records):
        self.records = records

    def get(self, system, workload, metric):
        for r in self.records:
            if r["system"] == system and r["workload"] == workload and r["metric"] == metric:
                return r["value"]
        return None

    def note(self, system, workload, metric):
        for r in self.records:
            if r["system"] == system and r["workload"] == workload and r["metric"] == metric:
                return r.get("note", "")
        return ""

    def not_run(self, system):
        """The reason a system was not run, or None if it ran (or was not asked for)."""
        for r in self.records:
            if r["system"] == system and r["workload"] == "all" and r["metric"] == "status":
                return r.get("note") or "not run"
        return None

    def ran(self, system):
        return any(r["system"] == system and r["value"] is not None for r in self.records)

    def samples(self, system, workload, metric):
        """Every measured value of a metric recorded once per round, in the order of the rounds."""
        return [
            r["value"]
            for r in self.records
            if r["system"] == system and r["workload"] == workload and r["metric"] == metric and r["value"] is not None
        ]

    def seq_samples(self, system, kind):
        """Sequential throughput of each round; for the raw client, its best-suited variant (multipart PUT, ranged
        GET)."""
        if system == "raw":
            wl = "seq_write_multipart" if kind == "write" else "seq_read_ranged"
            return self.samples("raw", wl, "throughput")
        return self.samples(system, "seq_" + kind, "throughput")

    def near_samples(self, system, kind):
        """The raw client's samples (multipart PUT, ranged GET) taken just before each of `system`'s own writes or
        reads."""
        return self.samples(system, "raw_reference", kind + "_throughput")

    def seq(self, system, kind):
        """Median sequential throughput over the rounds."""
        return median(self.seq_samples(system, kind))

    def raw_next_to(self, system, kind):
        """Median of the raw samples taken next to `system`'s rounds."""
        return median(self.near_samples(system, kind))


def median(values):
    return statistics.median(values) if values else None


def fmt(value, decimals=0):
    if value is None:
        return "n/a"
    return f"{value:,.{decimals}f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def absolute_table(res):
    lines = ["| system | " + " | ".join(c[0] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for key, label in SYSTEMS:
        reason = res.not_run(key)
        if reason:
            lines.append(f"| {label} | {reason} |" + " |" * (len(COLUMNS) - 1))
            continue
        if not res.ran(key):
            continue
        cells = []
        for _, wl, metric, dec in COLUMNS:
            if wl in ("seq_write", "seq_read"):
                cells.append(fmt(res.seq(key, wl[4:]), dec))
            else:
                cells.append(fmt(res.get(key, wl, metric), dec))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def raw_table(res):
    rows = [
        ("multipart PUT", "seq_write_multipart", "throughput", "MB/s"),
        ("single PUT", "seq_write_single", "throughput", "MB/s"),
        ("single-stream GET", "seq_read_single", "throughput", "MB/s"),
        ("parallel ranged GET", "seq_read_ranged", "throughput", "MB/s"),
        ("4 KiB PUT", "small_put", "rate", "ops/s"),
        ("4 KiB PUT, serial", "small_put_serial", "rate", "ops/s"),
        ("HEAD", "small_head", "rate", "ops/s"),
    ]
    lines = ["| operation | value | unit | how |", "|---|---|---|---|"]
    for label, wl, metric, unit in rows:
        vals = res.samples("raw", wl, metric)
        if len(vals) > 1:
            how = res.note("raw", wl, metric).split(": ", 1)[-1]
            lines.append(f"| {label} | {fmt(median(vals))} | {unit} | median of {len(vals)} rounds; {how} |")
        else:
            lines.append(f"| {label} | {fmt(res.get('raw', wl, metric))} | {unit} | {res.note('raw', wl, metric)} |")
    for key, slabel in SYSTEMS:
        for kind, what in (("write", "multipart PUT"), ("read", "parallel ranged GET")):
            v = res.raw_next_to(key, kind)
            if v is not None:
                n = len(res.near_samples(key, kind))
                lines.append(
                    f"| {what}, next to {slabel} | {fmt(v)} | MB/s | median of {n} samples, each run just before "
                    f"its {kind} |"
                )
    return "\n".join(lines)


def rounds_table(res):
    """Each round's sequential figures: the system's, and the raw sample taken just before it."""
    rows = []
    for key, label in SYSTEMS:
        if not res.ran(key) or res.not_run(key):
            continue
        for kind in ("write", "read"):
            vals = res.seq_samples(key, kind)
            if not vals:
                continue
            near = res.near_samples(key, kind)
            cells = [fmt(v) + (f" ({fmt(n)})" if n is not None else "") for v, n in zip(vals, near + [None] * len(vals))]
            spread = f"{fmt(min(vals))}–{fmt(max(vals))}"
            near_med = fmt(median(near)) if near else "—"
            rows.append((label, kind, cells, fmt(median(vals)), spread, near_med))
    width = max((len(r[2]) for r in rows), default=0)
    header = ["system", "", *[f"round {i + 1}" for i in range(width)], "median", "min–max", "raw next to it, median"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for label, kind, cells, med, spread, near_med in rows:
        cells = cells + [""] * (width - len(cells))
        lines.append(f"| {label} | {kind} | " + " | ".join(cells) + f" | {med} | {spread} | {near_med} |")
    return "\n".join(lines)


def ratio_table(res):
    peers = [("raw", "raw client"), ("s3fs-sse", "s3fs"), ("rclone-crypt", "rclone crypt")]
    header = ["system", "read ÷ raw next to it", "write ÷ raw next to it"]
    for _, plabel in peers:
        header += [f"read ÷ {plabel}", f"write ÷ {plabel}"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for key, label in SYSTEMS:
        if key == "raw" or not res.ran(key) or res.not_run(key):
            continue
        cells = [fmt(ratio(res.seq(key, kind), res.raw_next_to(key, kind)), 2) for kind in ("read", "write")]
        for pkey, _ in peers:
            if pkey == key:
                cells += ["—", "—"]
                continue
            cells.append(fmt(ratio(res.seq(key, "read"), res.seq(pkey, "read")), 2))
            cells.append(fmt(ratio(res.seq(key, "write"), res.seq(pkey, "write")), 2))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(res):
    """(target, {system: (value text, met?)}) for each target; met is None when not measured."""

    def check(value, ok, text):
        if value is None:
            return ("n/a", None)
        return (text(value), ok(value))

    def seq_ratio(kind, peer, minimum):
        def f(sys):
            r = ratio(res.seq(sys, kind), res.seq(peer, kind))
            return check(r, lambda v: v >= minimum, lambda v: f"{v:.2f}×")

        return f

    def raw_ratio(kind, minimum):
        """Against the raw row and against the raw sample next to the system: met only if both hold."""

        def f(sys):
            first = ratio(res.seq(sys, kind), res.seq("raw", kind))
            near = ratio(res.seq(sys, kind), res.raw_next_to(sys, kind))
            if first is None:
                return ("n/a", None)
            if near is None:
                return (f"{first:.2f}×", first >= minimum)
            return (f"{first:.2f}× / {near:.2f}×", first >= minimum and near >= minimum)

        return f

    rows = [
        ("sequential read ≥ 0.9× raw parallel ranged GET (medians: raw row / raw next to it)", raw_ratio("read", 0.9)),
        ("sequential read ≥ 2× s3fs", seq_ratio("read", "s3fs-sse", 2.0)),
        ("sequential read ≥ 3× rclone crypt", seq_ratio("read", "rclone-crypt", 3.0)),
        ("sequential write ≥ 0.9× raw multipart PUT (medians: raw row / raw next to it)", raw_ratio("write", 0.9)),
        (
            "4 KiB mid-file overwrite uploads ≤ 16 MiB",
            lambda s: check(res.get(s, "overwrite_4k", "bytes_uploaded"), lambda v: v <= 16, lambda v: f"{v:.1f} MiB"),
        ),
        (
            "one ranged GET per uncached 4 KiB random read",
            lambda s: check(res.get(s, "randread_4k", "gets_per_read"), lambda v: v <= 1.05, lambda v: f"{v:.2f}"),
        ),
        (
            "ls -l of the listing, cold, ≤ 0.5× s3fs's time",
            lambda s: check(
                ratio(res.get(s, "listing", "time"), res.get("s3fs-sse", "listing", "time")),
                lambda v: v <= 0.5,
                lambda v: f"{v:.2f}×",
            ),
        ),
        (
            "ls -l, cold: ≤ 1.05 requests per file",
            lambda s: check(res.get(s, "listing", "requests_per_file"), lambda v: v <= 1.05, lambda v: f"{v:.3f}"),
        ),
        (
            "a repeated lookup of a missing name within the TTL: no request",
            lambda s: check(
                res.get(s, "missing_lookup", "requests_per_lookup"), lambda v: v == 0, lambda v: f"{v:.2f}/lookup"
            ),
        ),
        (
            "daemon peak RSS ≤ 256 MiB",
            lambda s: check(res.get(s, "sequential", "peak_rss"), lambda v: v <= 256, lambda v: f"{v:.0f} MiB"),
        ),
    ]
    out = []
    for name, f in rows:
        out.append((name, {s: f(s) for s in S3CRYPT_S3}))
    stream = "s3crypt-cse-local"
    out.append(
        (
            "streaming a 10 GiB file either way: peak RSS ≤ 256 MiB",
            {stream: check(res.get(stream, "stream", "peak_rss"), lambda v: v <= 256, lambda v: f"{v:.0f} MiB")},
        )
    )
    mem = "s3crypt-memory"
    out.append(
        (
            "in-memory store: sequential write ≥ 1.0 GB/s",
            {mem: check(res.seq(mem, "write"), lambda v: v >= 1000, lambda v: f"{v:.0f} MB/s")},
        )
    )
    out.append(
        (
            "in-memory store: sequential read ≥ 1.5 GB/s",
            {mem: check(res.seq(mem, "read"), lambda v: v >= 1500, lambda v: f"{v:.0f} MB/s")},
        )
    )
    return out


def stream_line(res):
    """The 10 GiB streaming row in one sentence (its figures are in the JSON only otherwise)."""
    sys = "s3crypt-cse-local"
    if res.get(sys, "stream", "peak_rss") is None:
        return "Streaming: not run."
    return (
        f"Streaming (s3crypt cse-local, one file far larger than every buffer, `dd` with 1 MiB blocks): write "
        f"{fmt(res.get(sys, 'stream', 'write_throughput'))} MB/s to the end of fsync and close, cold read "
        f"{fmt(res.get(sys, 'stream', 'read_throughput'))} MB/s, the daemon's peak RSS "
        f"{fmt(res.get(sys, 'stream', 'peak_rss'))} MiB; the write left "
        f"{fmt(res.get(sys, 'stream', 'disk_mib'))} MiB for the disk."
    )


def target_table(res):
    cols = S3CRYPT_S3 + ["s3crypt-memory"]
    labels = dict(SYSTEMS)
    lines = ["| target | " + " | ".join(labels[c] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, per in targets(res):
        cells = []
        for c in cols:
            if c not in per:
                cells.append("")
                continue
            text, met = per[c]
            mark = "not measured" if met is None else ("**met**" if met else "**missed**")
            cells.append(mark if met is None else f"{text} {mark}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def crypto_table(seal):
    if not seal:
        return "Not measured in this run (`examples/seal_bench.rs` was not present or printed nothing)."
    keys = []
    for row in seal:
        for k in row:
            if k not in keys:
                keys.append(k)
    lines = ["| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"]
    for row in seal:
        lines.append("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
    return "\n".join(lines)


def chart(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [(k, lbl) for k, lbl in SYSTEMS if res.ran(k) or res.not_run(k)]
    names = [CHART_LABELS.get(k, k) for k, _ in shown]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 6), gridspec_kw={"width_ratios": [2, 1]})
    xs = range(len(shown))
    width = 0.4
    for offset, kind, color in ((-width / 2, "write", "#4c72b0"), (width / 2, "read", "#dd8452")):
        vals = [res.seq(k, kind) or 0 for k, _ in shown]
        # Bars are medians over the rounds; the whiskers span the lowest and highest round.
        lows = [v - min(res.seq_samples(k, kind) or [v]) for (k, _), v in zip(shown, vals)]
        highs = [max(res.seq_samples(k, kind) or [v]) - v for (k, _), v in zip(shown, vals)]
        bars = ax1.bar(
            [x + offset for x in xs],
            vals,
            width,
            label=f"sequential {kind}",
            color=color,
            yerr=[lows, highs],
            error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "#333333"},
        )
        for bar, v, high in zip(bars, vals, highs):
            if v:
                ax1.annotate(
                    f"{v:.0f}", (bar.get_x() + bar.get_width() / 2, v + high), ha="center", va="bottom", fontsize=7
                )
        # The raw client's sample taken next to each system, as a mark over its bar.
        near = [(x + offset, res.raw_next_to(k, kind)) for x, (k, _) in zip(xs, shown)]
        near = [(x, v) for x, v in near if v]
        if near:
            ax1.scatter(
                [x for x, _ in near],
                [v for _, v in near],
                marker="_",
                s=300,
                color="black",
                zorder=3,
                label="raw client next to it" if kind == "write" else None,
            )
    for x, (k, _) in zip(xs, shown):
        if res.not_run(k):
            ax1.annotate("not run", (x, 0), ha="center", va="bottom", fontsize=8, rotation=90, color="gray")
    ax1.set_xticks(list(xs))
    ax1.set_xticklabels(names, fontsize=7)
    ax1.set_ylabel("MB/s (10^6 bytes/s)")
    ax1.set_title("Sequential throughput, median of the rounds (raw client: multipart PUT / ranged GET)")
    ax1.legend()
    mounts = [(k, lbl) for k, lbl in shown if k != "raw"]
    iops = [res.get(k, "randread_4k", "iops") or 0 for k, _ in mounts]
    ax2.barh([CHART_LABELS[k].replace("\n", " ") for k, _ in mounts], iops, color="#55a868")
    for y, v in enumerate(iops):
        ax2.annotate(f"{v:,.0f}" if v else "n/a", (v, y), va="center", fontsize=7)
    ax2.set_xlabel("IOPS (one synchronous stream)")
    ax2.set_title("4 KiB random reads")
    ax2.tick_params(axis="y", labelsize=7)
    ax2.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(data):
    meta, res = data["meta"], Results(data["results"])
    m, v, sz = meta["machine"], meta["versions"], meta["sizes"]
    out = ["# s3crypt benchmarks", ""]
    if meta.get("quick"):
        out += [
            "> **This is a `scripts/bench --quick` run** (smaller sizes, possibly a busy machine). It checks the",
            "> harness; its figures are not the project's benchmark results. Run `scripts/bench` on a quiet machine.",
            "",
        ]
    out += [
        "Generated by `scripts/bench` from `docs/bench-results.json`; every figure below comes from that run.",
        "All S3 traffic goes to a local S3 + KMS server (LocalStack) on loopback, so absolute numbers say more",
        "about this machine than about S3: compare rows of the same run.",
        "",
        "## Machine and versions",
        "",
        f"- date: {meta['date']}",
        f"- CPU: {m['cpu']}, {m['cores']} cores; kernel {m['kernel']}",
    ]
    for k in ("s3crypt", "localstack", "s3fs", "rclone", "gocryptfs", "fio"):
        out.append(f"- {k}: {v.get(k) or 'unknown'}")
    out += [
        f"- sizes: sequential file {sz['seq_mib']} MiB; random reads {sz['randread_seconds']} s; "
        f"{sz['small_files']} small files; listing of {sz['listing_files']} files; "
        f"sequential write and read: {sz.get('seq_rounds', 1)} rounds per system",
        f"- page cache dropped before cold reads: {'yes' if meta.get('drop_caches') else 'no (not permitted here)'}",
        "",
        "## Results",
        "",
        absolute_table(res),
        "",
        "MB/s is 10^6 bytes per second. The sequential columns are medians over the rounds (see below). For the",
        "raw client they are its multipart PUT (16 MiB parts, 4 in flight) and parallel ranged GET (8 MiB ranges,",
        "8 in flight).",
        "",
        "### Raw client (the ceiling)",
        "",
        raw_table(res),
        "",
        "### Sequential rounds",
        "",
        "Each round writes a new file and reads it back cold; in brackets, the raw client's sample of the same",
        "size taken just before (systems on the S3 server only). Medians are what the ratios and targets use.",
        "",
        rounds_table(res),
        "",
        "### Ratios",
        "",
        "Median sequential throughput of each mount divided by the raw client's (multipart PUT / ranged GET) and",
        "by each peer's, in the same run. \"Raw next to it\" is the median of the raw samples taken just before",
        "the system's own writes or reads (systems on the S3 server only), against the server in the same state;",
        "the raw row is the median of the raw client's rounds at the start of the run. A target against the raw",
        "client is met only if both ratios meet it.",
        "",
        ratio_table(res),
        "",
        "## Targets",
        "",
        target_table(res),
        "",
        stream_line(res),
        "",
        "## Crypto ceiling",
        "",
        "AES-256-GCM-SIV sealing speed on one core, from `cargo run --release --example seal_bench`.",
        "",
        crypto_table(data.get("crypto", [])),
        "",
        "## Method",
        "",
        "- Each system is mounted on its own (own bucket, nothing else running in the script), measured, unmounted.",
        "- Sequential write: `s3bench file-write`, one stream of 1 MiB writes, then fsync and close, timed inside",
        "  the process from open to the end of close (as the raw client times itself, so no tool's start-up is",
        "  counted). rclone uploads after close; its `throughput_uploaded` record in the JSON times the write",
        "  until loopback traffic settled. Sequential read: `s3bench file-read`, 1 MiB reads to the end, timed",
        "  the same way, started cold: the system is unmounted and mounted again (so no daemon cache holds the",
        "  file; not for the in-memory store) and the page cache is dropped. On this one machine that also drops",
        "  the server's cached objects, so the raw client's GETs start after a page-cache drop too. The write and",
        "  the read are repeated in rounds (each round a new file, with a raw PUT and a raw GET just before the",
        "  system's write and read); the tables and the chart show medians, the chart's whiskers the lowest and",
        "  highest round. The raw row's rounds run first, on the fresh server.",
        "- Random reads: fio `randread`, 4 KiB, psync, one job, `POSIX_FADV_RANDOM`, started cold as above;",
        "  IOPS and completion-latency percentiles from fio's JSON. Reads a daemon serves from its own cache",
        "  (repeats, or blocks fetched for a neighbouring read) need no GET, so GET/read can be below 1.",
        "- GET/read, upload requests and KMS calls are counted from the S3 server's request log (one line per",
        "  S3 or KMS request) over the workload's window.",
        "- Overwrite: `dd` of 4 KiB at the middle of the file with `conv=notrunc`; time includes close. Bytes",
        "  uploaded come from s3crypt's stats file when present; otherwise they are an upper bound: the growth",
        "  of the loopback interface's byte counter (both directions, every process on the machine) from the",
        "  write until traffic settles, which also covers asynchronous uploaders such as rclone.",
        "- Small files: one thread creates, writes and closes each 4 KiB file. Listing: files created with 8",
        "  threads, then (for S3-backed systems and gocryptfs) an unmount and mount, a page-cache drop, and",
        "  `ls -l` timed.",
        "- Peak RSS: `VmHWM` of the daemon process after the sequential write and read.",
        "- Write's MiB to disk: the most any one sequential write left for the disk, from the daemon's",
        "  `/proc/PID/io`: `write_bytes` (what it wrote into the page cache: s3crypt's journal, its log, a",
        "  peer's cache files) less `cancelled_write_bytes` (what a truncate or removal took back before the",
        "  kernel wrote it out), measured from before the write until the figure has settled after close.",
        "- s3fs runs with `-o use_sse` and default caching; rclone mounts a crypt remote over an s3 remote with",
        "  `--vfs-cache-mode writes --vfs-write-back 0s` (its uploads after close are asynchronous); gocryptfs",
        "  is mounted over a tmpfs and shows an encrypting FUSE file system without any network.",
    ]
    analysis = os.path.join(os.path.dirname(os.path.abspath(__file__)), "analysis.md")
    if os.path.exists(analysis):
        # Hand-written reasoning about the limits; it quotes no figures, so every number above stays the run's.
        with open(analysis) as f:
            out += ["", f.read().rstrip()]
    notes = sorted({(r["system"], r["note"]) for r in data["results"] if r["metric"] == "status"})
    if notes:
        out += ["", "## Not run or failed", ""]
        out += [f"- {dict(SYSTEMS).get(s, s)}: {n}" for s, n in notes]
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--meta")
    ap.add_argument("--results")
    ap.add_argument("--seal")
    ap.add_argument("--from-json")
    ap.add_argument("--out-dir", required=True)
    a = ap.parse_args()
    os.makedirs(a.out_dir, exist_ok=True)
    if a.from_json:
        with open(a.from_json) as f:
            data = json.load(f)
    else:
        with open(a.meta) as f:
            meta = json.load(f)
        with open(a.results) as f:
            results = json.load(f)
        crypto = []
        if a.seal and os.path.exists(a.seal):
            with open(a.seal) as f:
                crypto = [json.loads(line) for line in f if line.strip().startswith("{")]
        data = {"meta": meta, "results": results, "crypto": crypto}
        with open(os.path.join(a.out_dir, "bench-results.json"), "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
    with open(os.path.join(a.out_dir, "BENCHMARKS.md"), "w") as f:
        f.write(markdown(data))
    chart(Results(data["results"]), os.path.join(a.out_dir, "benchmarks.png"))
    print("report: wrote BENCHMARKS.md, benchmarks.png, bench-results.json", file=sys.stderr)


if __name__ == "__main__":
    main()
