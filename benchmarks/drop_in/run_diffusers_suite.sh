#!/bin/bash
# diffusers' own UNet / SD / SDXL / LoRA test files, stock and with semfid installed everywhere
# (semfid.testing.install_everywhere), offline, with the same local hub stand-ins for both runs.
#
#   DIFFUSERS_SRC=/path/to/diffusers-checkout PYTHON=/path/to/venv/bin/python WORK=/tmp/dropin \
#       bash benchmarks/drop_in/run_diffusers_suite.sh
#
# PYTHON's environment must have the checkout installed (pip install -e, plus its test deps:
# parameterized, pytest-timeout, requests_mock, httpx) and semfid with peft. Writes
# $WORK/{stock,installed}.{xml,log} and prints the per-file table and every differing test.
set -u
here=$(cd "$(dirname "$0")" && pwd)
: "${DIFFUSERS_SRC:?checkout of diffusers' repository}" "${PYTHON:=python}" "${WORK:=/tmp/semfid-dropin}"
mkdir -p "$WORK/hf_home"
export HF_HOME=$WORK/hf_home HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$here
"$PYTHON" "$here/hub_standins.py"
files="tests/models/unets/test_models_unet_2d_condition.py tests/pipelines/stable_diffusion/test_stable_diffusion.py
 tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py tests/lora/test_lora_layers_sd.py
 tests/lora/test_lora_layers_sdxl.py"
cd "$DIFFUSERS_SRC"
for run in stock installed; do
  extra=""
  [ $run = installed ] && extra="-p semfid.testing.install_everywhere --semfid-report=$WORK/installed-report.json"
  "$PYTHON" -m pytest -q -p no:cacheprovider --timeout 600 -p peft_shim $files $extra \
      --junitxml="$WORK/$run.xml" > "$WORK/$run.log" 2>&1
done
"$PYTHON" "$here/compare_junit.py" "$WORK/stock.xml" "$WORK/installed.xml"
