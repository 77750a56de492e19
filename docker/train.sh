#!/usr/bin/env bash
# The compose `trainer`: fit the DeDe decoder for an encoder, calibrate the threshold on clean
# images, export the bundle into /bundles/$DEDE_BUNDLE_NAME. Each step resumes or skips what is done.
#
# With no DEDE_TRAIN_ENCODER set it builds the demo bundle instead (`dede demo`: a backdoored CIFAR
# encoder, CIFAR-10 from /data; about an hour on 2 CPU cores, minutes on a GPU).
#   DEDE_TRAIN_ENCODER  encoder under test (a file under /data, or `random:cifar_resnet18`)
#   DEDE_TRAIN_ARCH     its architecture when the file is a state dict (e.g. cifar_resnet18)
#   DEDE_TRAIN_AUX      auxiliary images for fitting (default tinyimagenet_val, found in /data)
#   DEDE_TRAIN_CLEAN    CLEAN held-out images for calibration (default cifar10_test)
#   DEDE_TRAIN_PRESET   decoder preset: conv (CPU, the default) or conv_paper (GPU); lab/paper: MAE
#   DEDE_TRAIN_EPOCHS   a step budget in passes over the images (default: the preset's steps, plateau stop)
#   DEDE_TRAIN_FPR      target false-positive rate (default 0.01)
#   DEDE_BUNDLE_NAME    bundle folder under /bundles (default demo, or `detector` with an encoder)
# Outside the image (a test run on a host): DEDE_TRAIN_BUNDLES and DEDE_TRAIN_RUNS replace /bundles, /runs.
set -euo pipefail
BUNDLES=${DEDE_TRAIN_BUNDLES:-/bundles}
RUNS=${DEDE_TRAIN_RUNS:-/runs}

if [ -z "${DEDE_TRAIN_ENCODER:-}" ]; then
  name=${DEDE_BUNDLE_NAME:-demo}
  echo "trainer: no DEDE_TRAIN_ENCODER given: building the demo bundle into $BUNDLES/$name"
  exec dede demo --out "$BUNDLES/$name"
fi

name=${DEDE_BUNDLE_NAME:-detector}
run=$RUNS/$name
out=$BUNDLES/$name
arch_args=()
[ -n "${DEDE_TRAIN_ARCH:-}" ] && arch_args=(--arch "$DEDE_TRAIN_ARCH")
epoch_args=()
[ -n "${DEDE_TRAIN_EPOCHS:-}" ] && epoch_args=(--epochs "$DEDE_TRAIN_EPOCHS")

echo "trainer: [1/3] fit ($DEDE_TRAIN_ENCODER on ${DEDE_TRAIN_AUX:-tinyimagenet_val}) -> $run"
dede fit --encoder "$DEDE_TRAIN_ENCODER" "${arch_args[@]}" --data "${DEDE_TRAIN_AUX:-tinyimagenet_val}" \
  --preset "${DEDE_TRAIN_PRESET:-conv}" "${epoch_args[@]}" --out "$run"
echo "trainer: [2/3] calibrate on ${DEDE_TRAIN_CLEAN:-cifar10_test} for FPR ${DEDE_TRAIN_FPR:-0.01}"
dede calibrate --run "$run" --data "${DEDE_TRAIN_CLEAN:-cifar10_test}" --fpr "${DEDE_TRAIN_FPR:-0.01}"
echo "trainer: [3/3] export -> $out"
dede export --run "$run" --out "$out" --name "$name" --force
# The detector runs as another user than whoever reads the volume from the host: readable by all.
chmod -R a+rX "$out"
echo "trainer: bundle ready: $out (serve it with DEDE_BUNDLE_NAME=$name)"
