"""The resolution gate on the causal-LM task at a high rank: the default (``resolved=0.1``) against
other gates, paired per seed with plain LoRA's committed runs.

``reflora bench --full --shared-lr-only --rank 64 --tasks lm`` (committed as
``benchmarks/full/lm-r64-part*.json``) showed the default identical to plain LoRA at r = 64: the
gate never opens on these adapters. This script runs ``reflora-param`` (attach's defaults under
AdamW) with other ``resolved`` values on the same task, seeds, batches and rate, and prints each
against plain LoRA from the committed file (the runs are deterministic, so the pairing is exact)::

    python benchmarks/gate_lm.py --resolved 0 0.01 --json benchmarks/rank/lm-r64-gate.json
    python benchmarks/gate_lm.py --from-json benchmarks/rank/lm-r64-gate.json   # print again
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = [ROOT / "benchmarks" / "full" / "lm-r64-part1.json", ROOT / "benchmarks" / "full" / "lm-r64-part2.json"]


def _lora_runs() -> dict[int, dict]:
    from reflora.bench.cli import merge_results

    entry = merge_results(COMMITTED)["tasks"].get("lm-r64", {"runs": []})
    runs = {r["seed"]: r for r in entry["runs"] if r["method"] == "lora"}
    if not runs:
        raise SystemExit("no plain-LoRA runs of lm-r64 in " + ", ".join(map(str, COMMITTED)))
    return runs


def run(resolved: list[float], seeds: int, steps: int) -> list[dict]:
    from reflora.bench.runner import run_one
    from reflora.bench.tasks import TASKS

    task = dataclasses.replace(TASKS["lm"](), rank=64)
    out = []
    for value in resolved:
        for seed in range(seeds):
            r = run_one(task, "reflora-param", task.shared_lr, seed, steps, attach_kw={"resolved": value})
            d = r.as_dict()
            d["resolved"] = value
            out.append(d)
            print(f"resolved={value:g} seed {seed}: final loss {r.final_loss:.3f}, test ppl {r.metric:.3f}", flush=True)
    return out


def table(runs: list[dict]) -> str:
    from reflora.bench.report import mean_sd, paired

    lora = _lora_runs()
    lines = ["| method | final loss | Δ loss vs LoRA [95% CI] (W / L) | test ppl | Δ ppl vs LoRA [95% CI] (W / L) |",
             "|---|---|---|---|---|",
             f"| plain LoRA | {mean_sd([r['final_loss'] for r in lora.values()])} | | "
             f"{mean_sd([r['metric'] for r in lora.values()])} | |"]
    for value in dict.fromkeys(r["resolved"] for r in runs):
        mine = [r for r in runs if r["resolved"] == value and r["seed"] in lora]
        dl = paired([r["final_loss"] - lora[r["seed"]]["final_loss"] for r in mine], True)
        dm = paired([r["metric"] - lora[r["seed"]]["metric"] for r in mine], True)
        lines.append(f"| default with `resolved={value:g}` | {mean_sd([r['final_loss'] for r in mine])} | {dl} | "
                     f"{mean_sd([r['metric'] for r in mine])} | {dm} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolved", type=float, nargs="+", default=[0.0, 0.01])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--json", type=Path, default=None, help="write the runs here")
    p.add_argument("--from-json", type=Path, default=None, help="print the table of saved runs; runs nothing")
    args = p.parse_args()
    if args.from_json:
        runs = json.loads(args.from_json.read_text())
    else:
        runs = run(args.resolved, args.seeds, args.steps)
        if args.json:
            args.json.write_text(json.dumps(runs, separators=(",", ":"), default=float))
    print(table(runs))


if __name__ == "__main__":
    main()
