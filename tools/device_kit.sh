#!/usr/bin/env bash
# The GPU procedure: run this repository on the lent H100 through MLX's CUDA backend.
#
# The device image has Python 3.12, torch 2.11 (CUDA), transformers, pytest and the NVIDIA
# libraries, but no MLX and no network. This script stages what it lacks here, in the ignored
# folder .gpu/, in two pieces that each fit one call's 64 MiB carry, and runs everything there
# in one command. Three steps (../shared/GPU.md has the facts behind them):
#
#   bash tools/device_kit.sh stage           # here, once: wheels -> .gpu/a (~60 MB), .gpu/b
#   bash tools/device_kit.sh stage-vllm      # here, once, for vLLM: .gpu/c (~60 MB)
#   device run, carry [".gpu/a"]:  bash tools/device_kit.sh hold
#   (for vLLM, next:) carry [".gpu/c"]:  bash tools/device_kit.sh hold
#   device run, carry [".gpu/b"]:  bash tools/device_kit.sh run SELECTION...   (right after:
#                                  the machine is given back after 30 s idle)
#
# SELECTION is any of:
#   probe        tools/gpu_probe.py: one subprocess per check (bridge, compile, matmul
#                precision, bad input, MLX CUDA's grouped GEMM), so a crash is reported, not
#                fatal; probe:NAME,NAME runs those checks only
#   tests        pytest tests/torch_mlx (pytest-xdist workers: a crashed test is reported as
#                such and its worker replaced), junit XML
#   tests:EXPR   the same, restricted with pytest -k EXPR; tests:@FILE runs the node ids listed
#                in FILE (one a line, a path in the tree: an untracked file travels with it)
#   conformance  tools/conformance.py --dtype float32 (crash-proof children, KIT_CONF_JOBS of them,
#                default 12, stopped at KIT_ITEM_S with the ops that finished reported);
#                conformance:@FILE resumes from an earlier report (untracked files travel)
#   diff:SPECS   tools/op_diff.py: the inputs and both results of each failing OpInfo sample;
#                SPECS is comma-separated OP:DTYPE (diff:topk:bfloat16,kthvalue:float16)
#   cachewrite   tools/bench_cache_write.py with VLLM_METAL_KV_WRITE=scatter and =rows
#   qprobe       tools/gpu_quantized_probe.py: mx.quantized_matmul against float64 for every
#                bits / group size / dtype, weights in device, managed and torch_mlx memory
#   qmodel       tools/gpu_quantized_model_probe.py: a tiny Llama, float and 4-bit, greedy with
#                top-5 logprobs through vLLM, mlx-lm on the GPU and mlx-lm on the CPU (.gpu/c)
#   opcost       tools/gpu_op_cost.py: one eager op's time, MLX alone vs through torch_mlx
#   encodecost   tools/gpu_encode_cost.py: the host's launch cost per MLX primitive family, and a
#                decode layer's attention and rope as written here vs MLX's fused kernels
#   vtests       pytest tests/vllm_metal (needs .gpu/c held), junit XML; vtests:EXPR with -k,
#                vtests:@FILE with node ids (tools/gpu_lists/ holds the lists a visit plans on)
#   profile      tools/profile_decode.py on bench_gpu's 0.5B bf16 Llama, batch 1 and 32, with op
#                counts: where a decode step's time goes on the GPU (KIT_PROFILE_LAYERS=4: a
#                4-layer model, to split the launch per layer and per step); profile:sync waits for
#                each eager result (TORCH_MLX_ASYNC=0, the GPU default before the ninth visit)
#                profile:nographs launches MLX's kernels one by one (MLX_USE_CUDA_GRAPHS=0) and
#                profile:ops1000 puts up to 1000 in one CUDA graph (MLX_MAX_OPS_PER_BUFFER, H100
#                default 100): MLX CUDA instantiates a graph per commit unless its cache has it
#                profile:wait also synchronizes after each forward and sampling (device time
#                apart from host time); profile:async_sched runs vLLM's async scheduling with
#                TORCH_MLX_ASYNC=1 (tools/profile_decode.py --async-scheduling); profile:hf profiles transformers' compiled generate
#                (tools/profile_hf_generate.py: graph breaks, retraces, eager ops a step;
#                profile:hf_pyspy adds py-spy's native host stacks of a 512-token generate)
#                profile:pyspy samples the host's stacks, Python and native (py-spy --native),
#                of a batch-1 vllm_metal decode and of mlx-lm's, summarized by
#                tools/pyspy_summary.py: which C++ functions of libmlx the launch spends in
#   moe          tools/bench_moe.py (float32, then 4-bit): routed experts vs the dense MLP of equal
#                active parameters at 1 and 32 sequences, on the GPU (needs .gpu/c held)
#   census       tools/graph_census.py: the MLX primitives of one decode step, vllm_metal vs mlx-lm
#                (census:32: at 32 sequences; census:hf: transformers' compiled generate's graph)
#   serve        tools/bench_serve.py: `vllm serve` vs mlx_lm.server on bench_gpu's 0.5B model
#   bench        tools/bench_gpu.py (vllm_metal and transformers generate on "mlx" eager/compiled
#                vs mlx-lm on MLX CUDA vs transformers on torch CUDA); bench:ENGINES picks some
#                (bench:mlx_lm,vllm_metal); engines run torch_mlx's default launch mode
#                (launched, not waited for, on a GPU) unless named _sync (TORCH_MLX_ASYNC=0) or
#                _async (=1); vllm_metal_async_sched is vLLM's async scheduling with =1
#                (bench:mlx_lm,vllm_metal,vllm_metal_sync,vllm_metal_async_sched)
# KIT_ITEM_S (default 560) stops tests/vtests with SIGINT after that many seconds: the summary and
# the XML are still written. KIT_WORKERS (default 16, one a core) sets tests' xdist workers; work
# stealing keeps them busy through the slow tail (the whole suite is ~7100 test-seconds on the H100).
# KIT_VWORKERS (default 4) does the same for vtests: a vLLM engine test is ~30 s there, mostly
# start-up and MLX CUDA's per-shape JIT, so a few engines side by side share the GPU well.
# JSON reports land in $OUT, every log in $OUT/logs.tgz (the device tool brings them back). A later call on the same warm
# machine may run `bash tools/device_kit.sh run ...` again without carrying anything: the
# install and the build are kept in /tmp/kit.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STAGE="$ROOT/.gpu"
KIT=/tmp/kit                      # on the device: wheels, installed packages, build stamp
PART_BYTES=60000000               # the first piece: leaves room for the tree in a 64 MiB carry
WHEELS=(mlx==0.32.4 mlx-cuda-13==0.32.4 nanobind==3.1.0 mlx-lm==0.32.2 expecttest==0.3.0
        pycountry==26.2.16    # pycountry: mistral_common's tokenizer (an extra vLLM's walk skips)
        py-spy==0.4.3)        # profile:pyspy, the host's native stacks (libmlx's C++ frames)

stage() {
  mkdir -p "$STAGE/dl" "$STAGE/a" "$STAGE/b"
  grep -qx '/.gpu/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.gpu/' >>"$ROOT/.git/info/exclude"
  for w in "${WHEELS[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_35_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux1_x86_64 \
      --platform any -d "$STAGE/dl" "$w"
  done
  rm -f "$STAGE"/a/* "$STAGE"/b/*
  local big
  big=$(ls "$STAGE"/dl/mlx_cuda_13-*.whl)
  split -b "$PART_BYTES" -d "$big" "$STAGE/a/$(basename "$big").part"
  mv "$STAGE/a/$(basename "$big").part01" "$STAGE/b/"
  for f in "$STAGE"/dl/*.whl; do [ "$f" = "$big" ] || cp "$f" "$STAGE/b/"; done
  (cd "$STAGE/dl" && sha256sum "$(basename "$big")") >"$STAGE/b/SHA256SUMS"
  du -sh "$STAGE/a" "$STAGE/b"
}

# vLLM on the device: its own Python files (vLLM's CUDA extensions are never loaded: the
# platform is this plugin's) and the dependencies the image lacks, as cp312 wheels. The list is
# the closure of vLLM's requirements in this venv minus the image's packages (../shared/GPU.md,
# /work/.library/device/KINDS.md) and minus CUDA-only kernels packages.
VLLM_SKIP='torch|torchaudio|torchvision|torchcodec|pynvvideocodec|flashinfer-python|tilelang|nvidia-.*|nvtx|fastsafetensors|instanttensor|quack-kernels|tokenspeed-mla|humming-kernels|numba|triton|xformers|ray'
IMAGE_PACKAGES='absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi charset-normalizer click cloudpickle colorama einops filelock frozenlist fsspec grpcio h11 hf-xet httpcore httpx huggingface-hub idna jinja2 markdown-it-py markupsafe mdurl msgpack multidict networkx ninja numpy opencv-python-headless packaging pillow pip pluggy prometheus-client propcache protobuf psutil py-cpuinfo pygments pyyaml regex requests rich safetensors sentencepiece setuptools shellingham six sympy tiktoken tokenizers tqdm transformers typer typing-extensions urllib3 uvloop wheel wrapt yarl zipp'

stage_vllm() {
  local py="$ROOT/.venv/bin/python" c="$STAGE/c"
  mkdir -p "$c"; rm -f "$c"/*
  grep -qx '/.gpu/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.gpu/' >>"$ROOT/.git/info/exclude"
  local reqs
  reqs=$("$py" - "$IMAGE_PACKAGES" "$VLLM_SKIP" <<'PYEOF'
import importlib.metadata as md, re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
image, skip = {norm(n) for n in sys.argv[1].split()}, re.compile(f"^({sys.argv[2]})$")
seen = {}
def walk(name):
    n = norm(name)
    if n in seen or n in image or skip.match(n):
        return
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        return  # a platform-specific requirement (win32, darwin) this venv never installed
    seen[n] = dist.version
    for r in dist.requires or []:
        if "extra ==" in r and not re.search(r'extra == "(standard|image)"', r):
            continue
        walk(re.match(r"[A-Za-z0-9_.\-]+", r).group(0))
walk("vllm")
print("\n".join(f"{k}=={v}" for k, v in sorted(seen.items()) if k != "vllm"))
PYEOF
)
  local r plats=()
  for n in 39 35 34 31 28 27 24 17; do plats+=(--platform "manylinux_2_${n}_x86_64"); done
  for r in $reqs; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp "${plats[@]}" --platform manylinux2014_x86_64 --platform any \
      -d "$c" "$r"
  done
  local site
  site=$("$py" -c 'import vllm, os; print(os.path.dirname(os.path.dirname(vllm.__file__)))')
  tar -C "$site" --exclude='*.so' --exclude=__pycache__ -cJf "$c/vllm-py.tar.xz" vllm \
    "$(cd "$site" && ls -d vllm-*.dist-info)"
  du -sh "$c"
}

hold() {  # device, first calls: keep each carried piece until the last call brings the rest
  mkdir -p "$KIT/parts" "$KIT/vllm"
  [ -d "$ROOT/.gpu/a" ] && cp "$ROOT"/.gpu/a/* "$KIT/parts/"
  [ -d "$ROOT/.gpu/c" ] && cp "$ROOT"/.gpu/c/* "$KIT/vllm/"
  ls -la "$KIT/parts" "$KIT/vllm"
}

setup_device() {
  local t0=$SECONDS
  if [ ! -f "$KIT/installed" ]; then
    mkdir -p "$KIT/parts" "$KIT/wheels"
    [ -d "$ROOT/.gpu/a" ] && cp "$ROOT"/.gpu/a/* "$KIT/parts/" 2>/dev/null || true
    cp "$ROOT"/.gpu/b/*.part* "$KIT/parts/"
    cp "$ROOT"/.gpu/b/*.whl "$KIT/wheels/"
    local name
    name=$(awk '{print $2}' "$ROOT/.gpu/b/SHA256SUMS")
    cat "$KIT"/parts/"$name".part* >"$KIT/wheels/$name"
    (cd "$KIT/wheels" && sha256sum -c "$ROOT/.gpu/b/SHA256SUMS")
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$KIT/site" "$KIT"/wheels/*.whl
    touch "$KIT/installed"
  fi
  if [ -f "$KIT/vllm/vllm-py.tar.xz" ] && [ ! -f "$KIT/vllm-installed" ]; then
    tar -C "$KIT/site" -xJf "$KIT/vllm/vllm-py.tar.xz"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$KIT/site" "$KIT"/vllm/*.whl
    touch "$KIT/vllm-installed"
  fi
  export PYTHONPATH="$KIT/site:$ROOT"
  # The NVIDIA libraries libmlx.so needs (cuBLASLt, cuDNN, NVRTC, ...) and the CUDA headers its
  # JIT compiler (NVRTC) includes come with the image's torch, in site-packages/nvidia. MLX looks
  # for them beside its own package, as a pip install would put them: link them there.
  local img_site nv
  img_site=$(python3 -c 'import site; print(site.getsitepackages()[0])')
  [ -e "$KIT/site/nvidia" ] || [ ! -d "$img_site/nvidia" ] || ln -s "$img_site/nvidia" "$KIT/site/nvidia"
  nv=$(ls -d "$img_site"/nvidia/*/lib 2>/dev/null | paste -sd: || true)
  export LD_LIBRARY_PATH="$nv${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  # the package's metadata, for its entry points (torch's backend autoload, dynamo's "mlx")
  if [ ! -d "$KIT/site/torch_mlx.egg-info" ]; then
    (cd "$ROOT" && TORCH_DEVICE_BACKEND_AUTOLOAD=0 TORCH_MLX_SKIP_EXT=1 python3 setup.py -q egg_info --egg-base "$KIT/site" >/dev/null)
  fi
  local so
  so=$(ls "$ROOT"/torch_mlx/_C*.so 2>/dev/null | head -n1 || true)
  if [ -z "$so" ] || [ -n "$(find "$ROOT/csrc" "$ROOT/setup.py" -newer "$so" | head -n1)" ]; then
    (cd "$ROOT" && TORCH_DEVICE_BACKEND_AUTOLOAD=0 MAX_JOBS=16 python3 setup.py -q build_ext --inplace >"$LOG/build.log" 2>&1) \
      || { tail -50 "$LOG/build.log"; exit 1; }
  fi
  python3 - <<'EOF' | tee "$LOG/env.txt"
import subprocess, torch, mlx.core as mx, torch_mlx
print("torch", torch.__version__, "| mlx", mx.__version__, "| default device", mx.default_device())
print("device_info", {k: v for k, v in mx.device_info().items() if k in ("device_name", "architecture", "memory_size")})
try:
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip())
except OSError:
    print("no nvidia-smi")
EOF
  echo "setup: $((SECONDS - t0)) s"
}

run_item() {
  local item=$1 t0=$SECONDS status=0
  case "$item" in
    probe|probe:*)  # probe:NAME,NAME runs only those checks
      local only=()
      [ "$item" != probe ] && only=(--only "${item#probe:}")
      python3 tools/gpu_probe.py --gdb "${only[@]}" --json "$LOG/probe.json" >"$LOG/probe.log" \
        2>&1 || status=1
      cat "$LOG/probe.log" ;;
    tests|tests:*)
      local sel=()
      case "$item" in
        # a file of node ids, one a line (tools/pytest_nodeids.py: ids this torch lacks are skipped)
        tests:@*) sel=(-p pytest_nodeids --nodeids-file "${item#tests:@}") ;;
        tests:*) sel=(-k "${item#tests:}") ;;
      esac
      # -v names each result as it lands, so a visit cut short still says which failed; SIGINT
      # at KIT_ITEM_S seconds makes pytest print its summary and write the XML
      PYTHONPATH="$ROOT/tools${PYTHONPATH:+:$PYTHONPATH}" timeout -s INT -k 30 "${KIT_ITEM_S:-560}" \
        python3 -m pytest -v -p no:cacheprovider -n "${KIT_WORKERS:-16}" --dist worksteal \
        --timeout 600 tests/torch_mlx "${sel[@]}" \
        --junitxml "$LOG/tests.xml" -rfEx >"$LOG/tests.log" 2>&1 || status=1
      grep -E '^(FAILED|ERROR)|^\[gw[0-9]+\] .*(FAILED|ERROR)' "$LOG/tests.log" | sort -u | head -150
      tail -60 "$LOG/tests.log" ;;
    conformance|conformance:@*)
      # 12 children side by side (MLX CUDA compiles kernels on the host: CPU-bound); at
      # KIT_ITEM_S the sweep stops and reports the ops that finished; conformance:@FILE resumes
      # the sweep of an earlier report FILE (a path in the tree)
      local resume=()
      [ "$item" != conformance ] && resume=(--resume "${item#conformance:@}")
      python3 tools/conformance.py --dtype float32 --jobs "${KIT_CONF_JOBS:-12}" "${resume[@]}" \
        --deadline "${KIT_ITEM_S:-560}" --json "$LOG/conformance-float32.json" \
        >"$LOG/conformance.log" 2>&1 || status=1
      tail -25 "$LOG/conformance.log" ;;
    diff:*)
      python3 tools/op_diff.py $(echo "${item#diff:}" | tr , " ") >"$LOG/diff.log" 2>&1 || status=1
      tail -c 20000 "$LOG/diff.log" ;;
    qprobe)  # mx.quantized_matmul over bits x groups x rows x dtypes, three weight memories
      timeout -k 10 "${KIT_ITEM_S:-560}" python3 tools/gpu_quantized_probe.py --jobs 12 \
        --json "$LOG/qprobe.json" >"$LOG/qprobe.log" 2>&1 || status=1
      tail -c 12000 "$LOG/qprobe.log" ;;
    qmodel)  # vLLM vs mlx-lm on the GPU vs mlx-lm on the CPU, float and 4-bit (needs .gpu/c)
      timeout -k 10 "${KIT_ITEM_S:-560}" python3 tools/gpu_quantized_model_probe.py \
        --timeout $(( ${KIT_ITEM_S:-560} - 60 )) --json "$LOG/qmodel.json" >"$LOG/qmodel.log" 2>&1 || status=1
      tail -c 8000 "$LOG/qmodel.log" ;;
    opcost)  # both launch modes (csrc/launch.h)
      TORCH_MLX_ASYNC=0 python3 tools/gpu_op_cost.py >"$LOG/opcost.log" 2>&1 || status=1
      TORCH_MLX_ASYNC=1 python3 tools/gpu_op_cost.py >>"$LOG/opcost.log" 2>&1 || status=1
      grep '^{' "$LOG/opcost.log" >"$LOG/opcost.json" || true
      cat "$LOG/opcost.log" ;;
    encodecost)  # the host's launch cost of each MLX primitive family, and attention/rope written
      # vs fused (tools/gpu_encode_cost.py)
      python3 tools/gpu_encode_cost.py --json "$LOG/encode_cost.json" >"$LOG/encodecost.log" 2>&1 \
        || status=1
      grep -v '^{' "$LOG/encodecost.log" | tail -40 ;;
    vtests|vtests:*)
      local vsel=()
      case "$item" in
        vtests:@*) vsel=(-p pytest_nodeids --nodeids-file "${item#vtests:@}") ;;
        vtests:*) vsel=(-k "${item#vtests:}") ;;
      esac
      PYTHONPATH="$ROOT/tools${PYTHONPATH:+:$PYTHONPATH}" timeout -s INT -k 30 "${KIT_ITEM_S:-560}" \
        python3 -m pytest -v -p no:cacheprovider -n "${KIT_VWORKERS:-4}" --dist worksteal \
        --timeout 900 tests/vllm_metal "${vsel[@]}" \
        --junitxml "$LOG/vtests.xml" -rfEx >"$LOG/vtests.log" 2>&1 || status=1
      tail -80 "$LOG/vtests.log" ;;
    cachewrite)  # the KV-cache write, both paths (vllm_metal/ops/cache.py)
      for path in scatter rows; do
        VLLM_METAL_KV_WRITE=$path python3 tools/bench_cache_write.py \
          --json "$LOG/cache_write_$path.json" >>"$LOG/cachewrite.log" 2>&1 || status=1
      done
      cat "$LOG/cachewrite.log" ;;
    profile|profile:*)  # where a vllm_metal decode step goes on the GPU: bench_gpu's model,
      # bf16, the launch mode as the product defaults it (TORCH_MLX_ASYNC=auto: launched, not
      # waited for, on a GPU); profile:sync waits for each result (=0), profile:async forces =1,
      # profile:pipeline starts each layer's work while the next is recorded (TORCH_MLX_PIPELINE=1)
      # KIT_PROFILE_LAYERS (default 16) changes the model's depth: two depths split a step's
      # launch into a per-layer cost and a per-step one
      local layers=${KIT_PROFILE_LAYERS:-16}
      local model=models/bench-llama-${layers}x1536-bf16 mode=${item#profile}
      mode=${mode#:}; mode=${mode:-default}
      python3 -c "import sys; sys.path.insert(0, 'tools'); import bench_gpu; \
bench_gpu.make_model('$model', $layers, 1536)" >>"$LOG/profile.log" 2>&1 || status=1
      # py-spy on its own (installed with the other wheels its binary did not land in
      # site/bin); 50 samples a second: unwinding native stacks through libmlx and the CUDA
      # libraries is slow, and at 1000 a second the sampler fell minutes behind (eighth visit)
      local spy="$KIT/spy/bin/py-spy"
      if [ "$mode" = pyspy ] || [ "$mode" = hf_pyspy ]; then
        [ -x "$spy" ] || python3 -m pip install -q --no-index --no-deps \
          --target "$KIT/spy" "$KIT"/wheels/py_spy-*.whl
      fi
      if [ "$mode" = pyspy ]; then  # native stacks: vllm_metal's decode, then mlx-lm's
        # attached after each warm-up (tools/pyspy_self.py): under py-spy from the start, vLLM's
        # start-up alone outlasted 200 s and mlx-lm's samples were its first-use JIT (tenth visit)
        timeout -s INT -k 20 240 python3 tools/profile_decode.py --model "$model" \
          --dtype bfloat16 --tokens 960 --batch 1 --pyspy "$LOG/pyspy_vllm_metal.txt" \
          --pyspy-bin "$spy" --json "$LOG/profile_pyspy_b1.json" >>"$LOG/profile.log" 2>&1 || status=1
        timeout -s INT -k 20 120 python3 tools/pyspy_mlx_lm.py --model "$model" \
          --out "$LOG/pyspy_mlx_lm.txt" --pyspy-bin "$spy" >>"$LOG/profile.log" 2>&1 || status=1
        for f in vllm_metal mlx_lm; do
          [ -f "$LOG/pyspy_$f.txt" ] || continue
          python3 tools/pyspy_summary.py "$LOG/pyspy_$f.txt" --top 45 --focus async_eval \
            --json "$LOG/pyspy_$f.json" >>"$LOG/profile.log" 2>&1 || status=1
        done
      elif [ "$mode" = hf ] || [ "$mode" = hf_pyspy ]; then  # transformers' compiled generate
        # on "mlx" (bench's mlx_compiled); hf_pyspy also samples the host's native stacks
        timeout -s INT -k 20 300 python3 tools/profile_hf_generate.py --model "$model" --tokens 32 \
          $([ "$mode" = hf_pyspy ] && echo --pyspy "$LOG/pyspy_hf.txt" --pyspy-bin "$spy") \
          --json "$LOG/profile_hf.json" >>"$LOG/profile.log" 2>&1 || status=1
        if [ -f "$LOG/pyspy_hf.txt" ]; then
          python3 tools/pyspy_summary.py "$LOG/pyspy_hf.txt" --top 60 --focus GenerationMixin._sample \
            --json "$LOG/pyspy_hf.json" >>"$LOG/profile.log" 2>&1 || status=1
        fi
      else
        for batch in 1 32; do
          TORCH_MLX_ASYNC=$(case "$mode" in async|async_sched) echo 1 ;; sync) echo 0 ;;
                            *) echo auto ;; esac) \
          TORCH_MLX_PIPELINE=$([ "$mode" = pipeline ] && echo 1 || echo 0) \
          MLX_USE_CUDA_GRAPHS=$([ "$mode" = nographs ] && echo 0 || echo 1) \
          MLX_MAX_OPS_PER_BUFFER=$([ "$mode" = ops1000 ] && echo 1000 || echo 100) \
          python3 tools/profile_decode.py --model "$model" --dtype bfloat16 --tokens 64 --ops \
            $([ "$mode" = wait ] && echo --device-wait) \
            $([ "$mode" = async_sched ] && echo --async-scheduling) \
            --batch "$batch" --json "$LOG/profile_${mode}_L${layers}_b$batch.json" \
            >>"$LOG/profile.log" 2>&1 \
            || status=1
        done
      fi
      grep -vE '^(\(|INFO|WARNING|DEBUG)' "$LOG/profile.log" | tail -120 ;;
    moe)  # issue 18's MoE speed goal on the GPU: one routed-experts layer vs the dense MLP
      python3 tools/bench_moe.py --json "$LOG/moe.json" >"$LOG/moe.log" 2>&1 || status=1
      python3 tools/bench_moe.py --bits 4 --json "$LOG/moe_q4.json" >>"$LOG/moe.log" 2>&1 || status=1
      grep -vE '^(INFO|WARNING|DEBUG)' "$LOG/moe.log" | tail -40 ;;
    census|census:*)  # the MLX primitives of one decode step: vllm_metal's graph vs mlx-lm's,
      # same model; census:32 at 32 sequences; census:hf transformers' compiled generate's graph
      local cmodel=models/bench-llama-16x1536-bf16 cbatch=${item#census} cengine=both
      cbatch=${cbatch#:}; cbatch=${cbatch:-1}
      [ "$cbatch" = hf ] && cengine=hf cbatch=1
      python3 -c "import sys; sys.path.insert(0, 'tools'); import bench_gpu; \
bench_gpu.make_model('$cmodel', 16, 1536)" >>"$LOG/census.log" 2>&1 || status=1
      python3 tools/graph_census.py --model "$cmodel" --batch "$cbatch" --engine "$cengine" \
        --json "$LOG/census_${cengine}_b$cbatch.json" >>"$LOG/census.log" 2>&1 || status=1
      grep -vE '^(\(|INFO|WARNING|DEBUG)' "$LOG/census.log" | tail -60 ;;
    serve)  # #16: `vllm serve` against mlx_lm.server on bench_gpu's model, concurrency 1 / 8 / 32
      local smodel=models/bench-llama-16x1536-bf16
      python3 -c "import sys; sys.path.insert(0, 'tools'); import bench_gpu; \
bench_gpu.make_model('$smodel', 16, 1536)" >"$LOG/serve.log" 2>&1 || status=1
      timeout -k 10 "${KIT_ITEM_S:-560}" python3 tools/bench_serve.py --model "$smodel" \
        --json "$LOG/serve.json" >>"$LOG/serve.log" 2>&1 || status=1
      tail -30 "$LOG/serve.log" ;;
    bench|bench:*)
      local engines=()
      [ "$item" != bench ] && engines=(--engines "${item#bench:}")
      # --deadline: engines that would not finish in time are reported skipped, and the JSON is
      # rewritten after each engine (the ninth visit lost a whole bench to an outer timeout)
      python3 tools/bench_gpu.py --json "$LOG/bench_gpu.json" "${engines[@]}" \
        --deadline "${KIT_ITEM_S:-560}" >"$LOG/bench.log" 2>&1 || status=1
      cat "$LOG/bench.log" ;;
    *) echo "unknown selection item: $item"; return 2 ;;
  esac
  echo "=== $item: rc=$status, $((SECONDS - t0)) s"
  return "$status"
}

save_out() {  # at most 8 files come back: the JSON reports, and every log in one archive
  cp "$LOG"/*.json "$OUT"/ 2>/dev/null || true
  tar czf "$OUT/logs.tgz" -C "$LOG" . || true
}

# Items run one after another; items joined by '+' (tests+conformance) run side by side.
run_selection() {
  cd "$ROOT"
  local status=0 group item pids items
  for group in "$@"; do
    pids=()
    IFS=+ read -ra items <<<"$group"  # only '+' separates: a -k EXPR may hold spaces
    for item in "${items[@]}"; do
      run_item "$item" >"$LOG/console-${item%%:*}.txt" 2>&1 &
      pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || status=1; done
    for item in "${items[@]}"; do echo "=== $item"; cat "$LOG/console-${item%%:*}.txt"; done
    save_out  # after each group too: a later item cut off by the call's limit loses only itself
  done
  return "$status"
}

case "${1:-}" in
  stage) stage ;;
  stage-vllm) stage_vllm ;;
  hold) hold ;;
  run)
    shift
    : "${OUT:?run on the device machine, where \$OUT is set}"
    export PYTHONUNBUFFERED=1
    LOG="$KIT/logs"; rm -rf "$LOG"; mkdir -p "$LOG"
    trap save_out EXIT
    setup_device
    run_selection "$@" ;;
  *) sed -n '2,31p' "${BASH_SOURCE[0]}"; exit 2 ;;
esac
