"""sha256 of every plan (operations + decision counts) of the planner over a grid of (model, trace,
policy) combinations, to check that a planner change keeps the plans (run it on both trees):

    PYTHONPATH=/tmp/old python bench/plan_digest.py; PYTHONPATH=. python bench/plan_digest.py

Prints the number of combinations and one digest over all (refused policies count by their
error); ``--each`` prints every combination with its digest as a JSON line.
"""
import hashlib, itertools, sys, json
import numpy as np
from simulator.models import ModelSpec
from simulator.planner import Planner
from simulator.scenario import PolicySpec
from simulator.traces import generate

models = [ModelSpec(name="m", num_layers=4, num_experts=12, top_k=2, hidden=768, ffn=3072, dtype="fp32"),
          ModelSpec(name="m8", num_layers=6, num_experts=8, top_k=2, hidden=768, ffn=3072, dtype="fp32"),
          ModelSpec(name="m64", num_layers=3, num_experts=64, top_k=6, hidden=768, ffn=3072, dtype="fp32")]
rng = np.random.default_rng(1)
h_all = hashlib.sha256()
n = 0
for m in models:
    for B, P in ((1, 0), (5, 0), (16, 3)):
        tr = generate(num_layers=m.num_layers, num_experts=m.num_experts, top_k=m.top_k, batch_size=B, steps=12,
                      seed=B, generator="mixed", zipf=0.7, temporal=0.4, batch_locality=0.3, prefill_tokens=P, version=2)
        for load in ("per-item", "dedup", "coalesced", "layer"):
            for kind in ("none", "lru", "fifo", "lfu", "belady", "static-hot"):
                for cap in (None, 1, 3, 7, 20, 200):
                    if cap is None and kind != "none":
                        continue
                    for scope in ("global", "per-layer"):
                        if scope == "per-layer" and (cap is None or kind == "none"):
                            continue
                        for pf in ("none", "oracle", "predicted", "popularity"):
                            for budget in (None, 2):
                                if pf == "none" and budget:
                                    continue
                                for miss in ("copy", "cpu"):
                                    if rng.random() > 0.35:
                                        continue
                                    cache = {"kind": kind, "scope": scope}
                                    if cap is not None:
                                        cache["capacity"] = min(cap, m.num_layers * m.num_experts)
                                    if kind == "static-hot" and rng.random() < 0.5:
                                        cache["staging"] = 2
                                    pol = dict(name="p", load=load, cache=cache, prefetch={"kind": pf, "budget": budget},
                                               miss=miss)
                                    try:
                                        spec = PolicySpec(**pol)
                                        pl = Planner(m, spec, tr, seed=3)
                                        h = hashlib.sha256()
                                        for s in range(tr.num_steps):
                                            layers, d = pl.plan_step(s)
                                            h.update(repr(layers).encode()); h.update(repr(d.as_dict()).encode())
                                        dig = h.hexdigest()
                                    except Exception as e:
                                        dig = "ERR " + type(e).__name__ + str(e)[:80]
                                    h_all.update(dig.encode()); n += 1
                                    if "--each" in sys.argv:
                                        print(json.dumps([m.name, B, pol, dig]))
print(n, h_all.hexdigest(), file=sys.stderr)
