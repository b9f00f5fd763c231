"""Turn RESULT lines (bench_anchor.py + bench_step.py, same run) into a table with ratios to TRL.
Cached-reference modes are compared with TRL's precompute_ref_log_probs, the others with live-reference TRL."""
import json
import sys

rows = [json.loads(line.split("RESULT ", 1)[1]) for line in open(sys.argv[1]) if line.startswith("RESULT ")]
trl = {(r["mode"], r["bs"]): r for r in rows if r["mode"].startswith("trl")}
print("| mode | batch | step s | tokens/s | peak GiB | MFU | baseline | tokens/s vs baseline | peak vs baseline |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    name = "trl_precompute" if "cached" in r["mode"] or r["mode"] == "trl_precompute" else "trl"
    b = trl.get((name, r["bs"]))
    ratio = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x" if b else "-"
    mem = f"{r['peak_gib'] / b['peak_gib']:.2f}x" if b else "-"
    print(f"| {r['mode']} | {r['bs']} | {r['step_s']} | {r['tokens_per_s']:,} | {r['peak_gib']} | {r['mfu']:.1%} "
          f"| {name if b else '-'} | {ratio} | {mem} |")
