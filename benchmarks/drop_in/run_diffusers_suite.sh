#!/bin/bash
# diffusers' own UNet / SD / SDXL / LoRA test files (SUITE=unet, default) or SD3 / Flux / PixArt
# transformer and pipeline test files (SUITE=dit; dit-models / dit-pipelines: the three transformer / pipeline files only),
# stock and with semfid installed everywhere (semfid.testing.install_everywhere), offline, with the
# same local hub stand-ins for both runs.
#
#   DIFFUSERS_SRC=/path/to/diffusers-checkout PYTHON=/path/to/venv/bin/python WORK=/tmp/dropin \
#       [SUITE=dit] [PARALLEL=1] bash benchmarks/drop_in/run_diffusers_suite.sh
#
# PARALLEL=1 runs the stock and the installed run at once (one thread each).
#
# PYTHON's environment must have the checkout installed (pip install -e, plus its test deps:
# parameterized, pytest-timeout, requests_mock, httpx) and semfid with peft. Writes
# $WORK/{stock,installed}.{xml,log} and prints the per-file table and every differing test.
set -u
here=$(cd "$(dirname "$0")" && pwd)
: "${DIFFUSERS_SRC:?a checkout of the diffusers repository}" "${PYTHON:=python}" "${WORK:=/tmp/semfid-dropin}"
mkdir -p "$WORK/hf_home"
export HF_HOME=$WORK/hf_home HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$here
"$PYTHON" "$here/hub_standins.py"
dit_models="tests/models/transformers/test_models_transformer_sd3.py tests/models/transformers/test_models_transformer_flux.py
 tests/models/transformers/test_models_pixart_transformer2d.py"
dit_pipelines="tests/pipelines/stable_diffusion_3/test_pipeline_stable_diffusion_3.py
 tests/pipelines/flux/test_pipeline_flux.py tests/pipelines/pixart_sigma/test_pixart.py"
case "${SUITE:=unet}" in
  unet) files="tests/models/unets/test_models_unet_2d_condition.py tests/pipelines/stable_diffusion/test_stable_diffusion.py
 tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py tests/lora/test_lora_layers_sd.py
 tests/lora/test_lora_layers_sdxl.py" ;;
  dit-models) files=$dit_models ;;
  dit-pipelines) files=$dit_pipelines ;;
  dit) files="$dit_models $dit_pipelines" ;;
  *) echo "SUITE must be unet, dit, dit-models or dit-pipelines" >&2; exit 2 ;;
esac
cd "$DIFFUSERS_SRC"
for run in stock installed; do
  extra=""
  [ $run = installed ] && extra="-p semfid.testing.install_everywhere --semfid-report=$WORK/installed-report.json"
  "$PYTHON" -m pytest -q -p no:cacheprovider --timeout 600 -p peft_shim $files $extra \
      --junitxml="$WORK/$run.xml" > "$WORK/$run.log" 2>&1 &
  [ "${PARALLEL:-0}" = 1 ] || wait
done
wait
"$PYTHON" "$here/compare_junit.py" "$WORK/stock.xml" "$WORK/installed.xml"
