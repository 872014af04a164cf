#!/usr/bin/env bash
# One stage of the GPU checks, sized for one 10-minute call on the device machine:
#
#   bash examples/benchmarks/device_session.sh tests      # CUDA tests (kernels, decode, Transformers)
#   bash examples/benchmarks/device_session.sh train      # training step: ours vs built-in flex vs sdpa
#   bash examples/benchmarks/device_session.sh generate   # generation: host-time breakdown, interleaved, e2e
#   bash examples/benchmarks/device_session.sh recipe     # recipes/packed_finetune.py: 1 GPU, FSDP2
#   bash examples/benchmarks/device_session.sh sweep      # kernel configs on the training shape
#   bash examples/benchmarks/device_session.sh bwd        # fused vs two-launch backward, 3 shapes
#   bash examples/benchmarks/device_session.sh profile    # GPU time of our training step by kernel
#   bash examples/benchmarks/device_session.sh suite_a    # every test of the kernel file on CUDA
#   bash examples/benchmarks/device_session.sh suite_b    # every decode/launch/Transformers test
#   bash examples/benchmarks/device_session.sh prompt     # prompt attention (TMA too), 40-round A/B
#   bash examples/benchmarks/device_session.sh bisect     # library fwd vs standalone, edit by edit
#   bash examples/benchmarks/device_session.sh insitu     # backward kernels alone vs between matmuls
#   bash examples/benchmarks/device_session.sh plans      # forward plans on/off: prompt host time
#
# Logs and results go to $OUT (the device tool brings that folder back), or ./device_out.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-device_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || {
    cat "$OUT/install.log"; exit 1; }
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton',
triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" \
    | tee "$OUT/versions.txt"

case "${1:-tests}" in
tests)
    timeout 330 python3 -m pytest -q -m cuda tests/test_triton_backend.py tests/test_decode.py \
        tests/test_block_mask.py 2>&1 | tee "$OUT/cuda_kernels.log" | tail -15
    HF_FLEXATTN_TEST_DEVICE=cuda HF_FLEXATTN_BACKEND=triton timeout 260 python3 -m pytest -q -x \
        --timeout 300 tests/test_transformers.py 2>&1 | tee "$OUT/cuda_transformers.log" | tail -25
    ;;
train)
    timeout 570 python3 -m hf_flexattn.bench_e2e --skip-generate \
        --impls flex,flex_attention,sdpa --time-budget 540 --out "$OUT/train" 2>&1 \
        | tee "$OUT/train.log" | tail -30
    ;;
generate)
    # where a decoding step's host time goes (mask, attention per layer), then whole calls
    # interleaved with per-step medians, then the bench_e2e rows (with the built-in flex)
    timeout 150 python3 examples/benchmarks/host_overhead_cpu.py --device cuda --prompt 2048 \
        --rounds 8 --json "$OUT/breakdown.json" --label cuda 2>&1 | tee "$OUT/breakdown.log" \
        | tail -4
    # pinned to one core: on the shared host that is what makes rounds comparable
    timeout 220 python3 examples/benchmarks/generate_interleaved.py 60 --pin 3 \
        --json "$OUT/interleaved.json" 2>&1 | tee "$OUT/interleaved.log" | tail -8
    OMP_NUM_THREADS=1 timeout 200 taskset -c 3 python3 -m hf_flexattn.bench_e2e --skip-train \
        --impls sdpa,flex,flex_attention --gen-repeats 15 --time-budget 190 \
        --out "$OUT/generate" 2>&1 | tee "$OUT/generate.log" | tail -20
    ;;
recipe)
    # the e2e benchmark's model (hidden 2048, 8 layers, 16/8 heads of 128), bf16 autocast,
    # rows of 16k tokens; flex with cu_seq_lens, then sdpa with position_ids for comparison
    M='{"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 8,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
        "vocab_size": 32000, "max_position_embeddings": 16384}'
    R=(recipes/packed_finetune.py --model-type llama --model-config "$M" --synthetic-docs 600
       --synthetic-min-len 64 --synthetic-max-len 4096 --max-tokens 16384 --max-steps 12
       --log-every 4)
    for run in "single_gpu flex" "fsdp2 flex" "single_gpu sdpa"; do
        read -r cfg impl <<<"$run"
        timeout 170 python3 -m accelerate.commands.launch --num_processes 1 \
            --config_file "recipes/configs/$cfg.yaml" "${R[@]}" --attn-implementation "$impl" \
            --log-file "$OUT/recipe_${cfg}_$impl.jsonl" 2>&1 \
            | tee "$OUT/recipe_${cfg}_$impl.log" | grep -v "examples/s" | tail -6
    done
    ;;
sweep)
    timeout 330 python3 examples/benchmarks/config_sweep.py --json "$OUT/sweep_16k.json" 2>&1 \
        | tee "$OUT/sweep_16k.log"
    timeout 240 python3 examples/benchmarks/config_sweep.py --heads 64/8/128 --tokens 8192 \
        --json "$OUT/sweep_8k.json" 2>&1 | tee "$OUT/sweep_8k.log"
    ;;
bwd)
    # (the kernel tests are suite_a's: on a fresh H200 the whole file ran past 260 s)
    C="--heads 32/32/128 --tokens 8192 --doc-min 8192 --doc-max 8192"
    for shape in "train --heads 16/8/128" "causal8k $C" "docs8k --heads 64/8/128 --tokens 8192"; do
        read -r name rest <<<"$shape"
        # shellcheck disable=SC2086
        timeout 120 python3 examples/benchmarks/config_sweep.py $rest --kinds fused \
            --json "$OUT/bwd_$name.json" 2>&1 | tee "$OUT/bwd_$name.log" | grep -v "^{"
    done
    timeout 150 python3 -m hf_flexattn.bench_e2e --skip-generate --impls flex --time-budget 120 \
        --out "$OUT/train_flex" 2>&1 | tee "$OUT/train_flex.log" | tail -8
    ;;
profile)
    timeout 120 python3 examples/benchmarks/profile_train_step.py --top 25 2>&1 \
        | tee "$OUT/profile_flex.log" | tail -32
    ;;
suite_a)
    # not only the cuda-marked tests: the interpreter-marked ones also run on the GPU here
    timeout 560 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_triton_backend.py \
        2>&1 | tee "$OUT/cuda_triton_backend_all.log" | tail -25
    ;;
suite_b)
    timeout 300 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_decode.py \
        tests/test_launch.py 2>&1 | tee "$OUT/cuda_decode_all.log" | tail -20
    HF_FLEXATTN_TEST_DEVICE=cuda HF_FLEXATTN_BACKEND=triton timeout 250 python3 -m pytest -q \
        -p no:cacheprovider --tb=short tests/test_transformers.py 2>&1 \
        | tee "$OUT/cuda_transformers.log" | tail -10
    ;;
prompt)
    # the prompt's attention at the default tiles, pointer and TMA loads; a long interleaved
    # generation run (paired per-round step medians); where a step's host time goes inside
    # generate (mask, first layer, later layers)
    timeout 150 python3 examples/benchmarks/prefill_profile.py --json "$OUT/prefill.json" 2>&1 \
        | tee "$OUT/prefill.log" | grep -v "^ \|^\[\|^\]\|^{\|^}" | tail -30
    timeout 220 python3 examples/benchmarks/generate_interleaved.py 40 --pin 3 \
        --json "$OUT/interleaved40.json" 2>&1 | tee "$OUT/interleaved40.log" | tail -10
    timeout 110 python3 examples/benchmarks/host_overhead_cpu.py --device cuda --prompt 2048 \
        --rounds 6 --json "$OUT/breakdown.json" --label cuda 2>&1 | tee "$OUT/breakdown.log" \
        | tail -4
    ;;
insitu)
    # session 11: inside the training step our backward kernel took 1.81 ms, torch's 1.72;
    # alone, our whole backward takes 1.65-1.68: time both kernels alone and between matmuls
    timeout 300 python3 examples/benchmarks/bwd_in_situ.py 2>&1 | grep -v Warn \
        | tee "$OUT/bwd_in_situ.txt" | tail -30
    ;;
plans)
    # session 12: a prompt's later layers run a stored forward plan; its A/B on the GPU
    # (host time to the first token, per layer), alternated, pinned to one core
    for a in "--prompt 128 --batch 1" "--prompt 128 --batch 1" "--prompt 2048 --batch 8"; do
        for o in "" "--no-fwd-plans"; do
            echo "== $a ${o:-(plans on)}" | tee -a "$OUT/fwd_plans_ab.txt"
            taskset -c 3 timeout 80 python3 examples/benchmarks/host_overhead_cpu.py \
                --device cuda --rounds 3 --new 16 $a $o 2>&1 | grep -v Warn \
                | tee -a "$OUT/fwd_plans_ab.txt" | tail -2
        done
    done
    ;;
bisect)
    # the library's forward against the standalone kernels, then its own rendered kernel
    # with edits toward G (fwd_loop_variants.EDITS), at three tile configs
    timeout 400 python3 examples/benchmarks/fwd_loop_variants.py --variants B,C,G --library \
        --bisect 2>&1 | grep -v Warn | tee "$OUT/fwd_bisect.txt"
    ;;
*)
    echo "unknown stage $1 (tests, train, generate, recipe, sweep, bwd, profile, suite_a,"\
        "suite_b, prompt, bisect, insitu, plans)"; exit 2
    ;;
esac
