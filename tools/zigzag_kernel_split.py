"""Kernel work of one zigzag ring rank in isolation vs the whole sequence in one process.

Usage: python tools/zigzag_kernel_split.py
Runs, in one process and one thread, exactly the kernel calls a zigzag ring rank
makes at W=2 (no communication) and the single-process causal call, and prints
the efficiency single / (2 x max rank). It separates kernel-call efficiency from
scheme and concurrency overheads in `distattn bench attention`.
"""
import torch, time
torch.set_num_threads(1)
from distattn.kernels import block_forward, block_backward, plan_calls
from distattn.layout import get_layout
N,H,D=8192,8,64
g=torch.Generator().manual_seed(0)
q=torch.randn(N,H,D,generator=g); k=torch.randn(N,H,D,generator=g); v=torch.randn(N,H,D,generator=g); do=torch.randn(N,H,D,generator=g)
def run(qr, kr_list, q_, kvs):
    t=time.thread_time()
    out=lse=None
    for calls,(kk,vv) in zip(kr_list,kvs):
        out,lse=block_forward(q_,kk,vv,calls,0.125,out,lse)
    o=out.float()
    dq=None
    for calls,(kk,vv) in zip(kr_list,kvs):
        dq,_,_=block_backward(do[:q_.shape[0]],q_,kk,vv,o,lse,calls,0.125,dq=dq)
    return time.thread_time()-t
full=get_layout("contiguous",N,1); r=full.runs(0)
ts=min(run(None,[plan_calls(r,r,True)],q,[(k,v)]) for _ in range(2))
lay=get_layout("zigzag",N,2)
tr=0
for rank in range(2):
    idx=lay.indices(rank); other=lay.indices(1-rank)
    cs=[plan_calls(lay.runs(rank),lay.runs(rank),True), plan_calls(lay.runs(rank),lay.runs(1-rank),True)]
    t=min(run(None,cs,q[idx],[(k[idx],v[idx]),(k[other],v[other])]) for _ in range(2))
    print("rank",rank,"calls",[[(c.q1-c.q0,c.k1-c.k0,c.causal) for c in cc] for cc in cs], t)
    tr=max(tr,t)
print("single",ts,"rank max",tr,"eff",ts/(2*tr))
