#!/usr/bin/env bash
# One device call: install jax-triton from the carried wheel, then the GPU checks and timings of the kernels and the
# decode step (each stage time-boxed so a failing stage does not eat the others' time). Logs land in $OUT.
# Usage (device tool, carry .whl .golden): bash scripts/gpu_session.sh [stage ...]
#   stages: fp8 moe mhc index mesh decode attn attnb prefill prefillvar kern profile ops golden tune moevar indexvar s8
#           prefillops bf16mul defaults fuse proj tiles streams moeasync
#           moeasyncstep attnws prefetch fp8rows indexpf survey defaults44 step44 mesh45 mesh45dp check45
#   (.golden: a copy of ../shared/golden/tiny, git-ignored)
#   DSV4_TRITON_LAUNCH=xla runs every stage's kernels through XLA's Triton route (dsv4_jax.kernels.launch_route)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PYTHONPATH PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
run() { local name=$1 t=$2; shift 2; echo "=== $name"; timeout "$t" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$?";
        tail -n "${TAIL:-12}" "$OUT/$name.log"; }
variant_table() { python3 -c "
import json, sys; r=json.load(open(sys.argv[1]))['bench']
for x in r: print(x.get('mesh', ''), 'batch', x['batch'], x['variant'][:40], f\"{x['median_step_s']*1e3:.3f} ms per call, \"
                  f\"{x['loop_step_s']*1e3:.3f} ms in a loop; floor {x['floor_s_per_device']*1e3:.3f} ms\")" "$1"; }
stages=("$@"); [ ${#stages[@]} -gt 0 ] || stages=(fp8 moe decode kern)
[ -d .golden ] && export DSV4_GOLDEN=$PWD/.golden  # carried copy of ../shared/golden/tiny
for s in "${stages[@]}"; do
  case $s in
    fp8) run fp8_tests "${FP8_BOX:-130}" python3 -m pytest -q -s -rf --tb=short -p no:cacheprovider \
           tests/test_kernels_fp8.py -k "gpu and (${FP8_K:-sweep})" ;;
    moe) run moe_tests "${MOE_BOX:-90}" python3 -m pytest -q -rf --tb=short -p no:cacheprovider \
           tests/test_kernels_fp4_moe.py tests/test_kernels_act_words.py -k "gpu and (${MOE_K:-2048} or act_words)" ;;
    mhc) run mhc_tests "${MHC_BOX:-90}" python3 -m pytest -q -s -rf --tb=short -p no:cacheprovider \
           tests/test_kernels_mhc.py tests/test_kernels_router.py tests/test_kernels_hadamard.py -k gpu ;;
    decode) TAIL=4 run decode "${DECODE_BOX:-250}" python3 scripts/bench_decode.py --model flash --layers 3 --batch 1,32 \
              --kernels "${DECODE_KERNELS:-reference,auto@jax-triton,auto@xla}" --iters 10 --out "$OUT/decode.json" \
              ${DECODE_EXTRA:-}
            python3 -c "
import json; r=json.load(open('$OUT/decode.json'))['bench']
for x in r:
  print(x['mesh'], 'batch', x['batch'], x['kernels'], 'triton' if x['triton'] else 'xla',
        f\"{x['median_step_s']*1e3:.3f} ms per call, {x['loop_step_s']*1e3:.3f} ms in a loop;\",
        f\"floor {x['floor_s_per_device']*1e3:.3f} ms @ {x['copy_bw_GBps']:.0f} GB/s\")
  if 'speculative' in x: print('  speculative', json.dumps(x['speculative']))" ;;
    index) run index_tests "${INDEX_BOX:-120}" python3 -m pytest -q -s -rf --tb=short -p no:cacheprovider \
             tests/test_kernels_indexer.py tests/test_kernels_indexer_query.py -k gpu ;;  # the opt-in indexer kernels
    mesh) run mesh_tests "${MESH_BOX:-90}" python3 -m pytest -q -s -rf --tb=short -p no:cacheprovider \
            tests/test_on_mesh.py tests/test_sharding.py -k "gpu or embedding" ;;  # needs the 2-GPU kind
    attn) run attn_tests "${ATTN_BOX:-200}" python3 -m pytest -q -s -rf --tb=short -p no:cacheprovider \
            tests/test_kernels_sparse_attn.py -k gpu ;;
    attnb) TAIL=20 run bench_attention "${ATTN_BENCH_BOX:-200}" python3 scripts/bench_attention.py --mode decode \
            --contexts "${ATTN_CONTEXTS:-4096,32768,131072,1048576}" --batch "${ATTN_BATCH:-1}" \
            --variants "${ATTN_VARIANTS:-}" ;;
    prefill) TAIL=8 run bench_prefill "${PREFILL_BOX:-240}" python3 scripts/bench_attention.py --mode prefill \
              --prefill-len "${PREFILL_LEN:-131072}" --chunk "${PREFILL_CHUNK:-8192}" --layers 2 \
              --kernels "${PREFILL_KERNELS:-auto}" --out "$OUT/prefill.json" ${PREFILL_EXTRA:-} ;;  # --prefill-merge
    indexvar) IFS=';' read -ra vs <<< "${INDEX_VARIANTS:-;num_warps=2;NB=24}"  # the indexer's scoring plans
              for v in "${vs[@]}"; do for bc in "32 131072,1048576" "1 1048576"; do set -- $bc
                DSV4_INDEX_TILE=$v TAIL=3 run "indexer_b$1_${v//[=,]/_}" "${INDEXVAR_BOX:-90}" python3 \
                  scripts/bench_attention.py --mode indexer --impls triton --batch "$1" --contexts "$2" \
                  --topk-blocks radix --calls 4 --trials 3
              done; done ;;
    prefillvar) for v in "default" "router-decode" "attn-reference"; do  # the prefill levers one at a time
                  env=(); extra=()
                  [ "$v" = router-decode ] && env=(DSV4_ROUTER_TILE=DOT=0,BE=2,BT=4,BK=512)  # router.plan's decode form
                  [ "$v" = attn-reference ] && extra=(--attn-prefill-reference)
                  TAIL=2 run "prefill_$v" "${PREFILLVAR_BOX:-150}" env "${env[@]}" python3 scripts/bench_attention.py \
                    --mode prefill --prefill-len "${PREFILL_LEN:-131072}" --chunk "${PREFILL_CHUNK:-8192}" --layers 2 \
                    --kernels auto --decode 2 "${extra[@]}"
                done ;;
    bf16mul) run router_tests 75 python3 -m pytest -q -rf --tb=short -p no:cacheprovider tests/test_kernels_router.py \
               -k gpu  # the 256- and 1K-token cases of the DOT=2 plan below 8K tokens
             run moe_bfmul_tests 150 python3 -m pytest -q -rf --tb=short -p no:cacheprovider \
               tests/test_kernels_fp4_moe.py -k "gpu and BFMUL"  # the WX kernels' bf16 decode vs the reference
             DSV4_INDEX_TILE=BF=1 run index_bf_tests 100 python3 -m pytest -q -rf --tb=short -p no:cacheprovider \
               tests/test_kernels_indexer.py tests/test_kernels_topk.py -k gpu  # the indexer's bf16 key decode
             TAIL=12 run moe_bfmul "${BF16MUL_BOX:-150}" python3 scripts/bench_moe.py --models flash --impls triton \
               --tokens 8192,65536 --variants "BFMUL=1"
             for v in "" "BF=1"; do DSV4_INDEX_TILE=$v TAIL=4 run "indexer_b32_${v:-plan}" 90 python3 \
               scripts/bench_attention.py --mode indexer --impls triton --batch 32 --contexts 131072,1048576 \
               --topk-blocks radix --calls 4 --trials 3; done ;;
    defaults) # the small decode kernels' plans made defaults (thirty-second session) against the earlier defaults
            OLD="dsv4_jax.kernels.mhc:MIN_K_STEPS=2 dsv4_jax.kernels.mhc:WIDE_FINISH_WARPS=8"
            OLD="$OLD dsv4_jax.kernels.router:WHOLE_ROW_MAX_TOKENS=0 dsv4_jax.kernels.router:SELECT_WARPS=0"
            OLD="$OLD dsv4_jax.kernels.sparse_attention:AUTO_MIN_LIST=4096 dsv4_jax.kernels.ring_write:AUTO=False"
            TAIL=2 run decode_defaults "${DEFAULTS_BOX:-300}" python3 scripts/bench_decode.py --model flash --layers 3 \
              --batch 1,32 --kernels auto --iters 20 --out "$OUT/defaults.json" --variants "default;$OLD;default"
            variant_table "$OUT/defaults.json"
            run small_tests "${SMALLT_BOX:-170}" python3 -m pytest -q -rf --tb=short -p no:cacheprovider \
              tests/test_kernels_mhc.py tests/test_kernels_router.py tests/test_kernels_compressor.py \
              tests/test_kernels_compressor_indexer.py tests/test_kernels_ring_write.py -k gpu ;;
    fuse) # thirty-third session: the sum + quantize, query, q/kv prep kernels and the merge's RoPE against them off
          OLD="dsv4_jax.kernels.act_quant:AUTO=False dsv4_jax.kernels.hadamard:QUERY_AUTO=False"
          OLD="$OLD dsv4_jax.kernels.attn_prep:AUTO=False dsv4_jax.kernels.sparse_attention:MERGE_ROPE=False"
          run fuse_tests "${FUSET_BOX:-170}" python3 -m pytest -q -rf --tb=short -p no:cacheprovider \
            tests/test_kernels_act_quant.py tests/test_kernels_attn_prep.py tests/test_kernels_indexer_query.py \
            tests/test_kernels_hadamard.py tests/test_kernels_sparse_attn.py -k gpu
          DSV4_KERNELS=auto run golden_fuse "${GOLDENF_BOX:-200}" python3 -m pytest -q -s -rf --tb=line \
            -p no:cacheprovider tests/test_golden.py -k "all_positions or layer_isolated"
          TAIL=2 run decode_fuse "${FUSE_BOX:-300}" python3 scripts/bench_decode.py --model flash --layers 3 \
            --batch 1,32 --kernels auto --iters 20 --out "$OUT/fuse.json" --variants "default;$OLD;default"
          variant_table "$OUT/fuse.json" ;;
    proj) # thirty-sixth session: the bf16 projections kernel (bf16_proj.AUTO) and the fused hc_post form, each opt-in
          P="dsv4_jax.kernels.bf16_proj:AUTO=True"; F="dsv4_jax.kernels.mhc:FUSE_POST=True"
          run proj_tests "${PROJT_BOX:-120}" python3 -m pytest -q -rf --tb=short -p no:cacheprovider \
            tests/test_kernels_bf16_proj.py tests/test_kernels_mhc.py -k "gpu_matches or gpu_post"
          DSV4_MHC_FUSE_POST=1 DSV4_KERNELS=auto run golden_proj "${GOLDENP_BOX:-200}" python3 scripts/bench_common.py \
            "$P" -m pytest -q -s -rf --tb=line -p no:cacheprovider tests/test_golden.py -k "all_positions or layer_isolated"
          TAIL=2 run decode_proj "${PROJ_BOX:-300}" python3 scripts/bench_decode.py --model flash --layers 3 \
            --batch 1,32 --kernels auto --iters 20 --out "$OUT/proj.json" \
            --variants "${PROJ_VARIANTS:-default;$P;$F;$P $F;default;$P $F}"
          variant_table "$OUT/proj.json" ;;
    tiles) # the decode GEMVs' tiles in the batch-1 step, each variant right after a default run (batch-1 plans only:
           # the MoE's below 32 pairs, the FP8 GEMV's at every decode row count), and the short attention lists on
           # XLA's launch route (the step in one CUDA graph)
           vs="${TILE_VARIANTS:-DSV4_MOE_TILE=BN=8,NG=32,num_warps=4;DSV4_MOE_TILE=BN=16,NG=16,num_warps=4}"
           vs="$vs;${FP8_TILE_VARIANTS:-DSV4_FP8_GEMV_TILE=BLOCK_N=8;DSV4_FP8_GEMV_TILE=NB=4;DSV4_FP8_GEMV_TILE=PER_SM=16}"
           vs="$vs;dsv4_jax.kernels.sparse_attention:XLA_ROUTE_MAX_LIST=1024"  # one CUDA graph per step (4K context)
           X="dsv4_jax.kernels.sparse_attention:XLA_ROUTE_MAX_LIST=1024"  # its checks first: the kernel as XLA builds it
           DSV4_TRITON_LAUNCH=xla run attn_xla_tests "${ATTNX_BOX:-120}" python3 -m pytest -q -rf --tb=short \
             -p no:cacheprovider tests/test_kernels_sparse_attn.py -k "gpu and not 1m"
           DSV4_KERNELS=auto run golden_attn_xla "${GOLDENX_BOX:-130}" python3 scripts/bench_common.py "$X" -m pytest \
             -q -rf --tb=line -p no:cacheprovider tests/test_golden.py -k "all_positions or layer_isolated"
           alt=""; IFS=';' read -ra vv <<< "$vs"; for v in "${vv[@]}"; do alt="$alt;default;$v"; done
           TAIL=2 run decode_tiles "${TILES_BOX:-280}" python3 scripts/bench_decode.py --model flash --layers 3 \
             --batch 1 --kernels auto --iters 20 --out "$OUT/tiles.json" --variants "${alt#;}"
           variant_table "$OUT/tiles.json" ;;
    streams) # independent branches on a second stream (dsv4_jax.kernels.streams): bit for bit first, then the step
             S="dsv4_jax.kernels.streams:BRANCHES"
             run streams_tests "${STREAMS_BOX:-120}" python3 -m pytest -q -s -rf --tb=short -p no:cacheprovider \
               tests/test_streams.py -k gpu
             TAIL=2 run decode_streams "${STREAMSD_BOX:-300}" python3 scripts/bench_decode.py --model flash --layers 3 \
               --batch "${STREAMS_BATCH:-1,32}" --kernels auto --iters 20 --out "$OUT/streams.json" --variants \
               "${STREAMS_VARIANTS:-default;$S='shared,indexer';default;$S='shared,indexer';$S='shared'}"
             variant_table "$OUT/streams.json" ;;
    prefillops) TAIL=30 run prefill_ops "${PREFILLOPS_BOX:-150}" python3 scripts/bench_prefill_ops.py \
                  --ops "${PREFILLOPS:-indexer,compressor,router}"  # the prefill ops beside their alternatives
                run router_tests 60 python3 -m pytest -q -rf --tb=short -p no:cacheprovider tests/test_kernels_router.py \
                  -k gpu  # both DOT forms at 8K tokens
                DSV4_ROUTER_TILE=DOT=2,BT=64,BE=64,BK=64 DSV4_KERNELS=auto run golden_router_bf16 120 python3 -m pytest \
                  -q -rf --tb=short -p no:cacheprovider tests/test_golden.py -k all_positions ;;  # DOT=2 forced
    s8) tiles=${S8_TILES:-";S8=1,BK=64,num_stages=3;S8=1,BK=64,num_stages=2;S8=1,BK=32,num_stages=4;S8=1,BK=128"}
        for c in "hca 32 1048576" "hca 32 131072" "csa 32 1048576" "hca 1 1048576"; do set -- $c  # padded scales
          TAIL=8 run "attn_s8_$1_b$2_$3" "${S8_BOX:-90}" python3 scripts/probe_kernels.py --op attn --kind "$1" \
            --batch "$2" --context "$3" --scale-stride 8 --copy --tiles "$tiles"
        done ;;
    kern) TAIL=30 run bench_kernels 100 python3 scripts/bench_kernels.py --models flash --rows 1,16,64,2048 --trials 3
          TAIL=30 run bench_moe 100 python3 scripts/bench_moe.py --models flash --tokens 1,16,64,2048 ;;
    profile) TAIL=${PROFILE_TAIL:-60} run profile "${PROFILE_BOX:-240}" python3 scripts/profile_decode.py --model flash \
              --layers 3 --batch "${PROFILE_BATCH:-1}" --kernels "${PROFILE_KERNELS:-reference,auto}" \
              --top "${PROFILE_TOP:-25}" --out "$OUT" ${PROFILE_EXTRA:-} ;;  # e.g. --host-top 20
    golden) for k in ${GOLDEN_KERNELS:-auto reference}; do  # failures are reported as they happen (-rf, -s)
              DSV4_KERNELS=$k run golden_$k "${GOLDEN_BOX:-280}" python3 -m pytest -q -s -rf --tb=line \
                -p no:cacheprovider tests/test_golden.py -k "${GOLDEN_K:-end_to_end or all_positions or layer_isolated}"
            done ;;
    tune) TAIL=70 run tune "${TUNE_BOX:-110}" python3 scripts/bench_kernels.py --tune --trials 5 \
            --tune-rows "${TUNE_ROWS:-1,4,16,2048}" ;;
    ops) TAIL=80 run profile_ops "${OPS_BOX:-200}" python3 scripts/profile_ops.py --moe-tokens "${OPS_MOE:-1,16}" \
           --moe-tiles "${OPS_TILES:-}" --fp8 "${OPS_FP8:-wq_b,wo_b,wq_a}" --rows 1 ;;  # device time per kernel
    moeasync) # forty-second session: the Gluon cp.async FP4 GEMV (GEMV=4) against the portable one, then its tests
              # (at most 330 s)
              t="${ASYNC_TILES:-;ASYNC=1;ASYNC=1,NS=4;ASYNC=1,NS=2;ASYNC=1,GT=2;ASYNC=1,GT=2,NS=4;ASYNC=1,num_warps=8;;ASYNC=1}"
              for b in ${ASYNC_BATCH:-1 4}; do TAIL=14 run "moe_async_b$b" "${ASYNCP_BOX:-90}" python3 \
                scripts/probe_kernels.py --op moe --batch "$b" --copy --tiles "$t"; done
              run moe_async_tests "${ASYNCT_BOX:-150}" python3 -m pytest -q -rf --tb=short -p no:cacheprovider \
                tests/test_kernels_fp4_moe_async.py ;;
    moeasyncstep) # then the 3-layer batch-1 step alternated with GEMV=4 and the golden criteria with it (<= 440 s)
              TAIL=2 run decode_async "${ASYNCD_BOX:-240}" python3 scripts/bench_decode.py --model flash --layers 3 \
                --batch 1 --kernels auto --iters 20 --out "$OUT/async.json" \
                --variants "default;DSV4_MOE_TILE=GEMV=4;default;DSV4_MOE_TILE=GEMV=4"
              variant_table "$OUT/async.json"
              DSV4_MOE_TILE=GEMV=4 DSV4_KERNELS=auto run golden_async "${GOLDENA_BOX:-200}" python3 -m pytest -q -s \
                -rf --tb=line -p no:cacheprovider tests/test_golden.py -k "all_positions or layer_isolated" ;;
    attnws) # forty-third session: the attention kernel's opt-in knobs (LACC, MX: the consumers' barriers 9 -> 4 a
            # block; IDREG: the decoders' ids in registers) against its defaults, then their GPU tests (<= 510 s)
            W8="DEC_WARPS=8,DEC_REGS=80,MAXNREG=128,ACC_N=128,EC=8"
            t=";WS=1;WS=1,LACC=1,MX=1;WS=1,IDREG=1;WS=1,LACC=1,MX=1,IDREG=1;WS=1,LACC=1;WS=1,MX=1;WS=1,$W8,IDREG=1"
            t="${WS_TILES:-$t;WS=1,PROBE=2;WS=1,PROBE=2,LACC=1,MX=1;WS=1,PROBE=1;WS=1,PROBE=1,IDREG=1;WS=1}"
            for c in ${WS_CASES:-hca,32,1048576 csa,32,131072 hca,8,1048576}; do IFS=, read -r k b n <<< "$c"
              TAIL=16 run "attn_ws_${k}_b${b}_$n" "${WSP_BOX:-90}" python3 scripts/probe_kernels.py --op attn \
                --kind "$k" --batch "$b" --context "$n" --copy --tiles "$t"; done
            run attn_ws_tests "${WST_BOX:-240}" python3 -m pytest -q -rf --tb=short -p no:cacheprovider \
              tests/test_kernels_sparse_attn_ws.py -k "gpu_matches and (lacc or mx or idreg)" ;;
    prefetch) # forty-third session: the decode GEMVs' opt-in L2 prefetches (PF; the FP8 GEMV's XL too) against the
              # same plans without them, their bit-identity tests, then the 3-layer batch-1 step with them (<= 595 s)
              for b in 1 4; do TAIL=8 run "moe_pf_b$b" "${PFP_BOX:-45}" python3 scripts/probe_kernels.py --op moe \
                --batch "$b" --copy --tiles "${PF_MOE_TILES:-;PF=1;PF=2;PF=4;PF=8;;PF=2}"; done
              t="${PF_FP8_TILES:-;pf=1;pf=2;xl=1;pf=2,xl=1;;xl=1}"
              for w in ${PF_WEIGHTS:-wo_b wq_b wo_a}; do TAIL=6 run "fp8_pf_$w" "${PFP_BOX:-45}" python3 \
                scripts/probe_kernels.py --op fp8 --batch 1 --weight "$w" --tiles "$t"; done
              run pf_tests "${PFT_BOX:-120}" python3 -m pytest -q -rf --tb=short -p no:cacheprovider \
                tests/test_kernels_fp8.py tests/test_kernels_fp4_moe.py -k prefetch
              B="DSV4_MOE_TILE=PF=2 DSV4_FP8_GEMV_TILE=PF=2"; X="DSV4_MOE_TILE=PF=2 DSV4_FP8_GEMV_TILE=PF=2,XL=1"
              TAIL=2 run decode_pf "${PFD_BOX:-250}" python3 scripts/bench_decode.py --model flash --layers 3 \
                --batch 1 --kernels auto --iters 20 --out "$OUT/pf.json" \
                --variants "${PF_VARIANTS:-default;$B;default;$B;DSV4_MOE_TILE=PF=2;DSV4_FP8_GEMV_TILE=XL=1;$X}"
              variant_table "$OUT/pf.json" ;;
    fp8rows) # forty-third session: the FP8 GEMV at 2-8 rows (batch 4, speculative verify rows) with XL, RA (one
             # accumulator per row: no barrier in the K loop) and PF, their GPU tests, then the 3-layer step's
             # speculative timing (verify of 4 rows) with RA + XL (<= 545 s; ROWS_SPEC= skips the last)
             t="${ROWS_FP8_TILES:-;xl=1;ra=1;xl=1,ra=1;xl=1,ra=1,pf=2;;xl=1,ra=1}"
             for c in ${ROWS_CASES:-wo_b,4 wo_b,8 wq_b,4 wo_a,4 w13,2}; do IFS=, read -r w b <<< "$c"
               TAIL=8 run "fp8_rows_${w}_b$b" "${ROWSP_BOX:-45}" python3 scripts/probe_kernels.py --op fp8 --batch "$b" \
                 --weight "$w" --tiles "$t"; done
             run fp8_rows_tests "${ROWST_BOX:-150}" python3 -m pytest -q -rf --tb=short -p no:cacheprovider \
               tests/test_kernels_fp8.py -k "ra_rows or prefetch_and_xl"
             R="DSV4_FP8_GEMV_TILE=RA=1,XL=1"  # the speculative verify step: 4 rows through every FP8 GEMV
             [ -n "${ROWS_SPEC-1}" ] && TAIL=4 run fp8_rows_spec "${ROWSS_BOX:-170}" python3 scripts/bench_decode.py \
               --model flash --layers 3 --batch 1 --kernels auto --iters 10 --speculative 3 --out "$OUT/rows.json" \
               --variants "default;$R;default;$R" ;;
    indexpf) # forty-third session: the indexer's decode scoring kernel with L2 prefetches (PF) at batch 32 and 1,
             # 128K and 1M tokens, then its bit-identity test (<= 540 s)
             # (batch 1 also with fewer blocks a program: 512 programs of 16 sequential blocks at 1M)
             for bcv in "32 131072,1048576 ${INDEXPF_B32:-;PF=1;PF=2;PF=4;}" \
                        "1 1048576 ${INDEXPF_B1:-;PF=2;PF=4;NB=4;NB=8;NB=4,PF=2;}"; do
               read -r b c v <<< "$bcv"; IFS=';' read -ra vs <<< "$v"
               for v in "${vs[@]}"; do DSV4_INDEX_TILE=$v TAIL=3 run "indexer_pf_b${b}_${v//[=,]/_}" \
                 "${INDEXPF_BOX:-45}" python3 scripts/bench_attention.py --mode indexer --impls triton --batch "$b" \
                 --contexts "$c" --topk-blocks radix --calls 4 --trials 3; done
             done
             run indexer_pf_tests 90 python3 -m pytest -q -rf --tb=short -p no:cacheprovider \
               tests/test_kernels_indexer.py -k "prefetch" ;;
    survey) # forty-fourth session: every untimed knob of sessions 41-43 at kernel level in one call (<= 455 s), for
            # when device time allows one call: PF on both GEMVs, XL/RA at 4 rows, LACC/MX/IDREG, the indexer's PF
            for b in 1 4; do TAIL=8 run "moe_pf_b$b" 45 python3 scripts/probe_kernels.py --op moe --batch "$b" --copy \
              --tiles ";PF=1;PF=2;PF=4;;PF=2"; done
            for w in wo_b wq_b; do TAIL=7 run "fp8_pf_$w" 45 python3 scripts/probe_kernels.py --op fp8 --batch 1 \
                --weight "$w" --tiles ";pf=2;xl=1;pf=2,xl=1;;xl=1"
              TAIL=5 run "fp8_rows_${w}_b4" 45 python3 scripts/probe_kernels.py --op fp8 --batch 4 --weight "$w" \
                --tiles ";xl=1,ra=1;xl=1,ra=1,pf=2;;xl=1,ra=1"; done
            t=";WS=1;WS=1,LACC=1,MX=1;WS=1,IDREG=1;WS=1,LACC=1,MX=1,IDREG=1"
            t="$t;WS=1,DEC_WARPS=8,DEC_REGS=80,MAXNREG=128,ACC_N=128,EC=8,IDREG=1;WS=1"
            for c in ${SURVEY_ATTN:-hca,32,1048576}; do IFS=, read -r k b n <<< "$c"
              TAIL=10 run "attn_ws_${k}_b${b}_$n" 90 python3 scripts/probe_kernels.py --op attn \
                --kind "$k" --batch "$b" --context "$n" --copy --tiles "$t"; done
            for v in "" "PF=2"; do DSV4_INDEX_TILE=$v TAIL=3 run "indexer_pf_b32_${v//[=,]/_}" 45 python3 \
              scripts/bench_attention.py --mode indexer --impls triton --batch 32 --contexts 1048576 \
              --topk-blocks radix --calls 4 --trials 3; done ;;
    defaults44) # forty-fourth session: the GPU tests of the defaults made then (the FP8 GEMV's RA + XL at 2-8 rows,
                # the attention's LACC, MX, IDREG), GPU cases only, to the end (<= 560 s); then `golden`, `decode`
                run fp8_ra_tests "${D44F_BOX:-200}" python3 -m pytest -q -rf --tb=short -p no:cacheprovider \
                  tests/test_kernels_fp8.py -k "gpu_ra_rows or gpu_prefetch_and_xl or (gpu_sweep and (r0001 or r0004))"
                run attn_default_tests "${D44A_BOX:-360}" python3 -m pytest -q -rf --tb=short -p no:cacheprovider \
                  tests/test_kernels_sparse_attn_ws.py -k "gpu_matches and (default or lacc or mx or idreg)" ;;
    step44) # the 3-layer step at batch 4 (FP8 GEMVs at 4 rows) and 32 (the Gluon attention) with the forty-fourth
            # session's defaults against the plans before them, alternated (<= 330 s)
            W=dsv4_jax.kernels.sparse_attention_ws; OLD="DSV4_FP8_GEMV_TILE=RA=0 $W:LACC=0 $W:MX=0 $W:IDREG=0"
            TAIL=2 run decode_44 "${STEP44_BOX:-330}" python3 scripts/bench_decode.py --model flash --layers 3 \
              --batch 4,32 --kernels auto --iters 10 --out "$OUT/step44.json" --variants "default;$OLD;default;$OLD"
            variant_table "$OUT/step44.json" ;;
    mesh45) # two GPUs (a 2-GPU kind): the per-device attention and MoE of the forty-fifth session, GPU-tested,
            # then the 3-layer step on one and two GPUs with them and without (XLA partitioning), alternated (<= 560 s)
            run mesh45_tests "${MESH45_BOX:-200}" python3 -m pytest -q -rf --tb=short -p no:cacheprovider \
              tests/test_mesh_kernels.py tests/test_on_mesh.py tests/test_moe_dispatch.py tests/test_kernels_sparse_attn.py \
              -k "(gpu and not merge_rope and (mesh or two_gpus or 2gpu or 8gpu)) or kernel_moe_equals" 
            OFF="dsv4_jax.modeling.attention:PER_DEVICE=False dsv4_jax.modeling.moe:PER_DEVICE=False"
            TAIL=2 run decode_45 "${STEP45_BOX:-360}" python3 scripts/bench_decode.py --model flash --layers 3 \
              --batch 1,32 --meshes 1x1,1x2 --kernels auto --iters 10 --out "$OUT/step45.json" \
              --variants "default;$OFF;default;$OFF"
            variant_table "$OUT/step45.json" ;;
    check45) # one GPU: the sparse attention at one device's heads (the per-device layers' head counts: 32, 16, 8),
            # then the golden criteria with "auto" after the forty-fifth session's attention/MoE refactor (<= 420 s)
            run attn_heads "${ATTNHEADS_BOX:-150}" python3 -m pytest -q -rf --tb=short -p no:cacheprovider \
              tests/test_kernels_sparse_attn.py -k "gpu_matches and (2gpu or 8gpu)"
            DSV4_KERNELS=auto run golden_auto "${GOLDEN_BOX:-270}" python3 -m pytest -q -s -rf --tb=line \
              -p no:cacheprovider tests/test_golden.py -k "layer_isolated or all_positions" ;;
    mesh45dp) # two GPUs: the 3-layer step at batch 32 with the rows over data (2x1), beside 1x2 and 1x1 (<= 240 s)
            TAIL=2 run decode_45dp "${STEP45DP_BOX:-240}" python3 scripts/bench_decode.py --model flash --layers 3 \
              --batch 32 --meshes 1x1,1x2,2x1 --kernels auto --iters 10 --out "$OUT/step45dp.json"
            variant_table "$OUT/step45dp.json" ;;
    moevar) TAIL=30 run "moe_variants${MOE_TAG:-}" "${MOEVAR_BOX:-120}" python3 scripts/bench_moe.py --models flash \
              --tokens "${MOE_T:-1,16}" \
              --impls triton --variants "${MOE_VARIANTS:-}" ;;
  esac
done
