#!/usr/bin/env bash
# The lead's GPU session in one script (device machines have torch/triton/pytest, no expecttest, no network).
#   bash benchmarks/gpu_suite.sh tests   # GPU test suite (cuda + multigpu markers), log to $OUT
#   bash benchmarks/gpu_suite.sh bench   # multi-GPU benchmarks: q all-gather (2 and N GPUs), DCP step, demo
#   bash benchmarks/gpu_suite.sh kernels # one GPU: 16-head kernel variants (ws8p2, ws8p2o: not yet run, ring),
#                                        # decode table (Gluon kernels in the op), split combine, cache gather table
#   bash benchmarks/gpu_suite.sh next    # one GPU: the experiments written in session 3 but not yet run
#   bash benchmarks/gpu_suite.sh profile # one GPU: 1:2 stream ceilings (dev_stream_mix.py), ncu of the kernels
#   bash benchmarks/gpu_suite.sh row8    # one GPU: ROW8 on/off on the six decode shapes + tests, gather maxnreg sweep
#   bash benchmarks/gpu_suite.sh lanes   # one GPU: LANES 1x32/8x4/q2x4, tests, decode table at the fastest setting
#   bash benchmarks/gpu_suite.sh s6      # one GPU: the seesaw kernel against its producer form, both lane layouts
#   bash benchmarks/gpu_suite.sh s6b     # one GPU: seesaw VARIANT "auto" tests, decode table
#   bash benchmarks/gpu_suite.sh prof6   # one GPU: ncu of the seesaw kernel and its producer form at B = 8 and 64
#   bash benchmarks/gpu_suite.sh prof6s  # the same, B = 8 only, stall / pipe / memory sections
#   bash benchmarks/gpu_suite.sh s9      # one GPU: decode table and cache gather table (for the card's record)
#   bash benchmarks/gpu_suite.sh s10     # one GPU: STAGED_O (output through shared memory) tests and A/B (spent)
#   bash benchmarks/gpu_suite.sh s11     # one GPU: STAGED_O on the producer form, persistent gather grids, decode and
#                                        # cache gather tables (spent, session 9)
#   bash benchmarks/gpu_suite.sh s12     # one GPU: GPU tests of session 9's output plan, its timing against the old one,
#                                        # decode and cache gather tables (spent, session 10)
#   bash benchmarks/gpu_suite.sh s13     # one GPU: tests and A/B of the output plan's STAGED_MIN_SPLITS, decode table,
#                                        # the gather's gap to a 1:2 cast taken apart (dev_stream_mix.py)
#   bash benchmarks/gpu_suite.sh s14     # one GPU: flat-vector gather kernels against the op (dev_flat_gather.py)
#   bash benchmarks/gpu_suite.sh s15     # one GPU: gather tiles with fewer bytes resident an SM (sweep + flat)
#   bash benchmarks/gpu_suite.sh s18     # one GPU: CONFIG with "p": the op's GPU tests, the gather table
#   bash benchmarks/gpu_suite.sh s19     # one GPU: PDL with other gather tiles (sweep)
#   bash benchmarks/gpu_suite.sh s21     # one GPU: decode_attention pass GPU tests incl. the flat-slot forms (spent)
#   bash benchmarks/gpu_suite.sh s25     # one GPU: Nsight Compute of the scorer kernel, B = 8 (spent)
#   bash benchmarks/gpu_suite.sh s27     # one GPU: "auto" = the scorer: tests, decode table, prefetch distances (spent)
#   bash benchmarks/gpu_suite.sh s28     # one GPU: the scorer's split launches: bf16 partials, prefetch 1, PDL combine
#                                        # (spent)
#   bash benchmarks/gpu_suite.sh s30     # one GPU: the scorer with the output plan (default now): tests, A/B, table
#   bash benchmarks/gpu_suite.sh s31     # one GPU: plan + early query (the defaults now): decode table, GPU tests
#   bash benchmarks/gpu_suite.sh s32     # one GPU: the op dispatch GPU tests with those defaults
#   bash benchmarks/gpu_suite.sh s33     # one GPU: gather flag "e" (early L2 prefetch before the PDL wait), SCORER_PDL
#   PDL=early bash benchmarks/gpu_suite.sh s35  # one GPU: the decode table with a SCORER_PDL setting, then the
#                                        # scorer's CTA timelines (dev_scorer_probe.py)
#   bash benchmarks/gpu_suite.sh s34     # one GPU: Nsight Compute of 1 x 128 x 64K with the scorer's defaults
#   bash benchmarks/gpu_suite.sh s39     # one GPU: SCORER_MERGE (the split merge in the scorer kernel, on): tests,
#                                        # its A/B against the combine, the decode table with the winner
#   bash benchmarks/gpu_suite.sh s40     # one GPU: the Gluon cp.async gather (config flag "a"): its GPU tests, a
#                                        # sweep of its launch shapes against the Triton default at 64K / 1M tokens
#   CFG=32,4,2,ap,3 bash benchmarks/gpu_suite.sh s40t  # the cache gather table with that config
#   bash benchmarks/gpu_suite.sh s42     # one GPU: the async gather's diagnostics (no stores / no reads; WRONG outputs)
#   bash benchmarks/gpu_suite.sh s43     # one GPU: s40 again (the consumer's whole-sector stores: 8 consumer warps,
#                                        # the x / y diagnostics), then the gather table with the best async config if
#                                        # it beats the default (next to run; s43q ran its first part)
#   bash benchmarks/gpu_suite.sh s50     # one GPU: rs as the 16-head default: its tests and the 16-head op / pass tests,
#                                        # the A/B against ws8p2, the decode table, issue 5's PDL gather tests
#   bash benchmarks/gpu_suite.sh s41     # one GPU, one call: s40, the merge GPU tests, then the gather table with the
#                                        # best async config if it beats the default, else s39's A/B and decode table
# (spent recipes are in git history: session 7's s7, session 8's s8 with the tile64 kernel since removed, session
# 11's s16 / s17 with the gather flags m / w since removed; session 12's s22-s24 / s26: the first scorer A/Bs, its
# timing knobs and first schedule, since removed; session 13's s29: the scorer options incl. the 8-warp producer,
# since removed; session 14's s36: marker timelines and the combine's shared-memory preference, since removed;
# session 15's s37 (the combine's one-step form, SCORER_PDL "trigger": both off, since removed) and s38 (SCORER_MERGE's
# first run); session 21's s49 / s49m (rs's first run: smoke test, A/B, tests, decode table, Nsight Compute))
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# Everything goes under $OUT/w and is packed into $OUT/all.tgz at the end (the device tool returns at most 8 files).
R=${OUT:-/tmp/out}; export OUT="$R/w"; mkdir -p "$OUT"
pack() { tar czf "$R/all.tgz" -C "$OUT" .; }  # also after each step of a long recipe: a run cut short keeps them
trap pack EXIT
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpus.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpus.txt"
case "${1:-tests}" in
  tests)
    timeout 500 python3 -m pytest -q -p no:cacheprovider -m "cuda or multigpu" tests/gpu 2>&1 \
      | tee "$OUT/gpu_tests.log" | grep -v PASSED | tail -60 ;;
  bench)
    n=$(nvidia-smi -L | wc -l)
    python3 benchmarks/bench_q_allgather.py --world-size 2 2>&1 | tee "$OUT/q_allgather_ws2.log"
    cp benchmarks/results/q_allgather.json "$OUT/q_allgather_ws2.json" 2>/dev/null
    if [ "$n" -ge 4 ]; then
      python3 benchmarks/bench_q_allgather.py --world-size 4 2>&1 | tee "$OUT/q_allgather_ws4.log"
      cp benchmarks/results/q_allgather.json "$OUT/q_allgather_ws4.json" 2>/dev/null
    fi
    timeout 300 python3 benchmarks/bench_dcp_step.py --world-size "$n" --contexts 32768,131072 --batches 1,8,64 \
      --out "$OUT/dcp_step.json" 2>&1 | tee "$OUT/dcp_step.log"
    timeout 120 python3 -m fx_mla demo 2>&1 | tee "$OUT/demo.log" ;;
  kernels)
    timeout 190 python3 benchmarks/dev_gluon16_decode.py --round2 --budget 180 2>&1 | tee "$OUT/gluon16_round2.log" \
      | grep -v "check" | tail -25
    timeout 60 python3 benchmarks/dev_combine.py 2>&1 | tee "$OUT/combine.log"
    timeout 120 python3 benchmarks/bench_decode.py --budget 110 --out "$OUT/decode.json" 2>&1 | tee "$OUT/decode.log" \
      | tail -12
    timeout 170 python3 benchmarks/bench_cache_gather.py --rep 50 --budget-s 95 2>&1 | tee "$OUT/cache_gather.log" \
      | tail -30 ;;
  next)  # session 3's unrun experiments, one GPU, ~8 minutes: ws8p2o, split overhead (combine PDL, bf16 partials),
          # gather PDL configs
    timeout 160 python3 benchmarks/dev_gluon16_decode.py --round2 --budget 150 > "$OUT/gluon16_round2.log" 2>&1
    grep -v "check" "$OUT/gluon16_round2.log" | tail -16
    timeout 100 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_mla_decode_gluon16_gpu.py \
      tests/gpu/test_mla_decode_dispatch_gpu.py -k "ws8p2o or opt_in" 2>&1 | tee "$OUT/next_tests.log" | tail -3
    timeout 60 python3 benchmarks/dev_split_overhead.py > "$OUT/split_overhead.log" 2>&1; cat "$OUT/split_overhead.log"
    timeout 90 python3 benchmarks/bench_decode.py --budget 85 --out "$OUT/decode.json" > "$OUT/decode.log" 2>&1
    tail -9 "$OUT/decode.log"
    timeout 100 python3 benchmarks/bench_cache_gather.py --sweep --sweep-configs "8,4,0;8,4,0,p;8,4,0,sp;8,4,0,s" \
      > "$OUT/gather_sweep.log" 2>&1; tail -12 "$OUT/gather_sweep.log" ;;
  profile)  # session 5: stream-mix ceilings for issue 5, then Nsight Compute on the issue-5/6 kernels
    timeout 150 python3 benchmarks/dev_stream_mix.py > "$OUT/stream_mix.log" 2>&1; tail -8 "$OUT/stream_mix.log"
    timeout 200 ncu --clock-control none --profile-from-start off --set full -o "$OUT/prof" \
      python3 benchmarks/dev_profile.py > "$OUT/ncu.log" 2>&1; tail -4 "$OUT/ncu.log"
    ncu -i "$OUT/prof.ncu-rep" --page details > "$OUT/details.txt" 2>&1; wc -l "$OUT/details.txt" ;;
  row8)  # session 5: conflict-free conversion stores on/off (all six decode shapes), their GPU tests, gather regs
    timeout 200 python3 benchmarks/dev_lane_rows.py > "$OUT/row8.log" 2>&1; cat "$OUT/row8.log"
    timeout 170 python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_mla_decode_seesaw_gpu.py \
      tests/gpu/test_mla_decode_dispatch_gpu.py tests/gpu/test_mla_decode_gluon16_gpu.py -k "not ws4 and not ws8p3 \
      and not ws8p2o and not ring" 2>&1 | tee "$OUT/row8_tests.log" | tail -3
    timeout 150 python3 benchmarks/bench_cache_gather.py --sweep --sweep-configs \
      "8,4,0;8,4,0,,40;8,4,0,,32;4,4,0;4,2,0;4,4,0,,32" > "$OUT/gather_sweep.log" 2>&1; tail -10 "$OUT/gather_sweep.log" ;;
  lanes)  # session 5: LANES 1x32 / 8x4 / q2x4 on the six decode shapes, GPU tests at the default (q2x4), table with
          # the fastest setting of each kernel (picked from this run's dev_lane_rows.json)
    timeout 200 python3 benchmarks/dev_lane_rows.py > "$OUT/lanes.log" 2>&1; cat "$OUT/lanes.log"
    timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_mla_decode_seesaw_gpu.py \
      tests/gpu/test_mla_decode_dispatch_gpu.py tests/gpu/test_mla_decode_gluon16_gpu.py -k "not ws4 and not ws8p3 \
      and not ws8p2o and not ring" 2>&1 | tee "$OUT/lanes_tests.log" | tail -3
    best=$(python3 -c "
import json; r = json.load(open('$OUT/dev_lane_rows.json'))['rows']
def pick(h): return min(('1x32', '8x4', 'q2x4'), key=lambda x: sum(row[f'lanes_{x}_us'] / row['lanes_1x32_us'] for row in r if row['heads'] == h))
print(f'{pick(128)},{pick(16)}')")
    echo "lanes (seesaw,gluon16): $best"
    timeout 130 python3 benchmarks/bench_decode.py --budget 120 --lanes "$best" --out "$OUT/decode.json" \
      > "$OUT/decode.log" 2>&1; tail -10 "$OUT/decode.log" ;;
  lanes1)  # the same, lighter: one timing a setting, GPU tests of the default; no decode table
    timeout 120 python3 benchmarks/dev_lane_rows.py --reps 1 > "$OUT/lanes.log" 2>&1; cat "$OUT/lanes.log"
    timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_mla_decode_seesaw_gpu.py \
      tests/gpu/test_mla_decode_dispatch_gpu.py tests/gpu/test_mla_decode_gluon16_gpu.py -k "not ws4 and not ws8p3 \
      and not ws8p2o and not ring" 2>&1 | tee "$OUT/lanes_tests.log" | tail -3 ;;
  s6)  # session 6: the producer form against the seesaw kernel, "8x4" lanes too (64 x 128 x 4096 preferred them)
    timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_mla_decode_seesaw_gpu.py -k producer \
      2>&1 | tee "$OUT/producer_tests.log" | tail -3
    v="VARIANT=seesaw+LANES=q2x4,VARIANT=seesaw+LANES=8x4"
    grep -q " passed" "$OUT/producer_tests.log" && ! grep -q "failed\|error" "$OUT/producer_tests.log" && \
      v="$v,VARIANT=producer+LANES=q2x4"  # (session 6 also timed a producer two tiles ahead here: dropped)
    timeout 200 python3 benchmarks/dev_lane_rows.py --modules seesaw --values "$v" \
      --shapes 8x128x16384,1x128x65536,16x128x32768,64x128x4096 > "$OUT/settings.log" 2>&1; tail -6 "$OUT/settings.log"
    ;;  # (session 6 also swept gather configs here, with flag c: since removed)
  s6b)  # session 6, after s6: VARIANT "auto" (producer form at one split) tests, then the decode table
    timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_mla_decode_seesaw_gpu.py \
      tests/gpu/test_mla_decode_dispatch_gpu.py -k "auto or dispatch" 2>&1 | tee "$OUT/auto_tests.log" | tail -3
    timeout 230 python3 benchmarks/bench_decode.py --budget 200 --out "$OUT/decode.json" > "$OUT/decode.log" 2>&1
    tail -10 "$OUT/decode.log" ;;
  prof6)  # Nsight Compute of the seesaw kernel and its producer form at 8 splits (B = 8) and one split (B = 64)
    timeout 220 ncu --clock-control none --profile-from-start off --set full -o "$OUT/prof6" \
      python3 benchmarks/dev_profile.py --which b8,b64 --seesaw-variants seesaw,producer > "$OUT/ncu.log" 2>&1
    tail -6 "$OUT/ncu.log"
    ncu -i "$OUT/prof6.ncu-rep" --page details > "$OUT/details6.txt" 2>&1; wc -l "$OUT/details6.txt" ;;
  prof6s)  # prof6, short: B = 8 only, the sections that say where the warps stall and how busy the pipes are
    timeout 150 ncu --clock-control none --profile-from-start off --section SpeedOfLight --section WarpStateStats \
      --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
      --section LaunchStats --section Occupancy -o "$OUT/prof6s" \
      python3 benchmarks/dev_profile.py --which b8 --seesaw-variants seesaw,producer > "$OUT/ncu.log" 2>&1
    tail -4 "$OUT/ncu.log"
    ncu -i "$OUT/prof6s.ncu-rep" --page details > "$OUT/details6s.txt" 2>&1; wc -l "$OUT/details6s.txt" ;;
  s9)  # session 8, after s8: the decode table (with its Inductor / eager baselines) and the cache gather table on
        # this card (issue 5 was measured on H100 only)
    timeout 250 python3 benchmarks/bench_decode.py --budget 220 --out "$OUT/decode.json" > "$OUT/decode.log" 2>&1
    tail -12 "$OUT/decode.log"
    timeout 220 python3 benchmarks/bench_cache_gather.py --rep 50 --budget-s 120 > "$OUT/cache_gather.log" 2>&1
    grep -v "check" "$OUT/cache_gather.log" | tail -25 ;;
  s10)  # session 8, after s8's Nsight Compute of empty launches (the L2 busiest, 16.8 MB of partials written from
         # the MMA layout): STAGED_O (the output through shared memory in whole rows) tests, then against "auto",
         # and with bf16 partials, on the four 128-head shapes; the combine's session-8 chunk rule
         # (COMBINE_MAX_VALUES 4096) against the one before (no cap)
    timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_mla_decode_seesaw_gpu.py -k staged 2>&1 \
      | tee "$OUT/staged_tests.log" | tail -3
    grep -q " passed" "$OUT/staged_tests.log" && ! grep -q "failed\|error" "$OUT/staged_tests.log" && \
      timeout 200 python3 benchmarks/dev_lane_rows.py --modules seesaw,launch --values \
        "VARIANT=auto,COMBINE_MAX_VALUES=1048576,STAGED_O=True,STAGED_O=True+PARTIAL_BF16=True" \
        --shapes 1x128x65536,8x128x16384,64x128x4096,16x128x32768 > "$OUT/s10_ab.log" 2>&1
    tail -6 "$OUT/s10_ab.log" ;;
  s11)  # one GPU (<= ~580 s): whether the staged output's loss on split launches is the seesaw form's (timed on the
         # producer form too, with fp32 and bf16 partials); persistent gather grids of ~10 programs an SM (the next
         # tile's index chain issued under this tile's loads); the decode table at the session-8 defaults; the gather
         # table on this card
    timeout 180 python3 benchmarks/dev_lane_rows.py --modules seesaw,launch --values \
        "VARIANT=auto,VARIANT=producer,VARIANT=producer+STAGED_O=True,VARIANT=producer+STAGED_O=True+PARTIAL_BF16=True" \
        --shapes 8x128x16384,1x128x65536,16x128x32768 > "$OUT/s11_ab.log" 2>&1
    tail -12 "$OUT/s11_ab.log"; pack
    timeout 100 python3 benchmarks/bench_cache_gather.py --sweep \
        --sweep-configs "8,4,0;8,4,10;4,4,10;8,4,8;8,4,12,,40" > "$OUT/gather_sweep.log" 2>&1
    tail -9 "$OUT/gather_sweep.log"; pack
    timeout 170 python3 benchmarks/bench_decode.py --budget 130 --out "$OUT/decode.json" > "$OUT/decode.log" 2>&1
    tail -14 "$OUT/decode.log"; pack
    timeout 130 python3 benchmarks/bench_cache_gather.py --rep 50 --budget-s 80 > "$OUT/cache_gather.log" 2>&1
    grep -v "check" "$OUT/cache_gather.log" | tail -25 ;;
  s12)  # next session, one GPU (~8 min): GPU tests of the seesaw kernel and the op's dispatch (session 9's output
         # plan: short splits of a bf16 output staged with bf16 partials); that plan against the previous one
         # (STAGED_O=False: MMA-layout stores and fp32 partials at split launches) on shapes of 4-16 pairs a split
    timeout 300 python3 -m pytest -q -p no:cacheprovider -m cuda tests/gpu/test_mla_decode_seesaw_gpu.py \
        tests/gpu/test_mla_decode_dispatch_gpu.py 2>&1 | tee "$OUT/s12_tests.log" | grep -v PASSED | tail -15; pack
    timeout 200 python3 benchmarks/dev_lane_rows.py --modules seesaw --values "STAGED_O=auto,STAGED_O=False" \
        --shapes 1x128x65536,2x128x32768,4x128x16384,1x128x16384 > "$OUT/s12_ab.log" 2>&1
    tail -6 "$OUT/s12_ab.log"; pack
    # then both tables at the new defaults (on an H200: the first record of the current kernels on that card)
    timeout 170 python3 benchmarks/bench_decode.py --budget 130 --out "$OUT/decode.json" > "$OUT/decode.log" 2>&1
    tail -14 "$OUT/decode.log"; pack
    timeout 130 python3 benchmarks/bench_cache_gather.py --rep 50 --budget-s 80 > "$OUT/cache_gather.log" 2>&1
    grep -v "check" "$OUT/cache_gather.log" | tail -25 ;;
  s13)  # session 10, after s12's A/B: GPU tests of the output plan with STAGED_MIN_SPLITS, the A/B of "auto" against
         # STAGED_O=False where the rule changed, the decode table with its ceilings measured at the start and the end
    timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests/gpu/test_mla_decode_seesaw_gpu.py \
        tests/gpu/test_mla_decode_dispatch_gpu.py -k "output_plan or opt_in_split or staged" 2>&1 \
        | tee "$OUT/s13_tests.log" | grep -v PASSED | tail -4; pack
    timeout 100 python3 benchmarks/dev_lane_rows.py --modules seesaw --values "STAGED_O=auto,STAGED_O=False" \
        --shapes 4x128x16384,2x128x8192,8x128x8192 > "$OUT/s13_ab.log" 2>&1
    tail -4 "$OUT/s13_ab.log"; pack
    timeout 170 python3 benchmarks/bench_decode.py --budget 120 --out "$OUT/decode.json" > "$OUT/decode.log" 2>&1
    tail -11 "$OUT/decode.log"; pack
    # issue 5: what the gather's gap to a plain 1:2 cast is made of (index chain length, scattered pages)
    timeout 150 python3 benchmarks/dev_stream_mix.py > "$OUT/stream_mix.log" 2>&1
    tail -6 "$OUT/stream_mix.log" ;;
  s14)  # session 11: the flat-vector gather kernels against the op (issue 5's 64K gap), both layouts and forms
    timeout 300 python3 benchmarks/dev_flat_gather.py > "$OUT/flat_gather.log" 2>&1
    tail -14 "$OUT/flat_gather.log" ;;
  s15)  # session 11, after s14: is the 64K gap the tail of long-lived programs (bytes resident an SM)? Smaller tiles
        # and more warps a tile (fewer bytes an SM), for the op's kernel and the flat one
    timeout 200 python3 benchmarks/bench_cache_gather.py --sweep \
        --sweep-configs "8,4,0;4,4,0;8,8,0;2,2,0;4,8,0;2,4,0;16,8,0;4,2,0" > "$OUT/sweep_s15.log" 2>&1
    cp benchmarks/results/cache_gather_sweep.json "$OUT/cache_gather_sweep_s15.json"; tail -12 "$OUT/sweep_s15.log"; pack
    timeout 200 python3 benchmarks/dev_flat_gather.py --sizes 65536 \
        --variants "16,256,4;16,128,4;16,256,8;8,256,4;8,512,8;16,64,2;16,128,2" \
        --ds-variants "16,512,8;16,256,8;16,128,4" > "$OUT/flat_gather_s15.log" 2>&1
    tail -6 "$OUT/flat_gather_s15.log" ;;
  s18)  # session 11, CONFIG (8, 4, 0, "p"): the op's GPU tests (CUDA-graph capture with PDL), the gather table
    timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests/gpu/test_gather_dequant_cache_gpu.py 2>&1 \
        | tee "$OUT/s18_tests.log" | tail -2; pack
    timeout 150 python3 benchmarks/bench_cache_gather.py --rep 50 --budget-s 80 > "$OUT/cache_gather.log" 2>&1
    cp benchmarks/results/cache_gather.json "$OUT/cache_gather.json"; tail -32 "$OUT/cache_gather.log" ;;
  s19)  # session 11, after s18: PDL with other tiles (the committed (8, 4, 0, "p") first and last: position effect)
    timeout 150 python3 benchmarks/bench_cache_gather.py --sweep \
        --sweep-configs "8,4,0,p;4,2,0,p;16,8,0,p;2,2,0,p;8,4,0,sp;4,4,0,p;16,4,0,p;8,4,0,p" > "$OUT/sweep_s19.log" 2>&1
    cp benchmarks/results/cache_gather_sweep.json "$OUT/cache_gather_sweep_s19.json"; grep -A10 "^config " "$OUT/sweep_s19.log" ;;
  s21)  # next session: GPU tests of session 11's flat-slot decode_attention matching (not yet run on a GPU)
    timeout 300 python3 -m pytest -q -p no:cacheprovider -m cuda tests/gpu/test_decode_attention_pass_gpu.py 2>&1 \
        | tee "$OUT/s21_tests.log" | grep -v PASSED | tail -6 ;;
  s25)  # session 12: Nsight Compute of the scorer kernel at B = 8 (full set; details and per-instruction stall samples)
    timeout 240 ncu --clock-control none --profile-from-start off --set full --import-source no -o "$OUT/prof_sc" \
      python3 benchmarks/dev_profile.py --which b8 --seesaw-variants scorer > "$OUT/ncu.log" 2>&1
    tail -3 "$OUT/ncu.log"
    ncu -i "$OUT/prof_sc.ncu-rep" --page details > "$OUT/details_sc.txt" 2>&1; wc -l "$OUT/details_sc.txt"
    ncu -i "$OUT/prof_sc.ncu-rep" --page source --csv --print-source sass > "$OUT/source_sc.csv" 2>&1
    wc -l "$OUT/source_sc.csv"; rm -f "$OUT/prof_sc.ncu-rep" ;;
  s27)  # session 12: "auto" = the scorer (late, prefetch 2): its GPU tests and the op's, the decode table, a prefetch sweep
    timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests/gpu/test_mla_decode_seesaw_gpu.py \
        -k "(auto or scorer) and not options" 2>&1 | tee "$OUT/s27_tests.log" | grep -v PASSED | tail -6
    timeout 120 python3 -m pytest -q -p no:cacheprovider -m cuda tests/gpu/test_mla_decode_dispatch_gpu.py \
        tests/gpu/test_mla_decode_fp8_gpu.py tests/gpu/test_decode_attention_pass_gpu.py 2>&1 \
        | tee "$OUT/s27_tests_op.log" | grep -v PASSED | tail -6
    timeout 170 python3 benchmarks/bench_decode.py --budget 130 --out "$OUT/decode.json" > "$OUT/decode.log" 2>&1
    tail -12 "$OUT/decode.log"
    timeout 90 python3 benchmarks/dev_lane_rows.py --modules seesaw --values \
        "SCORER_PREFETCH=1,SCORER_PREFETCH=2,SCORER_PREFETCH=3,SCORER_PREFETCH=4" \
        --shapes 1x128x65536,8x128x16384 2>&1 | tee "$OUT/s27_pf.log" | tail -4 ;;
  s28)  # session 12: the op's GPU tests with "auto" = the scorer (s27 cut them at 120 s), then the scorer's split
        # launches at B = 1 / 8: bf16 partials, prefetch 1, the combine as a PDL launch
    timeout 270 python3 -m pytest -q -p no:cacheprovider -m cuda tests/gpu/test_mla_decode_dispatch_gpu.py \
        tests/gpu/test_mla_decode_fp8_gpu.py 2>&1 | tee "$OUT/s28_tests_op.log" | grep -v PASSED | tail -6
    timeout 150 python3 benchmarks/dev_lane_rows.py --modules seesaw,launch --values \
        "PARTIAL_BF16=False,PARTIAL_BF16=True,SCORER_PREFETCH=1,SCORER_PREFETCH=1+PARTIAL_BF16=True,COMBINE_PDL=True" \
        --shapes 1x128x65536,8x128x16384,1x128x32768 2>&1 | tee "$OUT/s28_ab.log" | tail -5 ;;
  s30)  # session 13: SCORER_STAGED "plan" the default (s29: -4.7 % at 1 x 64K, -3 % at 64 x 4K): the seesaw GPU file,
        # an A/B against the old default and with the early query on top, then the decode table
    timeout 200 python3 -m pytest -q -p no:cacheprovider -m cuda tests/gpu/test_mla_decode_seesaw_gpu.py 2>&1 \
        | tee "$OUT/s30_tests.log" | grep -v PASSED | tail -6; pack
    timeout 150 python3 benchmarks/dev_lane_rows.py --modules seesaw --values \
        "SCORER_STAGED=plan,SCORER_STAGED=False,SCORER_EARLY_Q=True" \
        --shapes 1x128x65536,8x128x16384,16x128x32768,64x128x4096,2x128x8192 2>&1 | tee "$OUT/s30_ab.log" | tail -6
    pack
    timeout 200 python3 benchmarks/bench_decode.py --budget 130 --out "$OUT/decode.json" 2>&1 | tee "$OUT/decode.log" \
        | tail -12 ;;
  s31)  # session 13: SCORER_EARLY_Q on as well (s30: -1.6 to -5.5 % on three shapes, even on two): table, then tests
    timeout 150 python3 benchmarks/bench_decode.py --budget 120 --out "$OUT/decode.json" 2>&1 | tee "$OUT/decode.log" \
        | tail -10; pack
    timeout 270 python3 -m pytest -q -p no:cacheprovider -m cuda tests/gpu/test_mla_decode_seesaw_gpu.py \
        tests/gpu/test_decode_attention_pass_gpu.py tests/gpu/test_model_gpu.py -k "not options" 2>&1 \
        | tee "$OUT/s31_tests.log" | grep -v PASSED | tail -8; pack
    timeout 120 python3 -m pytest -q -p no:cacheprovider -m cuda tests/gpu/test_mla_decode_dispatch_gpu.py -k "128" \
        2>&1 | tee "$OUT/s31_dispatch.log" | grep -v PASSED | tail -8 ;;
  s33)  # session 13, written after its last run: the gather's flag "e" (early L2 prefetch before the PDL wait) and
        # SCORER_PDL (the scorer and its combine as PDL launches): GPU tests, then A/Bs, then tables with the winners
    timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests/gpu/test_gather_dequant_cache_gpu.py 2>&1 \
        | tee "$OUT/s33_gather_tests.log" | grep -v PASSED | tail -5; pack
    timeout 90 python3 -m pytest -q -p no:cacheprovider -m cuda tests/gpu/test_mla_decode_seesaw_gpu.py \
        -k pdl 2>&1 | tee "$OUT/s33_pdl_tests.log" | grep -v PASSED | tail -5; pack
    timeout 90 python3 benchmarks/bench_cache_gather.py --sweep --sweep-configs "8,4,0,p;8,4,0,pe;8,4,0,p;8,4,0,pe;4,4,0,pe;16,8,0,pe" \
        2>&1 | tee "$OUT/s33_sweep.log" | tail -10; cp benchmarks/results/cache_gather_sweep.json "$OUT/"; pack
    timeout 120 python3 benchmarks/dev_lane_rows.py --modules seesaw --values "SCORER_PDL=False,SCORER_PDL=True,SCORER_PDL=early" \
        --shapes 1x128x65536,8x128x16384,16x128x32768,64x128x4096 2>&1 | tee "$OUT/s33_pdl_ab.log" | tail -5; pack
    timeout 90 python3 benchmarks/bench_cache_gather.py --rep 50 --budget-s 45 --config 8,4,0,pe 2>&1 \
        | tee "$OUT/s33_table.log" | grep -i "pct_of_copy_at_64k\|64k\"" | tail -8; cp benchmarks/results/cache_gather.json "$OUT/" ;;
  s34)  # session 13: where B = 1's ~16 us of fixed cost goes, with the scorer's defaults (output plan, early query):
        # Nsight Compute of the split kernel and the combine (details page)
    timeout 240 ncu --clock-control none --profile-from-start off --set full --import-source no -o "$OUT/prof_b1" \
      python3 benchmarks/dev_profile.py --which b1 --seesaw-variants scorer > "$OUT/ncu.log" 2>&1
    tail -3 "$OUT/ncu.log"
    ncu -i "$OUT/prof_b1.ncu-rep" --page details > "$OUT/details_b1.txt" 2>&1; wc -l "$OUT/details_b1.txt"
    rm -f "$OUT/prof_b1.ncu-rep" ;;
  s35)  # session 14: the decode table with s33's SCORER_PDL winner (PDL=False / True / early in the environment)
    timeout 150 python3 benchmarks/bench_decode.py --budget 120 --scorer-pdl "${PDL:-}" --out "$OUT/decode.json" 2>&1 \
        | tee "$OUT/decode.log" | tail -10; pack
    timeout 120 python3 benchmarks/dev_scorer_probe.py --pdl "${PDL:-False}" 2>&1 | tee "$OUT/probe.log" | tail -45 ;;
  s39)  # session 15: SCORER_MERGE (on for >= 32 splits): its GPU tests, its A/B against the combine (the default
        # first), the decode table with the winner. Ran once with a one-step merge form since reverted; run it again
        # for the table with the merge form in the code (and the GPU test cases added after that run)
    timeout 200 python3 -m pytest -q -p no:cacheprovider -m cuda tests/gpu/test_mla_decode_seesaw_gpu.py -k merge \
        2>&1 | tee "$OUT/s39_tests.log" | grep -v PASSED | tail -15; pack
    F="--scorer-merge False"  # a failing test: the table without the in-kernel merge
    if grep -q "passed" "$OUT/s39_tests.log" && ! grep -q "failed\|rror" "$OUT/s39_tests.log"; then
      timeout 100 python3 benchmarks/dev_lane_rows.py --modules seesaw --values "SCORER_MERGE=True,SCORER_MERGE=False" \
          --shapes 1x128x65536,2x128x32768 2>&1 | tee "$OUT/s39_ab.log" | tail -3; pack
      F=$(python3 benchmarks/pick_setting.py "$OUT/dev_settings.json" --flags)
    fi
    echo "decode table flags: '$F'" | tee "$OUT/s39_pick.txt"
    timeout 150 python3 benchmarks/bench_decode.py --budget 110 $F --out "$OUT/decode.json" 2>&1 \
        | tee "$OUT/decode.log" | tail -10 ;;
  s40)
    G=tests/gpu/test_gather_dequant_cache_gpu.py
    timeout 220 python3 -m pytest -q -p no:cacheprovider -m cuda tests/gpu/test_gather_async_gpu.py \
        $G::test_out_of_range_indices_write_zeros_and_read_nothing_outside \
        $G::test_indices_written_by_the_previous_kernel_under_pdl 2>&1 | tee "$OUT/s40_tests.log" | grep -v PASSED \
        | tail -25; pack
    FX_MLA_DEV_DIAG=1 timeout 200 python3 benchmarks/bench_cache_gather.py --sweep --sweep-configs \
        "8,4,0,per;32,4,1,ape,6;32,4,1,ape,8,8;32,4,2,ape,4;16,4,3,ape,4;32,8,1,ape,6;32,4,1,apey,6;32,4,1,apex,6" \
        2>&1 | tee "$OUT/s40_sweep.log" | grep -v "^ *{\|^ *}\|^ *\"" | tail -16 ;;
  s40t)
    timeout 230 python3 benchmarks/bench_cache_gather.py --rep 50 --budget-s 120 --config "${CFG}" 2>&1 | tee "$OUT/cache_gather.log" | grep -v "check" | tail -28 ;;
  s41)  # session 16, one call: s40 (async gather tests, sweep), then the merge GPU tests of s39; then the gather table
        # with the best async config if it beats the Triton default at 64K tokens on both layouts, else s39's rest
    OUT="$R" bash "$0" s40
    timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests/gpu/test_mla_decode_seesaw_gpu.py -k merge \
        2>&1 | tee "$OUT/s39_tests.log" | grep -v PASSED | tail -15; pack
    best=$(python3 benchmarks/pick_gather_config.py "$OUT/cache_gather_sweep.json")
    echo "async config that beats the default at 64K: '$best'" | tee "$OUT/s41_pick.txt"
    if [ -n "$best" ]; then
      timeout 230 python3 benchmarks/bench_cache_gather.py --rep 50 --budget-s 110 --config "$best" 2>&1 \
          | tee "$OUT/cache_gather.log" | grep -v "check" | tail -28
    else
      timeout 100 python3 benchmarks/dev_lane_rows.py --modules seesaw --values "SCORER_MERGE=True,SCORER_MERGE=False" \
          --shapes 1x128x65536,2x128x32768 2>&1 | tee "$OUT/s39_ab.log" | tail -3; pack
      timeout 150 python3 benchmarks/bench_decode.py --budget 110 --out "$OUT/decode.json" 2>&1 \
          | tee "$OUT/decode.log" | tail -10
    fi ;;
  s45)  # session 17 (spent; the ring is in git history, 191c8b4): the merge's grid barrier on a ring of
        # self-resetting slots (no memset node a launch): merge GPU
        # tests, A/B against a zeroed pair a launch (MERGE_SLOTS=0, the old form); TABLE=1: then the decode table
    timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda tests/gpu/test_mla_decode_seesaw_gpu.py -k "merge" \
        2>&1 | tee "$OUT/s45_tests.log" | grep -v PASSED | tail -12; pack
    timeout 100 python3 benchmarks/dev_lane_rows.py --attr MERGE_SLOTS --modules seesaw --reps 3 \
        --values "MERGE_SLOTS=0,MERGE_SLOTS=4096" --shapes 1x128x65536,2x128x32768 2>&1 | tee "$OUT/s45_ab.log" | tail -3
    [ -n "${TABLE:-}" ] && timeout 200 python3 benchmarks/bench_decode.py --budget 120 --out "$OUT/decode.json" 2>&1 \
        | tee "$OUT/decode.log" | tail -12 ;;
  s46)  # session 17: the decode table alone (after s45's ring was measured slower and reverted)
    timeout 200 python3 benchmarks/bench_decode.py --budget 110 --out "$OUT/decode.json" 2>&1 \
        | tee "$OUT/decode.log" | tail -12 ;;
  s44)  # session 17: flag "r" (fp8_ds_mla latent loaded row-contiguous): GPU tests, a sweep with repeats, and the
        # table with "8,4,0,per" if it beats "pe" on ds_mla at 64K by 0.2 points (mean of the repeats)
    G=tests/gpu/test_gather_dequant_cache_gpu.py
    timeout 120 python3 -m pytest -q -p no:cacheprovider -m cuda "$G::test_launch_configs_bitwise" -k "per or vr or out_of_range" \
        $G::test_out_of_range_indices_write_zeros_and_read_nothing_outside 2>&1 | tee "$OUT/s44_tests.log" \
        | grep -v PASSED | tail -8; pack
    timeout 200 python3 benchmarks/bench_cache_gather.py --sweep --sweep-configs \
        "8,4,0,pe;8,4,0,per;16,4,0,per;4,4,0,per;8,4,0,pe;8,4,0,per;16,8,0,per" 2>&1 | tee "$OUT/s44_sweep.log" \
        | grep -v "^ *{\|^ *}\|^ *\"\|^ *[0-9]\|^ *\]" | tail -10; pack
    win=$(python3 -c "
import json, statistics as st
rows = json.load(open('$OUT/cache_gather_sweep.json'))['rows']
m = lambda f: st.mean(r['pct_of_copy'] for r in rows if r['config'] == [8, 4, 0, f] and r['layout'].startswith('fp8_ds')
                      and r['tokens'] == 65536)
print('yes' if m('per') >= m('pe') + 0.2 else 'no', round(m('pe'), 2), round(m('per'), 2))")
    echo "per beats pe on ds_mla at 64K: $win" | tee "$OUT/s44_pick.txt"
    case "$win" in yes*) timeout 230 python3 benchmarks/bench_cache_gather.py --rep 50 --budget-s 110 \
        --config 8,4,0,per 2>&1 | tee "$OUT/cache_gather.log" | grep -v "check" | tail -28 ;; esac ;;
  s43)  # session 17: s40 with the consumer's whole-sector stores (s43q: 85-90 %), then the gather table with
        # the best async config if it beats the Triton default at 64K tokens on both layouts
    OUT="$R" bash "$0" s40
    best=$(python3 benchmarks/pick_gather_config.py "$OUT/cache_gather_sweep.json")
    echo "async config that beats the default at 64K: '$best'" | tee "$OUT/s43_pick.txt"
    [ -n "$best" ] && timeout 230 python3 benchmarks/bench_cache_gather.py --rep 50 --budget-s 110 --config "$best" \
        2>&1 | tee "$OUT/cache_gather.log" | grep -v "check" | tail -28 ;;
  s43q)  # session 16's last minutes: the fixed consumer's sweep first, then its tests
    timeout 100 python3 benchmarks/bench_cache_gather.py --sweep --sweep-configs \
        "8,4,0,pe;32,4,1,ape,6;32,4,2,ape,4;16,4,3,ape,4" 2>&1 | tee "$OUT/s43q_sweep.log" \
        | grep -v "^ *{\|^ *}\|^ *\"\|^ *[0-9]\|^ *\]" | tail -8; pack
    timeout 120 python3 -m pytest -q -x -p no:cacheprovider -m cuda tests/gpu/test_gather_async_gpu.py 2>&1 \
        | tee "$OUT/s43q_tests.log" | grep -v PASSED | tail -12 ;;
  s42)  # session 16: where the async gather's time goes: no stores ("x") / no cache reads ("y"), 8 consumer warps
    FX_MLA_DEV_DIAG=1 timeout 170 python3 benchmarks/bench_cache_gather.py --sweep --sweep-configs \
        "8,4,0,pe;32,4,1,ape,6;32,8,1,ape,6;32,4,1,apex,6;32,4,1,apey,6;16,4,3,ape,4;16,4,3,apex,4;16,4,3,apey,4" \
        2>&1 | tee "$OUT/s42_sweep.log" | grep -v "^ *{\|^ *}\|^ *\"\|^ *[0-9]\|^ *\]" | tail -14 ;;
  s50)  # sessions 21/22: rs the 16-head default. The A/B of rs against its dim-major store and ws8p2 first (on an H200
    # the open question); then the balanced schedule (RS_BALANCED, never run yet): one smoke test, and only if it
    # passes its A/B against rs on the uniform shapes and on ragged batches (lengths uniform in [1, S]); the rs GPU
    # tests; the decode table with the first A/B's winner (pick_setting.py; the defaults if an rs test fails); the
    # dispatch / 16-head pass GPU tests and issue 5's unrun PDL gather tests (at most ~9.5 minutes; a call cut short
    # keeps the steps it finished)
    t() { local s=$1; shift; timeout "$s" python3 -m pytest -q -p no:cacheprovider -m cuda "$@" 2>&1; }
    ab() { local s=$1 name=$2; shift 2; timeout "$s" python3 benchmarks/dev_lane_rows.py --attr VARIANT \
        --modules gluon16 --reps 2 "$@" 2>&1 | tee "$OUT/$name.log" | tail -4
      cp "$OUT/dev_settings.json" "$OUT/$name.json" 2>/dev/null; pack; }
    ab 90 s50_ab --values VARIANT=rs,VARIANT=rs+RS_DIM_MAJOR_STORE=True,VARIANT=ws8p2 \
        --shapes 32x16x16384,128x16x8192
    t 45 "tests/gpu/test_mla_decode_gluon16_gpu.py::test_gluon16_rs_balanced_matches_float64[None-64]" \
      | tee "$OUT/s50_balanced_smoke.log" | tail -3; pack
    if grep -q " passed" "$OUT/s50_balanced_smoke.log" && ! grep -q "failed" "$OUT/s50_balanced_smoke.log"; then
      ab 50 s50_balanced --values VARIANT=rs,VARIANT=rs+RS_BALANCED=True --shapes 32x16x16384,128x16x8192
      ab 50 s50_ragged --ragged --values VARIANT=rs,VARIANT=rs+RS_BALANCED=True --shapes 32x16x16384,128x16x8192
    fi
    t 120 tests/gpu/test_mla_decode_gluon16_gpu.py -k rs | tee "$OUT/s50_tests.log" | grep -v PASSED | tail -30; pack
    flags=$(python3 benchmarks/pick_setting.py "$OUT/s50_ab.json" --flags 2>/dev/null)
    grep -q "failed" "$OUT/s50_tests.log" && flags=""  # a failing rs test: the table with the committed defaults
    echo "decode flags: ${flags:-none}" | tee "$OUT/s50_flags.txt"
    timeout 120 python3 benchmarks/bench_decode.py --budget 100 --out "$OUT/decode.json" $flags 2>&1 \
      | tee "$OUT/decode.log" | tail -10; pack
    t 50 tests/gpu/test_mla_decode_dispatch_gpu.py tests/gpu/test_decode_attention_pass_gpu.py -k "dispatch or 16-" \
      | tee "$OUT/s50_pass.log" | grep -v PASSED | tail -20; pack
    t 40 tests/gpu/test_gather_dequant_cache_gpu.py -k "pdl or indices_written" | tee "$OUT/s50_gather_pdl.log" \
      | grep -v PASSED | tail -12; pack ;;
  s32)
    timeout 400 python3 -m pytest -q -p no:cacheprovider -m cuda tests/gpu/test_mla_decode_dispatch_gpu.py 2>&1 \
        | tee "$OUT/s32_tests.log" | grep -v PASSED | tail -8 ;;
esac
