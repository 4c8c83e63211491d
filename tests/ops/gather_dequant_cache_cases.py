"""Shared inputs and oracles for the gather_dequant_cache tests (CPU, interpreter, GPU) and its benchmark.

The literal plain-PyTorch chains here are the code the FX pass replaces, written as a model writes them;
the op's CPU reference is checked bitwise against them. Nothing here imports expecttest or pytest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
NAN_BYTE = {torch.float8_e4m3fn: 0x7F, torch.float8_e5m2: 0x7F}  # a NaN code of each format


def random_fp8_bytes(shape, fp8_dtype, gen, device="cpu"):
    """Every finite code of the format (zeros, subnormals, max) with equal odds; never NaN or Inf."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    finite = codes.view(fp8_dtype).float().isfinite()
    codes = codes[finite]
    idx = torch.randint(0, codes.numel(), shape, generator=gen)
    return codes[idx].to(device)


def random_cache(num_blocks, block_size, d, cache_dtype, gen, layout="plain", device="cpu"):
    """A cache of fresh random entries: fp8 codes, normal floats, or 656-byte fp8_ds_mla rows."""
    if layout == "fp8_ds_mla":
        rows = torch.empty(num_blocks, block_size, 656, dtype=torch.uint8)
        rows[..., :512] = random_fp8_bytes((num_blocks, block_size, 512), torch.float8_e4m3fn, gen)
        scales = torch.exp(torch.empty(num_blocks, block_size, 4).uniform_(-9.0, 1.0, generator=gen))
        rows[..., 512:528] = scales.view(torch.uint8)
        rope = torch.randn(num_blocks, block_size, 64, generator=gen).to(torch.bfloat16)
        rows[..., 528:] = rope.view(torch.uint8)
        return rows.to(device)
    if cache_dtype in FP8:
        return random_fp8_bytes((num_blocks, block_size, d), cache_dtype, gen).view(cache_dtype).to(device)
    return (torch.randn(num_blocks, block_size, d, generator=gen) * 3).to(cache_dtype).to(device)


def random_scale(gen, shape=(), device="cpu"):
    """A per-tensor scale that is no power of two, so products really round."""
    return (torch.rand(shape, generator=gen) * 0.05 + 0.0113).to(torch.float32).to(device)


@dataclass
class TokenProblem:
    block_table: torch.Tensor      # [B, max_blocks] int32
    cu_seq_lens: torch.Tensor      # [B + 1] int32
    token_to_seq: torch.Tensor     # [n] int32, -1 for padding
    seq_starts: Optional[torch.Tensor]
    num_blocks: int

    def to(self, device):
        mv = (lambda x: None if x is None else x.to(device))
        return TokenProblem(mv(self.block_table), mv(self.cu_seq_lens), mv(self.token_to_seq),
                            mv(self.seq_starts), self.num_blocks)


def token_problem(lengths: Sequence[int], block_size: int, gen, starts: Optional[Sequence[int]] = None,
                  padding: int = 0, extra_cols: int = 1, spare_blocks: int = 3) -> TokenProblem:
    """Ragged requests (chunk [starts[b], starts[b] + lengths[b]) of each), scattered distinct pages,
    extra block-table columns holding valid but unused ids, and `padding` DCP padding tokens at the end."""
    batch = len(lengths)
    st = list(starts) if starts is not None else [0] * batch
    pages = [math.ceil((s + n) / block_size) for s, n in zip(st, lengths)]
    max_blocks = max(pages + [1]) + extra_cols
    num_blocks = sum(pages) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    bt = torch.randint(0, num_blocks, (batch, max_blocks), generator=gen)
    used = 0
    for b, p in enumerate(pages):
        bt[b, :p] = perm[used:used + p]
        used += p
    cu = torch.zeros(batch + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(torch.tensor(list(lengths), dtype=torch.int64), 0)
    tts = torch.repeat_interleave(torch.arange(batch), torch.tensor(list(lengths), dtype=torch.int64))
    tts = torch.cat([tts, torch.full((padding,), -1, dtype=torch.int64)])
    return TokenProblem(bt.to(torch.int32), cu.to(torch.int32), tts.to(torch.int32),
                        torch.tensor(st, dtype=torch.int32) if starts is not None else None, num_blocks)


def ragged_lengths(total: int, batch: int, gen, empty: int = 1) -> list:
    """`batch` lengths summing to `total`, `empty` of them zero, the others uneven."""
    w = torch.rand(batch, generator=gen) + 0.2
    w[torch.randperm(batch, generator=gen)[:empty]] = 0
    raw = (w / w.sum() * total).floor().long()
    raw[int(torch.argmax(w))] += total - int(raw.sum())
    return raw.tolist()


@dataclass
class PoisonedCase:
    """Out-of-range indices over a cache inside a poisoned buffer (GPU tests): a read outside the cache or a
    block-table row puts NaN codes (plain fp8) or huge finite values (fp8_ds_mla rows of 0x7F bytes: scales of
    ~3.4e38) in the output, caught by a bitwise comparison with the reference. Token 139 is assigned to request 3 while
    it lies just before that request's start: offset -1 (floor division; the block-table column wraps once into the
    row).
    cache / block_table are views into the poisoned buffers."""
    big: torch.Tensor              # uint8 [num_blocks + 2, bs, row bytes]: first and last blocks NaN codes
    wide: torch.Tensor             # int32 [B, max_blocks + 2]: the extra columns name a NaN block
    problem: TokenProblem
    token_to_seq: torch.Tensor     # token 7 names request B (out of range), token 139 request 3 (offset -1)
    seq_starts: torch.Tensor       # request 2 runs past its block-table row
    scale: Optional[torch.Tensor]

    def cache(self, layout, big=None):
        rows = (self.big if big is None else big)[1:-1]
        return rows.view(torch.float8_e4m3fn) if layout == "plain" else rows


def poisoned_case(seed, layout="plain") -> PoisonedCase:
    g = torch.Generator().manual_seed(seed)
    p = token_problem([50, 0, 90, 33], 16, g, starts=[3, 0, 20, 0], padding=5)
    n, row = p.num_blocks, 576 if layout == "plain" else 656
    big = torch.full((n + 2, 16, row), NAN_BYTE[torch.float8_e4m3fn], dtype=torch.uint8)
    big[1:-1] = random_cache(n, 16, 576, torch.float8_e4m3fn, g, layout).view(torch.uint8)
    poison = n - 1
    big[1 + poison] = NAN_BYTE[torch.float8_e4m3fn]
    bt = p.block_table.clone()
    bt[bt == poison] = 0
    bt[2, 0], bt[0, 1], bt[3, 0] = n, -n - 1, -2       # past the cache, wraps still out, wraps in range
    wide = torch.full((bt.shape[0], bt.shape[1] + 2), poison, dtype=torch.int32)
    wide[:, 1:-1] = bt
    tts = p.token_to_seq.clone()
    tts[7] = 4                                            # request id == batch
    tts[139] = 3                                          # request 3 starts at 140: offset -1, its column wraps
    ss = p.seq_starts.clone()
    ss[2] = 16 * (bt.shape[1] - 3)                        # request 2 runs past its row
    return PoisonedCase(big, wide, p, tts, ss, random_scale(g) if layout == "plain" else None)


# ---------------------------------------------------------------- the literal plain chains

def plain_paged(cache, block_table, k_scale, out_dtype):
    x = cache[block_table]
    x = x.view(block_table.shape[0], -1, cache.shape[-1])
    if cache.dtype in FP8 and k_scale is not None:
        return x.to(out_dtype) * k_scale
    return x.to(out_dtype)


def plain_token_rows(cache, block_table, cu_seq_lens, token_to_seq, seq_starts):
    bs = cache.shape[1]
    n = token_to_seq.shape[0]
    tts = token_to_seq.long()
    valid = tts >= 0
    b = tts.clamp_min(0)
    t = torch.arange(n, device=cache.device)
    starts = seq_starts.long()[b] if seq_starts is not None else 0
    off = torch.where(valid, t - cu_seq_lens.long()[b] + starts, 0)
    blk = block_table.long()[b, off // bs]
    return cache[blk, off % bs]


def plain_token(cache, block_table, cu_seq_lens, token_to_seq, seq_starts, k_scale, out_dtype):
    x = plain_token_rows(cache, block_table, cu_seq_lens, token_to_seq, seq_starts)
    if cache.dtype in FP8 and k_scale is not None:
        return x.to(out_dtype) * k_scale
    return x.to(out_dtype)


def plain_ds_mla_dequant(rows, out_dtype):
    """656-byte rows [..., 656] -> [..., 576]: group k of the latent times scale k, rope cast."""
    lat = rows[..., :512].view(torch.float8_e4m3fn)
    scales = rows[..., 512:528].contiguous().view(torch.float32)
    parts = [(lat[..., 128 * k:128 * (k + 1)].to(torch.float32) * scales[..., k:k + 1]).to(out_dtype)
             for k in range(4)]
    rope = rows[..., 528:].contiguous().view(torch.bfloat16).to(out_dtype)
    return torch.cat(parts + [rope], dim=-1)


def float64_ds_mla(rows):
    lat = rows[..., :512].view(torch.float8_e4m3fn).double()
    scales = rows[..., 512:528].contiguous().view(torch.float32).double()
    lat = (lat.unflatten(-1, (4, 128)) * scales.unsqueeze(-1)).flatten(-2)
    return torch.cat([lat, rows[..., 528:].contiguous().view(torch.bfloat16).double()], dim=-1)


# ---------------------------------------------------------------- comparisons

def bits(x):
    return x.view({2: torch.int16, 4: torch.int32}[x.element_size()])


def assert_bitwise(out, ref, what=""):
    """Same bits everywhere, except that NaN only needs to be NaN where ref is NaN."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (what, out.shape, ref.shape, out.dtype, ref.dtype)
    nan = ref.isnan()
    assert bool((out.isnan() == nan).all()), f"{what}: NaN positions differ"
    same = (bits(out) == bits(ref)) | nan
    if not bool(same.all()):
        i = (~same).nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int((~same).sum())} elements differ, first at {i}: "
                             f"{out[tuple(i)].item()} vs {ref[tuple(i)].item()}")


def rel_err(out, ref64):
    return float((out.double() - ref64).norm() / ref64.norm().clamp_min(1e-300))


def device_random_cache(num_blocks, layout, device, gen, block_size=64, d=576):
    """Benchmark-size cache generated on `device` (gen: a generator there): every finite e4m3 code with
    about equal odds (NaN codes moved to their neighbour); fp8_ds_mla group scales and rope random."""
    if layout == "fp8_ds_mla":
        rows = torch.randint(0, 256, (num_blocks, block_size, 656), dtype=torch.uint8, device=device, generator=gen)
        lat = rows[..., :512]
        lat[(lat & 0x7F) == 0x7F] = 0x7E
        sc = torch.exp(torch.rand(num_blocks, block_size, 4, device=device, generator=gen) * 8 - 7)
        rows[..., 512:528] = sc.view(torch.uint8)
        rope = torch.randn(num_blocks, block_size, 64, device=device, generator=gen).to(torch.bfloat16)
        rows[..., 528:] = rope.view(torch.uint8)
        return rows
    b = torch.randint(0, 256, (num_blocks, block_size, d), dtype=torch.uint8, device=device, generator=gen)
    b[(b & 0x7F) == 0x7F] = 0x7E
    return b.view(torch.float8_e4m3fn)


def bench_token_problem(n, device, gen, block_size=64):
    """About n / 2048 ragged requests summing to n tokens, random seq_starts, distinct scattered pages:
    (num_blocks, block_table, cu_seq_lens, token_to_seq, seq_starts), int32 on `device` (gen: a CPU one)."""
    batch = max(1, n // 2048)
    w = torch.rand(batch, generator=gen) + 0.5
    lengths = (w / w.sum() * n).floor().long()
    lengths[0] += n - int(lengths.sum())
    starts = torch.randint(0, 4 * block_size, (batch,), generator=gen)
    pages = (starts + lengths + block_size - 1) // block_size
    num_blocks = int(pages.sum()) + 16
    perm = torch.randperm(num_blocks, generator=gen)
    bt = torch.zeros(batch, int(pages.max()), dtype=torch.int64)
    used = 0
    for b in range(batch):
        p = int(pages[b])
        bt[b, :p] = perm[used:used + p]
        used += p
    cu = torch.zeros(batch + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(lengths, 0)
    tts = torch.repeat_interleave(torch.arange(batch), lengths)
    i32 = (lambda x: x.to(torch.int32).to(device))
    return num_blocks, i32(bt), i32(cu), i32(tts), i32(starts)
