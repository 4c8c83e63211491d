"""Problem builder and float64 reference shared by the CPU, interpreter and GPU tests of mla_decode_fp8
(no expecttest here: the GPU machines lack it)."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import torch

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
NAN_BYTE = 0x7F  # a NaN in both e4m3fn and e5m2


@dataclasses.dataclass
class Problem:
    q: torch.Tensor
    q_scale: Optional[torch.Tensor]
    kv_cache: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    k_scale: torch.Tensor
    sm_scale: float
    kv_lora_rank: int

    def args(self, out_dtype=torch.bfloat16):
        return (self.q, self.kv_cache, self.block_table, self.seq_lens, self.k_scale, self.q_scale, self.sm_scale,
                self.kv_lora_rank, out_dtype)


def _fill_nan(x: torch.Tensor) -> None:
    if x.dtype in FP8:
        x.view(torch.uint8).fill_(NAN_BYTE)
    else:
        x.fill_(float("nan"))


def make_problem(lengths: Sequence[int], heads: int, block_size: int, cache_dtype: torch.dtype,
                 q_dtype: torch.dtype = torch.bfloat16, kv_lora_rank: int = 512, rope: int = 64, seed: int = 0,
                 device="cpu", extra_columns: int = 1, seq_dtype=torch.int32) -> Problem:
    """Random request lengths over a randomly paged cache. Slots past each length and a spare block named by
    the unused block-table columns hold NaN, so a read the length mask should skip shows up as NaN."""
    g = torch.Generator().manual_seed(seed)
    batch, d = len(lengths), kv_lora_rank + rope
    need = [-(-n // block_size) for n in lengths]
    max_blocks = max(1, max(need, default=0)) + extra_columns
    num_blocks = sum(need) + 1
    poison = num_blocks - 1
    order = torch.randperm(num_blocks - 1, generator=g)
    table = torch.full((batch, max_blocks), poison, dtype=torch.int32)
    nxt = 0
    for b, n in enumerate(need):
        table[b, :n] = order[nxt:nxt + n].int()
        nxt += n
    kv = torch.randn(num_blocks, block_size, d, generator=g)
    kv[..., :kv_lora_rank] += 0.5 * torch.randn(1, 1, kv_lora_rank, generator=g)  # a shared direction: less
    if cache_dtype in FP8:                                                         # cancellation in softmax @ V
        fmax = float(torch.finfo(cache_dtype).max)
        k_scale = (kv.abs().amax() / fmax).reshape(1).float()
        cache = (kv / k_scale).clamp(-fmax, fmax).to(cache_dtype)
    else:
        k_scale = torch.tensor([1.0])
        cache = kv.to(cache_dtype)
    _fill_nan(cache[poison])
    for b, n in enumerate(lengths):
        if n % block_size:
            _fill_nan(cache[int(table[b, n // block_size]), n % block_size:])
    q = torch.randn(batch, heads, d, generator=g)
    q_scale = None
    if q_dtype in FP8:
        fmax = float(torch.finfo(q_dtype).max)
        q_scale = (q.abs().amax() / fmax).reshape(1).float()
        q = (q / q_scale).clamp(-fmax, fmax).to(q_dtype)
        q_scale = q_scale.to(device)
    else:
        q = q.to(q_dtype)
    return Problem(q.to(device), q_scale, cache.to(device), table.to(device),
                   torch.tensor(list(lengths), dtype=seq_dtype, device=device), k_scale.to(device),
                   1.0 / math.sqrt(128 + 64), kv_lora_rank)


def reference_f64(p: Problem):
    """Attention in float64, one request at a time over its own pages only: (out [B, H, L], lse [B, H])."""
    q = p.q.double() * (p.q_scale.double() if p.q.dtype in FP8 else 1.0)
    batch, heads, d = q.shape
    block_size = p.kv_cache.shape[1]
    out = torch.zeros(batch, heads, p.kv_lora_rank, dtype=torch.float64, device=q.device)
    lse = torch.full((batch, heads), float("-inf"), dtype=torch.float64, device=q.device)
    for b, n in enumerate(p.seq_lens.tolist()):
        if n == 0:
            continue
        blocks = p.block_table[b, :-(-n // block_size)].long()
        kv = p.kv_cache[blocks].reshape(-1, d)[:n].double()
        if p.kv_cache.dtype in FP8:
            kv = kv * p.k_scale.double()
        s = q[b] @ kv.T * p.sm_scale
        lse[b] = torch.logsumexp(s, -1)
        out[b] = torch.softmax(s, -1) @ kv[:, :p.kv_lora_rank]
    return out, lse


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float((x.double() - ref).norm() / ref.norm().clamp_min(1e-300))


def check_close(out, lse, ref_out, ref_lse, out_tol=None, lse_tol=1e-3, what=""):
    """out within out_tol (relative, by dtype) of the float64 reference, lse within lse_tol absolute, the same
    -inf entries, no NaN anywhere."""
    out_tol = out_tol or {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 2e-3}[out.dtype]
    assert not torch.isnan(out).any(), f"{what}: NaN in out"
    assert not torch.isnan(lse).any(), f"{what}: NaN in lse"
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), f"{what}: -inf pattern of lse differs"
    empty = torch.isinf(ref_lse)
    assert (out[empty] == 0).all(), f"{what}: out of an empty sequence is not 0"
    finite = ~empty
    if finite.any():
        err = rel_err(out[finite], ref_out[finite])
        assert err <= out_tol, f"{what}: relative error of out {err:.3g} > {out_tol}"
        lse_err = float((lse[finite].double() - ref_lse[finite]).abs().max())
        assert lse_err <= lse_tol, f"{what}: lse error {lse_err:.3g} > {lse_tol}"
