"""The fuzz suite at scale: the generators of tests/fuzzgen.py over thousands of inputs.

    python bench/fuzz.py --per-family scenario=500,trace=400,profile=300,sweep=250,import=350,flags=150,report=100

Counts by family and outcome (clean error / valid run / traceback / hang / accepted but should
be refused / unclear / half-written), and the failures themselves. Each case runs in this
process under a watchdog (``--timeout`` s = a hang) with the address space capped
(``--mem-gib``) so that a memory bomb fails as a traceback instead of taking the machine.
Seeds are the case numbers: the same command gives the same inputs.
"""
from __future__ import annotations

import argparse
import collections
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fuzzgen import FAMILIES, OUTCOMES, make_case, run_case  # noqa: E402

DEFAULT = "scenario=500,trace=400,profile=300,sweep=250,import=350,flags=150,report=100"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-family", default=DEFAULT, help=f"family=count,... [{DEFAULT}]")
    ap.add_argument("--timeout", type=int, default=30, help="seconds before a case counts as a hang")
    ap.add_argument("--mem-gib", type=float, default=6.0, help="address-space cap of this process")
    ap.add_argument("--json", type=Path, help="write the counts and failures here")
    args = ap.parse_args()
    cap = int(args.mem_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    plan = {k: int(v) for k, v in (kv.split("=") for kv in args.per_family.split(","))}
    counts: dict[str, collections.Counter] = {f: collections.Counter() for f in plan}
    failures = []
    t0 = time.perf_counter()
    for fam, n in plan.items():
        if fam not in FAMILIES:
            ap.error(f"unknown family {fam!r}; known: {', '.join(FAMILIES)}")
        for seed in range(n):
            with tempfile.TemporaryDirectory() as d:
                case = make_case(fam, seed, Path(d))
                outcome, detail = run_case(case, args.timeout)
            counts[fam][outcome] += 1
            if outcome not in ("clean", "valid"):
                failures.append({"family": fam, "seed": seed, "outcome": outcome, "label": case.label,
                                 "detail": detail[:500]})
        print(f"{fam}: {dict(counts[fam])}", file=sys.stderr)
    wall = time.perf_counter() - t0
    total = collections.Counter()
    for c in counts.values():
        total.update(c)
    print("| family | inputs | " + " | ".join(OUTCOMES) + " |")
    print("|---|---:|" + "---:|" * len(OUTCOMES))
    for fam, c in [*counts.items(), ("all", total)]:
        print(f"| {fam} | {sum(c.values())} | " + " | ".join(str(c[o]) for o in OUTCOMES) + " |")
    print(f"\n{sum(total.values())} inputs in {wall:.0f} s")
    for f in failures[:50]:
        print(f"- {f['family']} seed {f['seed']}: {f['outcome']}: {f['label']}: {f['detail'][:200]}")
    if args.json:
        args.json.write_text(json.dumps({"counts": {k: dict(v) for k, v in counts.items()}, "wall_s": wall,
                                         "failures": failures}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
