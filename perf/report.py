#!/usr/bin/env python3
"""Helper of perf/run.sh.

  report.py wrap SECTION STEP TOOL REP COMMAND OUT_JSON STATUS [TIME_V_FILE]
      prints one .jsonl line: the step, its command, exit status and raw JSON result (the last
      JSON object of OUT_JSON; fio's multi-line output is compacted), plus the peak RSS from a
      `/usr/bin/time -v` file when given.
  report.py report RUN.jsonl PREFIX
      writes PREFIX.md (tables: median of the repetitions, min-max, ratio to fio) and
      PREFIX-*.png (bar charts) when matplotlib is importable.
"""
import datetime
import json
import os
import statistics
import subprocess
import sys


def last_json(text):
    text = text.strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    for line in reversed(text.splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        return None


def wrap(section, step, tool, rep, command, out_path, status, time_path=None):
    with open(out_path) as f:
        result = last_json(f.read())
    line = {"section": section, "step": step, "tool": tool, "rep": int(rep),
            "command": command, "status": int(status), "result": result}
    if time_path:
        with open(time_path) as f:
            for row in f:
                if "Maximum resident set size" in row:
                    line["max_rss_kib"] = int(row.split(":")[1])
                if "Elapsed (wall clock)" in row:
                    line["wall_clock"] = row.split(": ", 1)[1].strip()
    print(json.dumps(line, separators=(",", ":")))


def figures(entry):
    """MB/s, CPU-s per GiB, latency (what, p50, p99, p99.9 in µs) of one recorded run."""
    r = entry["result"]
    if not r or entry["status"] != 0:
        return None
    if entry["tool"] == "fio":
        job = r["jobs"][0]
        side = job["write"] if job["write"]["io_bytes"] else job["read"]
        seconds = job["job_runtime"] / 1000
        cpu = (job["usr_cpu"] + job["sys_cpu"]) / 100 * seconds
        pct = side["clat_ns"].get("percentile", {})
        lat = lambda q: pct.get(q, 0) / 1000  # noqa: E731
        return {"mb_per_s": side["bw_bytes"] / 1e6, "cpu_per_gib": cpu / (side["io_bytes"] / 2**30),
                "what": "fio clat per 1 MiB request",
                "p50": lat("50.000000"), "p99": lat("99.000000"), "p999": lat("99.900000")}
    latency = r.get("latency_us") or {}
    return {"mb_per_s": r["mb_per_s"], "cpu_per_gib": r.get("cpu_seconds_per_gib"),
            "what": latency.get("what", "-"), "p50": latency.get("p50"),
            "p99": latency.get("p99"), "p999": latency.get("p99_9")}


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, digits=0):
    return "-" if value is None else f"{value:.{digits}f}"


def shell(args):
    try:
        return subprocess.run(args, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "?"


def report(jsonl, prefix):
    entries = [json.loads(line) for line in open(jsonl) if line.strip()]
    groups = {}
    for entry in entries:
        groups.setdefault((entry["section"], entry["step"], entry["tool"]), []).append(entry)
    rows = []
    for (section, step, tool), runs in groups.items():
        figs = [f for f in map(figures, runs) if f]
        mbs = [f["mb_per_s"] for f in figs]
        rows.append({"section": section, "step": step, "tool": tool, "runs": len(runs),
                     "failed": len(runs) - len(figs),
                     "mb_per_s": median(mbs), "min": min(mbs) if mbs else None,
                     "max": max(mbs) if mbs else None,
                     "cpu_per_gib": median([f["cpu_per_gib"] for f in figs]),
                     "what": figs[0]["what"] if figs else "-",
                     "p50": median([f["p50"] for f in figs]), "p99": median([f["p99"] for f in figs]),
                     "p999": median([f["p999"] for f in figs]),
                     "rss": median([e.get("max_rss_kib") for e in runs])})
    fio = {r["section"]: r["mb_per_s"] for r in rows if r["tool"] == "fio"}
    for row in rows:
        base = fio.get(row["section"])
        row["ratio"] = (row["mb_per_s"] / base) if base and row["mb_per_s"] and row["tool"] != "fio" else None

    lscpu = shell(["lscpu"])
    model = next((l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith("Model name")), "?")
    commit = shell(["git", "rev-parse", "--short", "HEAD"])
    if shell(["git", "status", "--porcelain", "--untracked-files=no"]):
        commit += " (+ uncommitted changes)"
    reps = max((e["rep"] for e in entries), default=0)
    names = {"a": "(a) sequential read, loop device (O_DIRECT backing file)",
             "b": "(b) sequential write, same loop device",
             "c": "(c) engine stages on the generated images (hash/compress in memory, pipeline into a null store)",
             "d": "(d) peak RSS of `bench pipeline` on sparse files",
             "e": "(e) S3 multipart upload to local Garage"}
    out = []
    out.append(f"# perf/run.sh, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n")
    out.append(f"- machine: {model}, {os.cpu_count()} CPUs (nproc {shell(['nproc'])})")
    out.append(f"- kernel: {shell(['uname', '-r'])}")
    out.append(f"- git commit: {commit}")
    out.append(f"- {shell(['fio', '--version'])}; up to {reps} repetitions per step, fio and bench alternating")
    out.append(f"- raw results and commands: `{os.path.basename(jsonl)}`\n")
    out.append("MB/s is the median of the repetitions (min-max in brackets); CPU-s/GiB is process "
               "user+sys; latencies are medians over repetitions of each run's percentile, in µs. "
               "fio latency is completion latency per 1 MiB request; `bench read` latency is the time "
               "between consecutive 4 MiB chunk arrivals at the consumer; hash/compress per 4 MiB "
               "chunk; upload per 16 MiB part.\n")
    for section in sorted({r["section"] for r in rows}):
        out.append(f"## {names.get(section, section)}\n")
        if section == "d":
            out.append("| image | MB/s | CPU-s/GiB | peak RSS MiB |")
            out.append("|---|---|---|---|")
            for r in [r for r in rows if r["section"] == section]:
                out.append(f"| {r['step']} | {fmt(r['mb_per_s'])} | {fmt(r['cpu_per_gib'], 2)} "
                           f"| {fmt(r['rss'] and r['rss'] / 1024)} |")
            out.append("")
            continue
        out.append("| step | tool | runs | MB/s median (min-max) | CPU-s/GiB | latency | p50 µs | p99 µs | p99.9 µs | vs fio |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in [r for r in rows if r["section"] == section]:
            failed = f", {r['failed']} failed" if r["failed"] else ""
            out.append(f"| {r['step']} | {r['tool']} | {r['runs']}{failed} | {fmt(r['mb_per_s'])} "
                       f"({fmt(r['min'])}-{fmt(r['max'])}) | {fmt(r['cpu_per_gib'], 2)} | {r['what']} "
                       f"| {fmt(r['p50'])} | {fmt(r['p99'])} | {fmt(r['p999'])} "
                       f"| {fmt(r['ratio'], 2)} |")
        out.append("")
    with open(prefix + ".md", "w") as f:
        f.write("\n".join(out) + "\n")
    print("\n".join(out))
    plots(rows, prefix)


def plots(rows, prefix):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plots", file=sys.stderr)
        return
    base = os.path.basename(prefix)

    def bars(selected, title, path, value="mb_per_s", ylabel="MB/s"):
        if not selected:
            return
        labels = [f"{r['step']}\n{r['tool']}" for r in selected]
        values = [r[value] or 0 for r in selected]
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(selected)), 4.5))
        colors = ["tab:gray" if r["tool"] == "fio" else "tab:blue" for r in selected]
        if value == "mb_per_s":
            err = [[v - (r["min"] or v) for v, r in zip(values, selected)],
                   [(r["max"] or v) - v for v, r in zip(values, selected)]]
            ax.bar(labels, values, color=colors, yerr=err, capsize=4)
        else:
            ax.bar(labels, values, color=colors)
        for i, v in enumerate(values):
            ax.annotate(f"{v:.0f}" if value == "mb_per_s" else f"{v:.2f}", (i, v),
                        ha="center", va="bottom", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} ({base})")
        plt.xticks(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    ok = [r for r in rows if r["mb_per_s"]]
    bars([r for r in ok if r["section"] in ("a", "b")], "fio vs bench on one loop device",
         f"{prefix}-fio-vs-bench.png")
    stages = [r for r in ok if r["section"] in ("a", "b", "c", "e") and r["tool"] != "fio"]
    bars(stages, "MB/s per stage", f"{prefix}-stages.png")
    bars([r for r in stages if r["cpu_per_gib"] is not None], "CPU seconds per GiB per stage",
         f"{prefix}-cpu.png", value="cpu_per_gib", ylabel="CPU-s/GiB")


if __name__ == "__main__":
    if len(sys.argv) >= 8 and sys.argv[1] == "wrap":
        wrap(*sys.argv[2:10])
    elif len(sys.argv) == 4 and sys.argv[1] == "report":
        report(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
