#!/usr/bin/env bash
# Install this repository's distributions on the GPU machine (torch, transformers and peft are
# there already; no package index). Source with `. benchmarks/gpu_setup.sh [SRC]` from the
# repository root; SRC (default: .) is the tree to install, e.g. an extracted `git archive HEAD`.
#
# Wheels the machine lacks (pydantic, tomli-w, gguf) are downloaded here, once, into .whl/:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl pydantic==2.13.4 pydantic-core==2.46.4 annotated-types \
#     typing-inspection tomli-w typing-extensions gguf==0.19.0
# and carried with the call (`carry: [".whl"]`).
src=${1:-.}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
(cd "$src" && python -m pip install -q --no-deps --no-build-isolation \
  $(for d in core plugins/*/ export; do [ -f "$d/pyproject.toml" ] && echo -n "-e ./$d "; done))
python -c "import modapt, torch; print('modapt', modapt.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
