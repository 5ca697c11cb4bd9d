#!/usr/bin/env bash
# Build a TensorRT plan for the fashion model on THIS GPU with THIS TensorRT, and write a Triton model
# folder that serves it:
#
#   <OUTPUT_DIR>/<TRT_MODEL_NAME>/config.pbtxt            platform "tensorrt_plan"
#   <OUTPUT_DIR>/<TRT_MODEL_NAME>/<version>/model.plan
#   <OUTPUT_DIR>/<TRT_MODEL_NAME>/<version>/metadata.json  (copied from the ONNX model, for readers)
#
# from <REPO_DIR>/<MODEL_NAME>/<version>/model.<PRECISION>.onnx (written by `fashion export`).
#
# A plan only runs on the GPU model and TensorRT version that built it, so it is cached under
# CACHE_DIR as model.plan.<gpu-slug>.<trt-version> with a marker file recording the source ONNX's
# sha256 and the shape profile; a later start on the same GPU/TensorRT with the same ONNX copies the
# cached plan instead of rebuilding (minutes). The Helm chart runs this in an init container of the
# Triton pod, with the Triton image itself (its trtexec, its TensorRT).
#
# TensorRT 11 has no --fp16/--int8 builder flags: the precision is in the ONNX graph (an FP16 model,
# or an INT8 model with Q/DQ nodes) and the engine is built strongly typed (--stronglyTyped).
#
# Settings (environment variables, or the same names as --name=value arguments):
#   REPO_DIR        model repository root                         (default: /models)
#   MODEL_NAME      ONNX model folder                             (default: fashion)
#   TRT_MODEL_NAME  model folder written for the plan             (default: <MODEL_NAME>_trt)
#   MODEL_VERSION   version folder; "" = the highest numeric one  (default: "")
#   PRECISION       fp16 | int8 -> model.<PRECISION>.onnx         (default: fp16)
#   MAX_BATCH       largest batch of the profile = max_batch_size (default: 32)
#   OPT_BATCH       batch TensorRT tunes for                      (default: 8)
#   INPUT_SIZE      image side; "" = image_size from metadata.json, else 224
#                   (a model that reads titles — metadata.json's title section — also gets a profile for
#                   its "title" input: [batch, max_tokens] from the title's tokenizer)
#   OUTPUT_DIR      repository root the TRT model is written to   (default: REPO_DIR)
#   CACHE_DIR       where plans are cached per GPU + TensorRT     (default: OUTPUT_DIR/TRT_MODEL_NAME/version)
#   TRTEXEC         trtexec binary                                (default: /usr/src/tensorrt/bin/trtexec, else PATH)
#   TRT_VERSION     TensorRT version for the cache key            (default: the NGC image's TRT_VERSION, else trtexec's banner)
#
# Exit status: 0 when the plan is in place (built or reused); non-zero with an "error:" line otherwise.
set -euo pipefail

die() {
  echo "error: $*" >&2
  exit 1
}

for arg in "$@"; do
  case "$arg" in
    --repo-dir=*) REPO_DIR="${arg#*=}" ;;
    --model-name=*) MODEL_NAME="${arg#*=}" ;;
    --trt-model-name=*) TRT_MODEL_NAME="${arg#*=}" ;;
    --model-version=*) MODEL_VERSION="${arg#*=}" ;;
    --precision=*) PRECISION="${arg#*=}" ;;
    --max-batch=*) MAX_BATCH="${arg#*=}" ;;
    --opt-batch=*) OPT_BATCH="${arg#*=}" ;;
    --input-size=*) INPUT_SIZE="${arg#*=}" ;;
    --output-dir=*) OUTPUT_DIR="${arg#*=}" ;;
    --cache-dir=*) CACHE_DIR="${arg#*=}" ;;
    --trtexec=*) TRTEXEC="${arg#*=}" ;;
    -h | --help)
      # Print the header comment (builtins only: this must work where coreutils are missing too).
      while IFS= read -r line; do
        case "$line" in
          "#!"*) continue ;;
          "#"*) echo "${line#"#"}" ;;
          *) break ;;
        esac
      done <"${BASH_SOURCE[0]}"
      exit 0
      ;;
    *) die "unknown argument: $arg (see --help)" ;;
  esac
done

REPO_DIR="${REPO_DIR:-/models}"
MODEL_NAME="${MODEL_NAME:-fashion}"
TRT_MODEL_NAME="${TRT_MODEL_NAME:-${MODEL_NAME}_trt}"
MODEL_VERSION="${MODEL_VERSION:-}"
PRECISION="${PRECISION:-fp16}"
MAX_BATCH="${MAX_BATCH:-32}"
OPT_BATCH="${OPT_BATCH:-8}"
INPUT_SIZE="${INPUT_SIZE:-}"
OUTPUT_DIR="${OUTPUT_DIR:-$REPO_DIR}"

# --- the tools: checked first, with builtins only, so that a bare environment gets a clear message ---
if [[ -z "${TRTEXEC:-}" ]]; then
  if [[ -x /usr/src/tensorrt/bin/trtexec ]]; then
    TRTEXEC=/usr/src/tensorrt/bin/trtexec
  else
    TRTEXEC="$(command -v trtexec || true)"
  fi
fi
[[ -n "$TRTEXEC" && -x "$TRTEXEC" ]] ||
  die "trtexec not found (looked at ${TRTEXEC:-/usr/src/tensorrt/bin/trtexec} and on PATH). Run this inside the tritonserver image that serves the plan (it ships /usr/src/tensorrt/bin/trtexec), or set TRTEXEC=/path/to/trtexec."
command -v nvidia-smi >/dev/null 2>&1 ||
  die "nvidia-smi not found: no NVIDIA driver is visible in this container. A TensorRT plan must be built on the GPU that serves it (request nvidia.com/gpu for this container)."

# --- the settings ---
case "$PRECISION" in
  fp16 | int8) ;;
  *) die "PRECISION must be fp16 or int8, got '$PRECISION' (TensorRT 11 takes the precision from the ONNX graph: model.fp16.onnx or the Q/DQ model.int8.onnx)" ;;
esac
[[ "$MAX_BATCH" =~ ^[1-9][0-9]*$ ]] || die "MAX_BATCH must be a positive integer, got '$MAX_BATCH'"
[[ "$OPT_BATCH" =~ ^[1-9][0-9]*$ ]] || die "OPT_BATCH must be a positive integer, got '$OPT_BATCH'"
((OPT_BATCH <= MAX_BATCH)) || die "OPT_BATCH ($OPT_BATCH) must not exceed MAX_BATCH ($MAX_BATCH)"
[[ -d "$REPO_DIR/$MODEL_NAME" ]] || die "model folder $REPO_DIR/$MODEL_NAME not found (REPO_DIR=$REPO_DIR, MODEL_NAME=$MODEL_NAME)"

if [[ -z "$MODEL_VERSION" ]]; then
  for dir in "$REPO_DIR/$MODEL_NAME"/*/; do
    v="$(basename "$dir")"
    if [[ "$v" =~ ^[0-9]+$ ]] && { [[ -z "$MODEL_VERSION" ]] || ((v > MODEL_VERSION)); }; then
      MODEL_VERSION="$v"
    fi
  done
  [[ -n "$MODEL_VERSION" ]] || die "no numeric version folder in $REPO_DIR/$MODEL_NAME"
fi
SRC_DIR="$REPO_DIR/$MODEL_NAME/$MODEL_VERSION"
ONNX="$SRC_DIR/model.$PRECISION.onnx"
[[ -f "$ONNX" ]] || die "$ONNX not found: export the $PRECISION variant (fashion export) or choose another PRECISION"

if [[ -z "$INPUT_SIZE" ]]; then
  INPUT_SIZE=224
  if [[ -f "$SRC_DIR/metadata.json" ]]; then
    size="$(grep -o '"image_size"[[:space:]]*:[[:space:]]*[0-9]*' "$SRC_DIR/metadata.json" | grep -o '[0-9]*$' | head -n 1 || true)"
    [[ -n "$size" ]] && INPUT_SIZE="$size"
  fi
fi
[[ "$INPUT_SIZE" =~ ^[1-9][0-9]*$ ]] || die "INPUT_SIZE must be a positive integer, got '$INPUT_SIZE'"
# A model that reads titles (fashion.metadata.TitleSpec): only its tokenizer has a "max_tokens" key.
TITLE_TOKENS=""
if [[ -f "$SRC_DIR/metadata.json" ]]; then
  TITLE_TOKENS="$(grep -o '"max_tokens"[[:space:]]*:[[:space:]]*[0-9]*' "$SRC_DIR/metadata.json" | grep -o '[0-9]*$' | head -n 1 || true)"
fi

# --- the cache key: GPU model + TensorRT version ---
GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)" ||
  die "nvidia-smi could not list a GPU (is one allocated to this container?)"
[[ -n "$GPU_NAME" ]] || die "nvidia-smi listed no GPU (is one allocated to this container?)"
GPU_SLUG="$(echo "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-*//; s/-*$//')"

if [[ -z "${TRT_VERSION:-}" ]]; then
  # trtexec's banner: "&&&& RUNNING TensorRT.trtexec [TensorRT v101300] # ..."
  TRT_VERSION="$("$TRTEXEC" --help 2>&1 | grep -o 'TensorRT v[0-9]*' | head -n 1 | sed 's/TensorRT v//' || true)"
fi
[[ -n "${TRT_VERSION:-}" ]] || die "could not tell the TensorRT version (set TRT_VERSION)"

OUT_MODEL_DIR="$OUTPUT_DIR/$TRT_MODEL_NAME"
OUT_DIR="$OUT_MODEL_DIR/$MODEL_VERSION"
CACHE_DIR="${CACHE_DIR:-$OUT_DIR}"
mkdir -p "$OUT_DIR"
if ! mkdir -p "$CACHE_DIR" 2>/dev/null || ! [[ -w "$CACHE_DIR" ]]; then
  echo "warning: cache folder $CACHE_DIR is not writable; the plan is cached in $OUT_DIR only (rebuilt on every start)" >&2
  CACHE_DIR="$OUT_DIR"
fi

KEY="$MODEL_NAME.$MODEL_VERSION.$PRECISION.$GPU_SLUG.$TRT_VERSION"
CACHED_PLAN="$CACHE_DIR/model.plan.$KEY"
MARKER="$CACHED_PLAN.ok"
TIMING_CACHE="$CACHE_DIR/timing.$GPU_SLUG.$TRT_VERSION.cache"
MIN_SHAPE="image:1x${INPUT_SIZE}x${INPUT_SIZE}x3"
OPT_SHAPE="image:${OPT_BATCH}x${INPUT_SIZE}x${INPUT_SIZE}x3"
MAX_SHAPE="image:${MAX_BATCH}x${INPUT_SIZE}x${INPUT_SIZE}x3"
if [[ -n "$TITLE_TOKENS" ]]; then
  MIN_SHAPE="$MIN_SHAPE,title:1x${TITLE_TOKENS}"
  OPT_SHAPE="$OPT_SHAPE,title:${OPT_BATCH}x${TITLE_TOKENS}"
  MAX_SHAPE="$MAX_SHAPE,title:${MAX_BATCH}x${TITLE_TOKENS}"
fi
ONNX_SHA="$(sha256sum "$ONNX" | cut -d ' ' -f 1)"
EXPECTED_MARKER="onnx_sha256=$ONNX_SHA
min=$MIN_SHAPE opt=$OPT_SHAPE max=$MAX_SHAPE
gpu=$GPU_NAME
tensorrt=$TRT_VERSION"

echo "TensorRT plan: $ONNX on '$GPU_NAME' with TensorRT $TRT_VERSION ($PRECISION, batch 1..$MAX_BATCH, opt $OPT_BATCH, ${INPUT_SIZE}x${INPUT_SIZE})"

if [[ -f "$CACHED_PLAN" && -f "$MARKER" && "$(cat "$MARKER")" == "$EXPECTED_MARKER" ]]; then
  echo "cache hit: $CACHED_PLAN"
else
  # Several pods may share a cache on one volume: build into a private file, publish atomically.
  tmp_plan="$CACHED_PLAN.tmp.$$"
  trap 'rm -f "$tmp_plan"' EXIT
  echo "building (this takes minutes)..."
  "$TRTEXEC" \
    --onnx="$ONNX" \
    --saveEngine="$tmp_plan" \
    --minShapes="$MIN_SHAPE" \
    --optShapes="$OPT_SHAPE" \
    --maxShapes="$MAX_SHAPE" \
    --stronglyTyped \
    --timingCacheFile="$TIMING_CACHE" \
    --skipInference ||
    die "trtexec failed to build $ONNX (its log is above)"
  [[ -s "$tmp_plan" ]] || die "trtexec exited 0 but wrote no engine to $tmp_plan"
  mv -f "$tmp_plan" "$CACHED_PLAN"
  printf '%s\n' "$EXPECTED_MARKER" >"$MARKER"
  echo "built: $CACHED_PLAN"
fi

# Publish as model.plan (a hard link when the cache is on the same volume, else a copy).
ln -f "$CACHED_PLAN" "$OUT_DIR/model.plan.tmp.$$" 2>/dev/null || cp -f "$CACHED_PLAN" "$OUT_DIR/model.plan.tmp.$$"
mv -f "$OUT_DIR/model.plan.tmp.$$" "$OUT_DIR/model.plan"
if [[ -f "$SRC_DIR/metadata.json" ]]; then
  cp -f "$SRC_DIR/metadata.json" "$OUT_DIR/metadata.json"
fi

# Inputs and outputs are completed by Triton from the engine (auto-complete is on by default).
cat >"$OUT_MODEL_DIR/config.pbtxt" <<EOF
name: "$TRT_MODEL_NAME"
platform: "tensorrt_plan"
max_batch_size: $MAX_BATCH
version_policy: { specific: { versions: [ $MODEL_VERSION ] } }
instance_group [ { kind: KIND_GPU, count: 1 } ]
dynamic_batching { }
EOF
echo "wrote $OUT_MODEL_DIR/config.pbtxt and $OUT_DIR/model.plan"
