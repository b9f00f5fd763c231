"""Turn RESULT lines (bench_anchor.py + bench_step.py, same run) into a table with ratios to TRL."""
import json
import sys

rows = [json.loads(line.split("RESULT ", 1)[1]) for line in open(sys.argv[1]) if line.startswith("RESULT ")]
base = {r["bs"]: r for r in rows if r["mode"] == "trl"}
print("| mode | batch | step s | tokens/s | peak GiB | MFU | tokens/s vs TRL | peak vs TRL |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    b = base.get(r["bs"])
    ratio = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x" if b else "-"
    mem = f"{r['peak_gib'] / b['peak_gib']:.2f}x" if b else "-"
    print(f"| {r['mode']} | {r['bs']} | {r['step_s']} | {r['tokens_per_s']:,} | {r['peak_gib']} | {r['mfu']:.1%} | {ratio} | {mem} |")
