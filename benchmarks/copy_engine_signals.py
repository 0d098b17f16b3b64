"""Can a copy-engine exchange hide beside a GEMM where NCCL's all-to-all cannot? (2 GPUs of one host)

The exchange: each rank's block for the peer sits in a symmetric-memory buffer; the peer pulls it with a copy
(copy engines, no SMs). Signals are stream memory operations (cuStreamWriteValue32 into the peer's signal pad,
cuStreamWaitValue32 on the own), or symmetric memory's barrier kernels for comparison. Timed alone and beside
FLUX's single-block MLP GEMM at 2 GPUs (2304x3072 @ 3072x12288), against NCCL's all_to_all_single, at the sizes of
one FLUX q/k/v head chunk, one output chunk and all of q/k/v. Everything runs inside CUDA graphs (K iterations per
graph, median of R replays, the slowest rank); the exchanged data is checked.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 torchrun --nproc-per-node 2 benchmarks/copy_engine_signals.py

Results: benchmarks/results/2026-11-28-copy-engine-exchange.md."""
import ctypes, os, statistics
import torch, torch.distributed as dist
import torch.distributed._symmetric_memory as symm_mem

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
assert world == 2
dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
torch.cuda.set_device(dev)
dist.init_process_group("nccl", device_id=dev)
peer = 1 - rank
P = lambda *a: print(*a, flush=True) if rank == 0 else None
cuda = ctypes.CDLL("libcuda.so.1")


def driver(name):
    for n in (name + "_v2", name):
        try:
            f = getattr(cuda, n)
            f.restype = ctypes.c_int
            f.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
            return f
        except AttributeError:
            pass
    raise RuntimeError(name)


write_value, wait_value = driver("cuStreamWriteValue32"), driver("cuStreamWaitValue32")
WAIT_EQ = 1


def stream():
    return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)


def write(addr, v):
    rc = write_value(stream(), addr, v, 0)
    assert rc == 0, f"cuStreamWriteValue32 rc {rc}"


def wait(addr, v):
    rc = wait_value(stream(), addr, v, WAIT_EQ)
    assert rc == 0, f"cuStreamWaitValue32 rc {rc}"


M, K_, N = 2304, 3072, 12288
x = torch.randn(M, K_, device=dev, dtype=torch.bfloat16)
w = torch.randn(K_, N, device=dev, dtype=torch.bfloat16)
gemm_out = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
side = torch.cuda.Stream()


def gemm():
    torch.mm(x, w, out=gemm_out)


class Exchange:
    """One buffer of `half` elements per direction. Rank r's half for the peer sits in r's symmetric send buffer;
    the peer pulls it with a copy-engine copy. Signal pad slots (int32): 8 = "peer's data ready", 9 = "peer done
    reading mine" (barrier kernels use the first slots)."""

    def __init__(self, half):
        self.send = symm_mem.empty(half, dtype=torch.bfloat16, device=dev)
        self.h = symm_mem.rendezvous(self.send, dist.group.WORLD.group_name)
        self.recv = torch.empty(half, dtype=torch.bfloat16, device=dev)
        self.remote_send = self.h.get_buffer(peer, (half,), torch.bfloat16)
        self.my_pad = self.h.get_signal_pad(rank, (16,), torch.int32)
        self.peer_pad = self.h.get_signal_pad(peer, (16,), torch.int32)
        self.my_pad.zero_()
        torch.cuda.synchronize()
        dist.barrier()

    def memop(self, copy=True):
        mine, theirs = self.my_pad.data_ptr(), self.peer_pad.data_ptr()
        write(theirs + 32, 1)         # my send buffer is ready (prior writes on this stream flushed first)
        wait(mine + 32, 1)            # the peer's is
        write(mine + 32, 0)
        if copy:
            self.recv.copy_(self.remote_send)  # copy engine, pulls over NVLink
        write(theirs + 36, 1)         # done reading the peer's buffer
        wait(mine + 36, 1)            # the peer is done reading mine: it may be rewritten
        write(mine + 36, 0)

    def barrier(self):
        self.h.barrier(channel=0)
        self.recv.copy_(self.remote_send)
        self.h.barrier(channel=1)


def nccl_a2a(buf, out):
    dist.all_to_all_single(out, buf)


def timed(label, body, K=20, R=15):
    for _ in range(3):
        body()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(K):
            body()
    torch.cuda.synchronize()
    times = []
    for _ in range(R):
        dist.barrier()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / K)
    t = torch.tensor(statistics.median(times), device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    P(f"{label:48s} {t.item():8.1f} us/iter")
    return g


def beside(comm):
    def body():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            comm()
        gemm()
        torch.cuda.current_stream().wait_stream(side)
    return body


P("torch", torch.__version__, "nccl", torch.cuda.nccl.version(), torch.cuda.get_device_name())
timed("GEMM 2304x3072x12288", gemm)
for mb_label, half in (("q/k/v chunk", 2304 * 3 * 6 * 128), ("out chunk", 2304 * 6 * 128), ("q/k/v whole", 2304 * 3 * 12 * 128)):
    P(f"--- {mb_label}: {half * 2 / 1e6:.2f} MB each way")
    ex = Exchange(half)
    ex.send.fill_(rank + 1)
    full_in = torch.full((2 * half,), rank + 1, device=dev, dtype=torch.bfloat16)
    full_out = torch.empty_like(full_in)
    timed("NCCL all_to_all_single", lambda: nccl_a2a(full_in, full_out))
    timed("CE copy, memop signals", ex.memop)
    ok = bool((ex.recv == peer + 1).all())
    timed("memop signals only (no copy)", lambda: ex.memop(copy=False))
    timed("CE copy, barrier kernels", ex.barrier)
    timed("CE copy only (unsynchronized)", lambda: ex.recv.copy_(ex.remote_send))
    timed("GEMM || NCCL all_to_all_single", beside(lambda: nccl_a2a(full_in, full_out)))
    timed("GEMM || CE copy, memop signals", beside(ex.memop))
    timed("GEMM || CE copy, barrier kernels", beside(ex.barrier))
    ex.recv.zero_()
    ex.send.fill_(rank + 7)
    torch.cuda.synchronize(); dist.barrier()
    g = timed("(check) CE memop after refill", ex.memop, K=1, R=2)
    ok2 = bool((ex.recv == peer + 7).all())
    flags = ex.my_pad[8:10].tolist()
    P(f"data ok {ok} {ok2}, flags after {flags}")
dist.barrier()
dist.destroy_process_group()
