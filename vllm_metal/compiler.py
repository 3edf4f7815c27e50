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

from typing import Any, Callable

import torch.fx as fx
from vllm.compilation.compiler_interface import CompilerInterface


class MlxCompiler(CompilerInterface):
    name = "mlx"
    pieces_compiled = 0  # in this process (tests check that compilation happened)

    def compute_hash(self, vllm_config) -> str:
        from importlib.metadata import version

        return f"torch-mlx-{version('torch-mlx')}-mlx-{version('mlx')}"

    def compile(self, graph: fx.GraphModule, example_inputs: list[Any],
                compiler_config: dict[str, Any], compile_range, key: str | None = None,
                ) -> tuple[Callable[..., Any] | None, Any | None]:
        from torch_mlx.compile import mlx_backend

        compiled = mlx_backend(graph, example_inputs)
        MlxCompiler.pieces_compiled += 1
        return compiled, None
