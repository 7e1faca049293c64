#!/usr/bin/env bash
# One GPU session in one command, sized to a time budget: training-step images/s of both CIFAR models (fp32,
# bf16), RepQ step times (bench/repq_speed.py), the GPU-only tests, then three 4-bit RepQ-BNEst (bnest_corrected)
# fine-tunes of CHECKPOINT (batch 128/256/512) with as many epochs as fit before DEADLINE (seconds from the start).
#
#   CHECKPOINT=runs/bench_cifar_cl/repvgg_a0/best.pt OUT=/tmp/gpu bench/gpu_session.sh
#
# DATA: an ImageFolder tree, or a .tgz of one (unpacked under /tmp); default ../shared/datasets/cifar10.
# WHEELS=DIR: pip-install these wheels into /tmp/site first (a machine that lacks some of the dependencies).
# The checkout itself is then installed editable (no dependencies, no index), so `import repq.*` works; where pip
# cannot build it offline (setuptools < 70.1 without wheel), /tmp/gpu_session_repq holds links laid out as the
# installed package (repq/ and the folders pyproject.toml's package-dir maps to repq.*) and goes on PYTHONPATH.
# DEVICE (cuda), DEADLINE (560), DRY=1: rehearse on any device with a few steps. Results: OUT/results.tgz.
#
# MODE=collapse OUT=/tmp/gpu bench/gpu_session.sh   (no CHECKPOINT): the collapse issue's sweep instead: RepVGG-A0
# with custom L2 and QARepVGG-A0 with plain L2 (SGD lr 0.1, weight decay 1e-4, cosine, no label smoothing, bf16)
# at WIDTH (1.0) for EPOCHS (30), both at once, a checkpoint every KEEP (2) epochs, then bench/collapse.py table
# on them. Training state lands in OUT/collapse (resumable: rerun the same command to continue).
set -u
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
T0=$SECONDS
DEVICE=${DEVICE:-cuda}
DEADLINE=${DEADLINE:-560}
OUT=${OUT:-/tmp/gpu_session}
DATA=${DATA:-../shared/datasets/cifar10}
MODE=${MODE:-finetune}
[ "$MODE" = collapse ] || CHECKPOINT=${CHECKPOINT:?set CHECKPOINT to an FP32 checkpoint of repq train}
R=$(mktemp -d)
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index -e .; then
  echo "== pip cannot install this checkout offline: importing it through links in /tmp/gpu_session_repq"
  rm -rf /tmp/gpu_session_repq && mkdir -p /tmp/gpu_session_repq/repq || exit 1
  ln -s "$PWD"/repq/*.py /tmp/gpu_session_repq/repq/ || exit 1
  for sub in reparam quant calibration engines pipeline training; do
    ln -s "$PWD/$sub" "/tmp/gpu_session_repq/repq/$sub" || exit 1
  done
  export PYTHONPATH=/tmp/gpu_session_repq${PYTHONPATH:+:$PYTHONPATH}
fi
if [[ "$DATA" == *.tgz ]]; then
  mkdir -p /tmp/gpu_session_data && tar xzf "$DATA" -C /tmp/gpu_session_data
  DATA=$(find /tmp/gpu_session_data -mindepth 1 -maxdepth 1 -type d | head -1)
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.used,clocks.sm --format=csv
python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
python3 -c "import sys; from repq.calibration.datasets import load_data; d = load_data(sys.argv[1], val_size=5000); print(len(d.train), 'train', len(d.val), 'val')" "$DATA" || exit 1
echo "== setup done at $((SECONDS - T0)) s"

if [ "$MODE" = collapse ]; then
  WIDTH=${WIDTH:-1.0} EPOCHS=${EPOCHS:-30} KEEP=${KEEP:-2}
  C="$OUT/collapse"
  PIDS=()
  for spec in "repvgg_a0 custom" "qarepvgg_a0 plain"; do
    read -r model l2 <<< "$spec"
    resume=(); [ -f "$C/$model/last.pt" ] && resume=(--resume)
    timeout $((DEADLINE - (SECONDS - T0) - 90)) python3 bench/train_cifar.py run --data "$DATA" --device "$DEVICE" \
      --model "$model" --l2 "$l2" --lr 0.1 --weight-decay 1e-4 --label-smoothing 0 --precision bf16 --width "$WIDTH" \
      --epochs "$EPOCHS" --keep-every "$KEEP" --no-progress "${resume[@]}" --out "$C/$model" > "$C.$model.log" 2>&1 & PIDS+=($!)
  done
  wait "${PIDS[@]}"
  grep -h "^epoch" "$C".*.log | tail -4
  python3 bench/collapse.py table --data "$DATA" --runs "$C/repvgg_a0" "$C/qarepvgg_a0" --out "$C/table" && cat "$C/table/table.md"
  echo "== collapse sweep done at $((SECONDS - T0)) s"
  exit 0
fi

STEPS=30 TIMED=15; [ -n "${DRY:-}" ] && STEPS=2 TIMED=1
for precision in fp32 bf16; do
  python3 bench/train_cifar.py speed --data "$DATA" --device "$DEVICE" --steps $STEPS --precision $precision --json "$R/train_speed_$precision.json"
done
python3 bench/train_cifar.py speed --data "$DATA" --device "$DEVICE" --steps $STEPS --precision bf16 --width 0.375 --models repvgg_a0 --json "$R/train_speed_bf16_w375.json"
python3 bench/repq_speed.py --model repvgg_a0 --width 0.25 --batch 128 --rounds 10 --device "$DEVICE"
[ -z "${DRY:-}" ] && python3 bench/repq_speed.py --model resnet18_acb --batch 64 --size 224 --rounds 10 --device "$DEVICE"
echo "== speeds done at $((SECONDS - T0)) s"

TIMES=$(python3 bench/finetune_step_time.py --checkpoint "$CHECKPOINT" --data "$DATA" --device "$DEVICE" --act-unsigned --batch-sizes 128,256,512 --steps $TIMED)
echo "seconds per step: $TIMES"
BUDGET=$((DEADLINE - (SECONDS - T0) - 45))  # 45 s: each run's start, BN recalibration and evaluation
read -r E128 E256 E512 <<< "$(python3 -c "
import json, math, sys
t = {int(k): v for k, v in json.loads(sys.argv[1] or '{}').items()} or {128: 0.06, 256: 0.07, 512: 0.09}
share = 1.8  # three fine-tunes share the GPU
ep = lambda bs, cap: max(1, min(cap, math.floor($BUDGET / (share * t[bs] * (45000 // bs)))))
print(ep(128, 60), ep(256, 90), ep(512, 150))" "$TIMES")"
echo "== budget $BUDGET s: epochs $E128 (batch 128), $E256 (256), $E512 (512)"
COMMON=(--checkpoint "$CHECKPOINT" --data "$DATA" --methods bnest_corrected --bits 4 --act-unsigned-below-8 --distill 1.0
        --weight-init minerror --recalibrate-bn 100 --freeze-bn-at 0.8 --device "$DEVICE")
if [ -n "${DRY:-}" ]; then COMMON+=(--val-images 256 --recalibrate-bn 2); fi
LEFT=$((DEADLINE - (SECONDS - T0)))
if [ "$BUDGET" -lt 60 ]; then echo "== no time left for the fine-tunes (DEADLINE $DEADLINE s)"; LEFT=0; fi
PIDS=()
for run in "128 0.01 $E128" "256 0.014 $E256" "512 0.02 $E512"; do
  [ "$LEFT" -gt 0 ] || break
  read -r batch lr epochs <<< "$run"
  length=(--epochs "$epochs"); [ -n "${DRY:-}" ] && length=(--steps 3)
  timeout $LEFT python3 bench/repq_table.py "${COMMON[@]}" --batch-size "$batch" --lr "$lr" "${length[@]}" \
    --out "$R/b$batch" > "$R/b$batch.log" 2>&1 & PIDS+=($!)
done
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_repq.py tests/test_tensorrt.py -k cuda > "$R/pytest_cuda.log" 2>&1
tail -3 "$R/pytest_cuda.log"
alive() { for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
while alive; do
  sleep 20
  echo "-- $((SECONDS - T0)) s: $(for f in "$R"/b*.log; do echo -n "$(basename "$f") $(grep -o '[0-9]*/[0-9]* steps' "$f" | tail -1); "; done)"
done
[ ${#PIDS[@]} -eq 0 ] || wait "${PIDS[@]}"  # never a bare wait: that also waits for the tee above
for f in "$R"/b*.log; do echo "== $f"; grep -E "fake_quant|FP32|Error" "$f" | tail -3; done
tar czf "$OUT/results.tgz" -C "$R" .
echo "== done at $((SECONDS - T0)) s"
