#!/usr/bin/env bash
# The CPU-machine half of the prepared GPU run: download, into the git-ignored .whl/, the wheels
# the project pins that the GPU machine (Python 3.12, its own torch and a newer transformers, no
# package index) lacks or holds in another version. Nothing binary is committed; the folder
# travels with the run (at most 64 MiB; these are about 20 MiB) and benchmarks/gpu_check.sh
# installs it into /tmp/site, ahead of the machine's own packages.
#
#   bash benchmarks/gpu_prepare.sh            # then: bash benchmarks/gpu_check.sh on the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
# versions: the ones this checkout's environment resolved (pyproject.toml's pins and ranges)
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
WANT=(transformers huggingface_hub tokenizers peft optuna alembic sqlalchemy mako colorlog gguf)
SPECS=()
for name in "${WANT[@]}"; do SPECS+=("$name==$(version "$name")"); done
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
  -d .whl "${SPECS[@]}"
du -sh .whl
ls .whl
# the text the large-model run calibrates, recovers and evaluates on (books, WikiText-2: ~8 MiB) and
# the 32000-token tokenizer of its random-weight LLaMA-7B (benchmarks/large_model.py builds it)
DATA=${SAAP_EDGE_DATA_DIR:-../shared/data}
mkdir -p .whl/data/text
cp -r "$DATA/text/books" "$DATA/text/wikitext2" .whl/data/text/
TOK=benchmarks/work/large_model/tokenizer-32000
[ -d "$TOK" ] || "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); import large_model, pathlib; large_model.build_tokenizer(pathlib.Path('$TOK'), pathlib.Path('$DATA'))"
cp -r "$TOK" .whl/data/
du -sh .whl
