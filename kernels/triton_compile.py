"""Compile every Triton kernel for an NVIDIA architecture without a GPU: a CI check.

Tests on CPU run the kernels through Triton's interpreter, which never lowers them to GPU code, so
a kernel can pass there and still fail to compile (dot shapes, types, control flow) or need more
shared memory than the card has. This runs the real compiler down to a cubin (Triton ships
`ptxas`) for typical shapes.

Usage: python -m kernels.triton_compile [--arch 90] [--dtypes fp16 bf16 fp32]

Run it without `TRITON_INTERPRET` set: under the interpreter there is nothing to compile.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import triton_kernels as _k

__all__ = ["CompiledKernel", "compile_all"]


@dataclass(frozen=True, slots=True)
class CompiledKernel:
    name: str
    dtype: str
    variant: str
    shared_bytes: int
    seconds: float


def _signature(fn: Any, dtype: str, constexprs: dict[str, Any]) -> dict[str, str]:
    """Triton types from argument names: `*_ptr` are pointers (`part_*` float32 workspaces,
    `block_tables`/`seq_lens`/`query_start_loc` int32, `slot` int64, the rest `dtype`),
    `qk_scale` is float32, every other runtime argument int32."""
    special = {
        "part_out_ptr": "*fp32",
        "part_lse_ptr": "*fp32",
        "block_tables_ptr": "*i32",
        "seq_lens_ptr": "*i32",
        "query_start_loc_ptr": "*i32",
        "slot_ptr": "*i64",
    }
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = special.get(name, "*" + dtype)
        else:
            sig[name] = "fp32" if name == "qk_scale" else "i32"
    return sig


Variant = tuple[Any, str, dict[str, Any]]


def _variants(dtype: str, group: int, head_dim: int, block_size: int) -> list[Variant]:
    """(kernel, variant name, constexprs) as `kernels.triton_attention` launches them."""
    dot_f32 = dtype == "fp32"
    block_d = triton.next_power_of_2(head_dim)
    heads = 8 * group
    decode = dict(
        NUM_HEADS=heads,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        PARTITION=512,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=block_d,
        BLOCK_N=64,
        DOT_F32=dot_f32,
    )
    return [
        (
            _k._write_kv_kernel,
            "",
            dict(
                HEAD_DIM=head_dim,
                BLOCK_SIZE=block_size,
                HD=8 * head_dim,
                BLOCK_T=4,
                BLOCK_HD=triton.next_power_of_2(8 * head_dim),
            ),
        ),
        (_k._decode_kernel, "direct", dict(decode, SPLIT=False)),
        (_k._decode_kernel, "split", dict(decode, SPLIT=True)),
        (
            _k._merge_kernel,
            "",
            dict(
                NUM_HEADS=heads, HEAD_DIM=head_dim, PARTITION=512, BLOCK_SPLITS=64, BLOCK_D=block_d
            ),
        ),
        (
            _k._prefill_kernel,
            "",
            dict(
                GROUP=group,
                HEAD_DIM=head_dim,
                BLOCK_SIZE=block_size,
                BLOCK_M=64,
                BLOCK_D=block_d,
                BLOCK_N=64,
                DOT_F32=dot_f32,
            ),
        ),
    ]


def compile_all(
    arch: int = 90,
    dtypes: tuple[str, ...] = ("fp16", "bf16"),
    group: int = 4,
    head_dim: int = 128,
    block_size: int = 16,
) -> list[CompiledKernel]:
    """Compile each kernel variant for `sm_{arch}` and return what each one took.

    Raises:
        RuntimeError: when the kernels were built for the interpreter.
        triton.CompilationError (or the backend's error) when a kernel does not compile.
    """
    if _k.INTERPRETED:
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    target = GPUTarget("cuda", arch, 32)
    done = []
    for dtype in dtypes:
        for fn, variant, constexprs in _variants(dtype, group, head_dim, block_size):
            start = time.perf_counter()
            src = ASTSource(fn, _signature(fn, dtype, constexprs), constexprs)
            compiled = triton.compile(src, target=target, options={"num_warps": 4})
            name = fn.__name__
            seconds = time.perf_counter() - start
            done.append(CompiledKernel(name, dtype, variant, compiled.metadata.shared, seconds))
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    ap.add_argument("--dtypes", nargs="+", default=["fp16", "bf16", "fp32"])
    args = ap.parse_args()
    for k in compile_all(args.arch, tuple(args.dtypes)):
        print(f"{k.name:<18}{k.dtype:<6}{k.variant:<8}smem {k.shared_bytes:>7} B  {k.seconds:.1f}s")


if __name__ == "__main__":
    main()
