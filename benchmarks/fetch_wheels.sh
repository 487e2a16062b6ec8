#!/usr/bin/env bash
# Wheels for a machine that has torch, lightning, transformers, peft, pyarrow, pandas and tensorboard but not
# personalm's other needs (the lent GPU machines: Python 3.12, no network). Run here, where pip reaches PyPI:
#   bash benchmarks/fetch_wheels.sh            # -> .whl/ (ignored by git through .git/info/exclude)
# (torchdata: the training loader saves its position in checkpoints)
# There, before anything else:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 jsonargparse==4.53.0 docstring-parser==0.18.0 \
  typeshed-client==2.15.0 trl==1.16.0 torchdata==0.11.0
ls .whl
du -sh .whl
