"""vLLM's compiler interface for device "mlx": each graph piece becomes one MLX function.

vLLM's own compilation (CompilationMode.VLLM_COMPILE) captures the model forward once with
dynamo and hands it to a ``CompilerInterface`` -- whole, as the platform sets no splitting ops,
or split at the ``splitting_ops`` a user names. This one lowers the graph with
``torch_mlx.compile`` -- the same lowering table as eager mode: runs of ops become
``mx.compile``d segments, and vLLM's attention op, whose lowering reads the step's metadata
(vllm_metal/ops/attention.py), runs between them in the same lazy MLX graph, KV-cache write
included, so a forward is evaluated once. Pieces split by the user get attention eagerly
between them.

Nothing is cached on disk: tracing a piece into MLX costs milliseconds, and MLX keeps its
compiled functions in memory.
"""
from __future__ import annotations

import functools
import hashlib
import os
from typing import Any, Callable

import torch.fx as fx
from vllm.compilation.compiler_interface import CompilerInterface


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """What vLLM's compilation caches must be keyed by beside its own factors: the MLX version
    and the code that traces and lowers a graph (torch_mlx's and vllm_metal's Python files, the
    extension's identity). vLLM keys its on-disk AOT artifacts by its config, not by the
    compiler, and a package version does not change between two checkouts: a graph traced by
    older code (a rotary embedding then a module buffer, now numbers) would otherwise be loaded
    and fail."""
    import mlx.core as mx
    import torch_mlx

    import vllm_metal

    roots = [os.path.dirname(os.path.abspath(p.__file__)) for p in (torch_mlx, vllm_metal)]
    return tree_digest(roots, f"mlx {mx.__version__}")


def tree_digest(roots: list[str], salt: str = "") -> str:
    """A digest of the .py files (contents) and native extensions (size, mtime) under roots."""
    digest = hashlib.sha256(salt.encode())
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                path = os.path.join(folder, name)
                if name.endswith(".py"):
                    with open(path, "rb") as f:
                        content = f.read()
                elif name.endswith((".so", ".dylib", ".pyd")):
                    stat = os.stat(path)
                    content = f"{stat.st_size} {stat.st_mtime_ns}".encode()
                else:
                    continue
                digest.update(os.path.relpath(path, root).encode() + b"\0" + content)
    return digest.hexdigest()[:16]


class MlxCompiler(CompilerInterface):
    name = "mlx"
    pieces_compiled = 0  # in this process (tests check that compilation happened)

    def compute_hash(self, vllm_config) -> str:
        return f"mlx-compiler-{source_hash()}"

    def compile(self, graph: fx.GraphModule, example_inputs: list[Any],
                compiler_config: dict[str, Any], compile_range, key: str | None = None,
                ) -> tuple[Callable[..., Any] | None, Any | None]:
        from torch_mlx.compile import mlx_backend

        compiled = mlx_backend(graph, example_inputs)
        MlxCompiler.pieces_compiled += 1
        return compiled, None
