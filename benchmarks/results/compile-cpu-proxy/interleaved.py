"""CPU proxy: eager vs compiled (inductor default) peft-lora / lora / full-ft, interleaved rounds, medians."""
import statistics
import time

import torch

from benchmarks.train_step import Setup, prepare

setup = Setup("proxy", 16, 4, 16, 20, "cpu", "fp32")
names = ["peft-lora", "lora", "full-ft", "peft-lora@compile", "lora@compile", "full-ft@compile"]
runs = {}
for name in names:
    base, _, mode = name.partition("@")
    model, before, after = prepare(base, setup, 1000)
    model.train()
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    c = torch.compile(model) if mode else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    def step(c=c, ids=ids, opt=opt, before=before, after=after):
        c(input_ids=ids, labels=ids).loss.backward(); before(0); opt.step(); after(0); opt.zero_grad(set_to_none=True)
    def fb(c=c, ids=ids, model=model):
        c(input_ids=ids, labels=ids).loss.backward(); model.zero_grad(set_to_none=True)
    t = time.perf_counter(); step(); step()
    print(name, "first two steps (compile) s", round(time.perf_counter() - t, 1), flush=True)
    runs[name] = (step, fb)
res = {n: ([], []) for n in names}
for r in range(7):
    for n, (step, fb) in runs.items():
        for k, fn in enumerate((step, fb)):
            ts = []
            for _ in range(5):
                t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
            res[n][k].append(statistics.median(ts))
base = statistics.median(res["peft-lora"][0])
print(f"{'method':20s} {'step ms':>8s} {'x peft eager':>12s} {'fwd+bwd ms':>10s}")
for n in names:
    s, f = statistics.median(res[n][0]), statistics.median(res[n][1])
    print(f"{n:20s} {s*1e3:8.2f} {s/base:12.2f} {f*1e3:10.2f}", flush=True)
