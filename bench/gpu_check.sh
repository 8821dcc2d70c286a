#!/usr/bin/env bash
# The example jobs on a GPU, in one go: the machine, the throughput benchmark (each job against its
# seed-style fp32 DataLoader loop) and a CUDA run of every job, offline (--dataset digits).
#
#   bash bench/gpu_check.sh                         # on a GPU machine, from the repository root
#   DEVICE=cpu BENCH_EPOCHS=1 REPEAT=2 QUICK=1 bash bench/gpu_check.sh   # a dry run of every step on a CPU
#
# Settings (environment): DEVICE (cuda), PYTHON (python3), OUT (where gpu.log and metrics.json go;
# default /tmp/gpu-check-out), BENCH_EPOCHS (3), REPEAT (40: the digits training set tiled to about
# MNIST's size for the throughput figures only), BENCH_ARGS (more arguments for the throughput
# benchmark, e.g. "--variant mnist-cnn:--eager --variant dcgan:--amp,bf16"), QUICK=1 (each job
# for 1 epoch instead of its documented count), DDP=1 (also a 2-process torchrun of mnist-cnn on
# the one GPU; NCCL refuses two ranks on one GPU, so this is informative only and never fails the
# check).
#
# Keras is not on every GPU image: if `.whl/` holds wheels (keras, namex, optree for the machine's
# Python) and keras does not import, they are installed into /tmp/site first.
# Exit status: 0 when every step passed and every job reported a CUDA device (or DEVICE's type).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
case $PY in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # the jobs run from jobs/
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/gpu-check-out}
BENCH_EPOCHS=${BENCH_EPOCHS:-3}
REPEAT=${REPEAT:-40}
QUICK=${QUICK:-0}
BENCH_ARGS=${BENCH_ARGS:-}
DDP=${DDP:-0}
WORK=$(mktemp -d)
mkdir -p "$OUT"
export KERAS_BACKEND=torch PYTHONUNBUFFERED=1

failed=()
step() {  # step NAME TIMEOUT CMD...: run, time, record a failure
	local name=$1 limit=$2
	shift 2
	echo
	echo "=== $name: $*"
	local t0=$SECONDS
	timeout "$limit" "$@"
	local rc=$?
	echo "=== $name: rc $rc in $((SECONDS - t0)) s"
	[ "$rc" = 0 ] || failed+=("$name (rc $rc)")
	return "$rc"
}

main() {
	echo "=== machine"
	date -u
	nvidia-smi || echo "(no nvidia-smi)"
	if [ -d .whl ] && ! "$PY" -c "import keras" 2>/dev/null; then
		echo "=== installing carried wheels: $(ls .whl | tr "\n" " ")"
		"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
			failed+=("wheel install")
		export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
	fi
	"$PY" - <<-'EOF' || failed+=("versions")
		import platform, torch, keras
		print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
		      "| keras", keras.__version__, keras.backend.backend())
		if torch.cuda.is_available():
		    p = torch.cuda.get_device_properties(0)
		    print("device:", torch.cuda.get_device_name(), f"| {p.multi_processor_count} SMs | {p.total_memory / 2**30:.0f} GiB")
		else:
		    print("device: no CUDA")
	EOF

	step "throughput" 240 "$PY" bench/train_throughput.py --device "$DEVICE" --dataset digits \
		--epochs "$BENCH_EPOCHS" --repeat-data "$REPEAT" $BENCH_ARGS

	# Each job as its README runs it offline (cd jobs && python JOB/train.py --dataset digits), on DEVICE.
	local epochs=()
	[ "$QUICK" = 1 ] && epochs=(--epochs 1)
	cd jobs
	export ORCH_OUTPUT_DIR ORCH_CHECKPOINT_DIR
	for job in smoke mnist-cnn seq-lstm dcgan keras-mnist; do
		ORCH_OUTPUT_DIR=$WORK/$job/out ORCH_CHECKPOINT_DIR=$WORK/$job/ckpt
		if [ "$job" = smoke ]; then
			(cd smoke && step "$job" 60 "$PY" smoke.py) || failed+=("$job")
		else
			step "$job" 180 "$PY" "$job/train.py" --dataset digits --device "$DEVICE" "${epochs[@]}"
		fi
		cp "$WORK/$job/out/metrics.json" "$WORK/$job.metrics.json" 2>/dev/null
	done
	if [ "$DDP" = 1 ]; then
		ORCH_OUTPUT_DIR=$WORK/ddp/out ORCH_CHECKPOINT_DIR=$WORK/ddp/ckpt
		echo
		echo "=== ddp (informative): torchrun, 2 processes, one GPU"
		timeout 60 "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 mnist-cnn/train.py \
			--dataset digits --epochs 2 --device "$DEVICE:0" >"$WORK/ddp.log" 2>&1
		echo "=== ddp: rc $? (not counted)"
		grep -m 8 -E "Error|error:|NCCL WARN|Duplicate|metrics \{" "$WORK/ddp.log"
		tail -n 5 "$WORK/ddp.log"
	fi
	cd "$ROOT"

	echo
	echo "=== summary: each job's metrics.json"
	"$PY" - "$WORK" "$DEVICE" "$OUT/metrics.json" <<-'EOF' || failed+=("summary")
		import json, sys
		from pathlib import Path
		work, device, dest = Path(sys.argv[1]), sys.argv[2].split(":")[0], Path(sys.argv[3])
		every, bad = {}, []
		for job in ["smoke", "mnist-cnn", "seq-lstm", "dcgan", "keras-mnist"]:
		    f = work / f"{job}.metrics.json"
		    m = json.loads(f.read_text()) if f.exists() else {}
		    every[job] = m
		    if job == "smoke":
		        ok = bool(m) and (m.get("gpus", 0) >= 1 or device == "cpu")
		        print(f"{job:<12} python_ok {m.get('python_ok')} gpus {m.get('gpus')}", "" if ok else "  <- FAILED")
		    else:
		        acc = m.get("test_accuracy", m.get("generated_accuracy"))
		        ok = bool(m) and str(m.get("device", "")).split(":")[0] == device
		        print(f"{job:<12} accuracy {acc} samples/s {m.get('samples_per_second')} device {m.get('device')}",
		              "" if ok else f"  <- FAILED (expected device {device})")
		    bad += [] if ok else [job]
		dest.write_text(json.dumps(every, indent=2, sort_keys=True))
		sys.exit(1 if bad else 0)
	EOF
	cp "$WORK/dcgan/out/samples.png" "$OUT/dcgan-samples.png" 2>/dev/null
	echo
	if [ ${#failed[@]} = 0 ]; then echo "gpu_check: all passed"; else echo "gpu_check: FAILED: ${failed[*]}"; fi
	[ ${#failed[@]} = 0 ]
}

main 2>&1 | tee "$OUT/gpu.log"
rc=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$rc"
