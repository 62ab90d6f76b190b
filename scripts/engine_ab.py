"""Another revision's engine against this one, interleaved in one process so both see the same outside load.

Prepare the other revision as a package named serve_app_old, then run from the repository root:

    git archive cf91726 serve_app | tar -x -C /tmp/old && mv /tmp/old/serve_app /tmp/old/serve_app_old
    grep -rl "serve_app\\." /tmp/old/serve_app_old | xargs sed -i 's/\\bserve_app\\./serve_app_old./g'
    chatglm2-serve demo-checkpoint /tmp/small --preset small
    python scripts/engine_ab.py /tmp/old /tmp/small 3

Each round runs 16 requests (128 prompt tokens, 32 new, eos ignored) at concurrency 16 through both engines, the
new one again with temperature 0.95 / top_p 0.7, then 2 requests one at a time (sequential.generate) and through
the engine at concurrency 1; the order alternates between rounds. Prints per-round output tok/s, medians, and
whether greedy ids were identical.
"""
import asyncio
import statistics
import sys
import time

sys.path.insert(0, sys.argv[1]); sys.path.insert(0, ".")
import torch

torch.set_num_threads(2)
from serve_app_old.engine.engine import Engine as OldEngine
from serve_app_old.engine.engine import EngineConfig as OldConfig
from serve_app_old.engine.params import SamplingParams as OldParams
from serve_app_old.engine.sequential import generate as gen_old
from serve_app_old.model.loader import load_model as load_old

from serve_app.engine.engine import Engine as NewEngine
from serve_app.engine.engine import EngineConfig as NewConfig
from serve_app.engine.params import SamplingParams as NewParams
from serve_app.engine.sequential import generate as gen_new
from serve_app.model.loader import load_model as load_new

CK = sys.argv[2]; PROMPT, NEW, CONC = 128, 32, 16
ROUNDS = int(sys.argv[3]) if len(sys.argv) > 3 else 3
impls = {"old": (load_old(CK, "fp32", "cpu"), OldEngine, OldConfig, OldParams, gen_old),
         "new": (load_new(CK, "fp32", "cpu"), NewEngine, NewConfig, NewParams, gen_new)}

def prompts(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [[8001, 8003] + torch.randint(3, 7900, (PROMPT - 2,), generator=g).tolist() for _ in range(n)]

async def engine_run(name, ps, conc, sampling):
    loaded, Engine, Config, Params, _ = impls[name]
    engine = Engine(loaded, Config(16, PROMPT + NEW))
    params = Params(max_new_tokens=NEW, ignore_eos=True, **sampling)
    it = iter(ps); outs = {}
    async def client():
        for i, p in it:
            outs[i] = [t async for d in engine.generate(p, params) for t in d.token_ids]
    it = iter(list(enumerate(ps)))
    t = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(conc)))
    wall = time.perf_counter() - t
    await engine.shutdown()
    return sum(map(len, outs.values())) / wall, [outs[i] for i in range(len(ps))]

def seq_run(name, ps):
    loaded, _, _, Params, gen = impls[name]
    params = Params(max_new_tokens=NEW, ignore_eos=True)
    t = time.perf_counter(); outs = [gen(loaded, p, params).token_ids for p in ps]
    return sum(map(len, outs)) / (time.perf_counter() - t), outs

results = {k: [] for k in ["old c16", "new c16", "new c16 top_p", "old seq", "new seq", "old c1", "new c1"]}
same = []
# warm-up
asyncio.run(engine_run("old", prompts(2, 1), 2, {})); asyncio.run(engine_run("new", prompts(2, 1), 2, {}))
for r in range(ROUNDS):
    ps = prompts(CONC, 100 + r)
    order = ["old", "new"] if r % 2 == 0 else ["new", "old"]
    ids = {}
    for name in order:
        tps, ids[name] = asyncio.run(engine_run(name, ps, CONC, {}))
        results[f"{name} c16"].append(tps)
    tps, _ = asyncio.run(engine_run("new", ps, CONC, {"temperature": 0.95, "top_p": 0.7, "seed": 1}))
    results["new c16 top_p"].append(tps)
    same.append(ids["old"] == ids["new"])
    sp = prompts(2, 200 + r)
    for name in order:
        tps, sids = seq_run(name, sp); results[f"{name} seq"].append(tps)
        tps, _ = asyncio.run(engine_run(name, sp, 1, {})); results[f"{name} c1"].append(tps)
    print(r, {k: round(v[-1], 1) for k, v in results.items()}, "greedy ids old==new:", same[-1], flush=True)
med = {k: statistics.median(v) for k, v in results.items()}
print("median out tok/s:", {k: round(v, 1) for k, v in med.items()})
print("speedup c16/seq: old {:.2f}x new {:.2f}x; top_p/greedy new c16: {:.2f}; new/old c16 {:.2f}, seq {:.2f}, c1 {:.2f}".format(
    med["old c16"] / med["old seq"], med["new c16"] / med["new seq"], med["new c16 top_p"] / med["new c16"],
    med["new c16"] / med["old c16"], med["new seq"] / med["old seq"], med["new c1"] / med["old c1"]))
print("per-round ratios new/old c16:", [round(n / o, 2) for n, o in zip(results["new c16"], results["old c16"])])
print("greedy ids identical in every round:", all(same))
