import torch, torch.nn as nn, torch.nn.functional as F
import tbo_compiler.runtime.comm, tbo_compiler.runtime.kernels
from tbo_compiler.capture import capture_export
from tbo_compiler.passes.pipeline import compile_graph, CompileOptions
from tbo_compiler.runtime.executor import Executor
from tbo_compiler.models.batch import PagedKVCache
ops = torch.ops.tbo
class Toy(nn.Module):
    def __init__(s, D=16, E=4, L=2):
        super().__init__()
        s.emb = nn.Embedding(50, D); s.L=L
        s.qkv = nn.ModuleList([nn.Linear(D, 3*D) for _ in range(L)])
        s.gate = nn.ModuleList([nn.Linear(D, E, bias=False) for _ in range(L)])
        s.w13 = nn.Parameter(torch.randn(L, E, 2*8, D)*0.2); s.w2 = nn.Parameter(torch.randn(L, E, D, 8)*0.2)
        s.head = nn.Linear(D, 50)
    def forward(s, ids, pos, slots, bt, caches):
        x = s.emb(ids)
        T = x.shape[0]
        for l in range(s.L):
            q, k, v = s.qkv[l](x).view(T, 3, 2, 8).unbind(1)
            caches[l].index_put_((slots,), torch.stack([k, v], 1))
            a = ops.paged_attention(q, caches[l], bt, pos, 4, 0.3).reshape(T, 16)
            x = x + a
            p = s.gate[l](x).softmax(-1); w, i = p.topk(2, -1)
            h = ops.dispatch_start(x, i, w, "g", 1, 4)
            rx, ri, rw = ops.dispatch_wait(h, x, i, "g", 1)
            y = ops.moe_experts(rx, ri, rw, s.w13[l], s.w2[l])
            h2 = ops.combine_start(y, "g", 1)
            x = x + ops.combine_wait(h2, y, "g", 1)
        return (s.head(F.rms_norm(x, (16,)))).float()
torch.manual_seed(0)
m = Toy().eval()
cache = PagedKVCache([(2,2,8)]*2, 16, 4)
b = cache.make_batch([("a", list(range(5))), ("b", list(range(3,10)))])
caches0 = [c.clone() for c in cache.caches]
with torch.no_grad():
    ref = m(*b.args(), [c.clone() for c in caches0])
gm, specs = capture_export(m, (*b.args(), [c.clone() for c in caches0]))
print(specs[:3], len(specs))
T = b.num_tokens
tok = tuple(s.name for s in specs if s.kind=="user")[:4]
c = compile_graph(gm, tok, T, CompileOptions(mode="prefill"))
print("cut", c.cut, "order", c.schedule.order_name, c.schedule.candidates, "comm", len(c.comm_before.ops), len(c.comm.ops))
params = dict(m.named_parameters())
ex = Executor(c.gm, c.schedule.instrs)
cs = [c_.clone() for c_ in caches0]
inputs = [params[s.target] if s.kind=="param" else None for s in specs]
ui = [*b.args(), *cs]
inputs = [params[s.target] if s.kind=="param" else ui[int(s.target)] for s in specs]
out = ex(*inputs)
print((out[0]-ref).abs().max(), [ (a - bb).abs().max().item() for a, bb in zip(cs, [c.clone() for c in caches0])])
refc = [c.clone() for c in caches0]
with torch.no_grad(): m(*b.args(), refc)
print("cache diff", [ (a-bb).abs().max().item() for a,bb in zip(cs, refc)])
for i in c.schedule.instrs[:40]: print(i.to_list())
