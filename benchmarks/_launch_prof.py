import time, torch
from triton import knobs
from flashmla import testing
from flashmla_triton import decode, launch as L
dev = torch.device("cuda")
inputs = testing.dense_decode_inputs(2, 1, 128, 64, device=dev, seed=1)
p = testing.problem_for("decode", inputs)
plan = decode.plan_dense_decode(p)
out, lse = p.empty_outputs()
ls = decode.dense_decode_launches(p, plan, out, lse)
for _ in range(5): ls[0]()
torch.cuda.synchronize()
la = ls[0]
values = [la.args[n] for n in la.kernel.arg_names]
key = (la.kernel, la.num_warps, la.num_stages, torch.cuda.current_device(), *map(L._specialization, values))
print("cached:", key in L._COMPILED, "entries", len(L._COMPILED))
compiled = L._COMPILED[key]
N = 300
def t(f):
    t0 = time.perf_counter()
    for _ in range(N): f()
    return f"{(time.perf_counter() - t0) / N * 1e6:.1f} us"
print("values list", t(lambda: [la.args[n] for n in la.kernel.arg_names]))
print("key", t(lambda: (la.kernel, la.num_warps, la.num_stages, torch.cuda.current_device(), *map(L._specialization, values))))
print("stream", t(lambda: torch.cuda.current_stream().cuda_stream))
print("compiled.run", t(lambda: compiled.run(la.grid[0], la.grid[1], la.grid[2], torch.cuda.current_stream().cuda_stream, compiled.function, compiled.packed_metadata, None, knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *values)))
print("Launch()", t(la))
print("jit run", t(lambda: la.kernel[la.grid](**la.args, num_warps=la.num_warps, num_stages=la.num_stages)))
torch.cuda.synchronize()
