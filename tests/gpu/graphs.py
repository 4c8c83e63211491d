"""CUDA-graph capture for the GPU tests."""
import torch


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
