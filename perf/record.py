"""One JSON Lines record of a timed step, shared by perf/peers.sh and perf/upload-sweep.sh.

usage: record.py TIME_FILE OUT_FILE ERR_FILE G0 G1 FIELDS_JSON
TIME_FILE holds `/usr/bin/time -f '%e %U %S %M'`; OUT_FILE the tool's stdout (its last JSON line
is kept as `result`); G0/G1 Garage's CPU seconds before and after (-1: unknown); FIELDS_JSON the
step's own fields (must include `status`). Prints the record.
"""
import json
import sys

time_path, out_path, err_path, g0, g1, fields = sys.argv[1:]
wall = user = sys_s = rss = None
for line in open(time_path):
    parts = line.split()
    if len(parts) == 4:
        try:
            wall, user, sys_s, rss = float(parts[0]), float(parts[1]), float(parts[2]), int(parts[3])
        except ValueError:
            pass
result = None
for line in reversed(open(out_path, errors="replace").read().strip().splitlines()):
    try:
        result = json.loads(line)
        break
    except json.JSONDecodeError:
        continue
g0, g1 = float(g0), float(g1)
record = json.loads(fields)
record.update({"wall_s": wall, "user_s": user, "sys_s": sys_s, "max_rss_kib": rss,
               "garage_cpu_s": round(g1 - g0, 2) if g0 >= 0 and g1 >= 0 else None,
               "result": result})
if int(record["status"]) != 0:
    record["stderr_tail"] = open(err_path, errors="replace").read()[-2000:]
print(json.dumps(record, separators=(",", ":")))
