"""Per-step time of the objective: eager, --jit (torch.jit.trace) and torch.compile, iwae1, batch 100.

    python benchmarks/jit_vs_compile.py
"""
import statistics
import time
import warnings

import pyro
import torch

warnings.filterwarnings("ignore")
from pyro_vae.config import TrainConfig, build_model_and_guide
from pyro_vae.objectives import Objective, make_estimator
from pyro_vae.objectives.traced import TracedObjective

torch.set_num_threads(1)
pyro.enable_validation(False)
c=TrainConfig.from_dict(dict(preset='iwae1', x_dim=784))
m,g=build_model_and_guide(c)
x=torch.bernoulli(torch.rand(100,784)*0.3)
o=Objective(m,g,make_estimator('elbo'))
def mk(f):
    opt=torch.optim.Adam(o.parameters())
    def step():
        l=f(x); opt.zero_grad(); l.backward(); opt.step()
    return step
t=time.time()
comp=torch.compile(o)
try:
    mk(comp)(); print('compile first step %.1fs' % (time.time()-t))
except Exception as e:
    print('compile failed:', type(e).__name__, str(e)[:300]); comp=None
tr=TracedObjective(o)
def bench(f,n=100):
    for _ in range(5): f()
    t=time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter()-t)/n*1e3
fs={'eager':mk(o),'jit':mk(tr)}
if comp is not None: fs['compile']=mk(comp)
res={k:[] for k in fs}
for r in range(3):
    for k,f in fs.items(): res[k].append(bench(f))
print({k:round(statistics.median(v),3) for k,v in res.items()}, 'ms/step')
