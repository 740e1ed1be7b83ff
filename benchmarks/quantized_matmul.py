"""Weight-only quantized matmuls (llmasos.models.quantization) against bf16 on CPU, on Qwen2-0.5B's shapes: one
decoder layer's seven projections (hidden 896, intermediate 4864, 2 KV heads) and the output head (vocab 151936), at
1 row (single-stream decode) and 32 rows (a decode batch). Median (and min) of repeats; speed-up over bf16 F.linear;
GB/s of weight bytes streamed per call. bf16 oneDNN is the engine's packed bf16 path (llmasos.models.packed_linear).

    nice python benchmarks/quantized_matmul.py [--rows 1 32] [--repeats 20] [--threads N] [--skip-head]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from llmasos.models.packed_linear import PackedLinear, packing_supported
from llmasos.models.quantization import QuantizedLinear

HIDDEN, INTERMEDIATE, KV_DIM, VOCAB = 896, 4864, 128, 151936
LAYER_SHAPES = [(HIDDEN, HIDDEN), (KV_DIM, HIDDEN), (KV_DIM, HIDDEN), (HIDDEN, HIDDEN),  # q, k, v, o
                (INTERMEDIATE, HIDDEN), (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]  # gate, up, down
HEAD_SHAPES = [(VOCAB, HIDDEN)]


class PlainLinear(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.in_features = weight, weight.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def weight_bytes(module: nn.Module) -> int:
    if isinstance(module, PlainLinear):
        return module.weight.numel() * module.weight.element_size()
    if isinstance(module, PackedLinear):
        return module.num_weight_bytes
    return sum(t.numel() * t.element_size() for t in module.buffers())


def build(variant: str, weights: list[torch.Tensor]) -> list[nn.Module]:
    if variant == "bf16 F.linear":
        return [PlainLinear(w) for w in weights]
    if variant == "bf16 oneDNN":
        return [PackedLinear(_linear(w)) for w in weights]
    method, _, group = variant.partition(" g")
    return [QuantizedLinear.from_float(w, None, method, int(group or 32)) for w in weights]


def _linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


def time_set(modules: list[nn.Module], rows: int, repeats: int) -> tuple[float, float]:
    """(median, min) seconds to run every module of the set once on a fresh (rows, in) bf16 input."""
    inputs = [torch.randn(rows, module.in_features, dtype=torch.bfloat16) for module in modules]
    with torch.no_grad():
        for _ in range(3):  # warm-up
            for module, x in zip(modules, inputs, strict=True):
                module(x)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            for module, x in zip(modules, inputs, strict=True):
                module(x)
            samples.append(time.perf_counter() - start)
    return statistics.median(samples), min(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-head", action="store_true", help="only the decoder layer's projections")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = ["bf16 F.linear"] + (["bf16 oneDNN"] if packing_supported(torch.bfloat16, torch.device("cpu")) else [])
    variants += ["int8", "int4 g32", "int4 g64", "int4 g128"]
    sets = [("decoder layer (7 projections)", LAYER_SHAPES)] + ([] if args.skip_head else [("lm_head", HEAD_SHAPES)])
    table = Table(title=f"weight-only quantized matmul, CPU, {torch.get_num_threads()} threads, torch "
                        f"{torch.__version__}", header_style="bold")
    for column in ("set", "rows", "kernel", "weights MB", "median ms", "min ms", "speed-up", "GB/s"):
        table.add_column(column, justify="left" if column in ("set", "kernel") else "right")
    generator = torch.Generator().manual_seed(0)
    for set_name, shapes in sets:
        weights = [(torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16) for shape in shapes]
        results: dict[tuple[str, int], tuple[float, float, int]] = {}
        for variant in variants:
            modules = build(variant, weights)
            size = sum(weight_bytes(m) for m in modules)
            for rows in args.rows:
                median, fastest = time_set(modules, rows, args.repeats)
                results[(variant, rows)] = (median, fastest, size)
            del modules
        for rows in args.rows:
            baseline = results[("bf16 F.linear", rows)][0]
            for variant in variants:
                median, fastest, size = results[(variant, rows)]
                table.add_row(set_name, str(rows), variant, f"{size / 1e6:.1f}", f"{median * 1e3:.3f}",
                              f"{fastest * 1e3:.3f}", f"{baseline / median:.2f}x", f"{size / median / 1e9:.1f}")
            table.add_section()
    Console(width=160).print(table)
    print("int8 runs torch._weight_int8pack_mm up to 12 rows and converts the weight for a bf16 GEMM above (the "
          "kernel's time grows linearly with rows); int4 always runs torch._weight_int4pack_mm_for_cpu.")


if __name__ == "__main__":
    main()
