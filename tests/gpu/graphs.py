"""CUDA-graph capture and a PDL writer kernel for the GPU tests."""
import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


def capture(step):
    """Run ``step()`` once on a side stream (kernels compiled, allocator warmed) and capture a second call in a CUDA
    graph: (graph, what the captured call returned)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = step()
    return graph, result


@triton.jit
def _pdl_copy_kernel(src_a, dst_a, n_a, src_b, dst_b, n_b, src_c, dst_c, n_c, WAIT: tl.constexpr,
                     BLOCK: tl.constexpr):
    if WAIT:
        gdc_wait()
    gdc_launch_dependents()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst_a + offs, tl.load(src_a + offs, mask=offs < n_a), mask=offs < n_a)
    tl.store(dst_b + offs, tl.load(src_b + offs, mask=offs < n_b), mask=offs < n_b)
    tl.store(dst_c + offs, tl.load(src_c + offs, mask=offs < n_c), mask=offs < n_c)


def pdl_writer(pairs, wait=False):
    """One kernel that copies each (src, dst) pair of contiguous int32 tensors (at most three), after letting the
    next kernel in the stream start at once (a PDL primary: a programmatic dependent launch after it may run while
    it writes). wait: it is itself a PDL launch that first waits for the kernel before it."""
    assert 1 <= len(pairs) <= 3 and all(s.dtype == d.dtype == torch.int32 and s.numel() == d.numel() for s, d in pairs)
    flat = [(s.view(-1), d.view(-1), d.numel()) for s, d in pairs]
    flat += [(flat[0][0], flat[0][1], 0)] * (3 - len(flat))  # unused slots copy nothing
    n = max(k for _, _, k in flat)
    _pdl_copy_kernel[(triton.cdiv(n, 1024),)](*[x for f in flat for x in f], WAIT=wait, BLOCK=1024,
                                              **({"launch_pdl": True} if wait else {}))
