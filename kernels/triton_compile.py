"""Compile every Triton kernel for an NVIDIA architecture without a GPU: a CI check.

Tests on CPU run the kernels through Triton's interpreter, which never lowers them to GPU code, so
a kernel can pass there and still fail to compile (dot shapes, types, control flow), need more
shared memory than the card has, or spill registers. This runs the real compiler down to a cubin
(Triton ships `ptxas`) with the tiling `kernels.triton_attention` launches, and the argument
specialization the launcher would see at run time (16-byte aligned pointers and strides).

Usage: python -m kernels.triton_compile [--arch 90] [--dtypes fp16 bf16 fp32] [--registers]

Run it without `TRITON_INTERPRET` set: under the interpreter there is nothing to compile.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import triton_kernels as _k
from kernels.triton_attention import WRITE_KV_ELEMENTS, tiling
from kernels.triton_matmul import config_for

__all__ = ["CompiledKernel", "compile_all"]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True, slots=True)
class CompiledKernel:
    name: str
    dtype: str
    variant: str
    num_warps: int
    shared_bytes: int
    seconds: float
    registers: int | None = None  # with `registers=True`
    spill_bytes: int | None = None


def _signature(fn: Any, dtype: str, constexprs: dict[str, Any]) -> dict[str, str]:
    """Triton types from argument names: `*_ptr` are pointers (`part_*` and `state` float32
    workspaces, `block_tables`/`seq_lens`/`query_start_loc`/`tiles`/`resume`/`groups`/`members`
    int32, `slot` int64, the rest `dtype`),
    `qk_scale` is float32, every other runtime argument int32."""
    special = {
        "part_out_ptr": "*fp32",
        "part_lse_ptr": "*fp32",
        "block_tables_ptr": "*i32",
        "seq_lens_ptr": "*i32",
        "query_start_loc_ptr": "*i32",
        "tiles_ptr": "*i32",
        "state_ptr": "*fp32",
        "resume_ptr": "*i32",
        "groups_ptr": "*i32",
        "members_ptr": "*i32",
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


def _aligned(fn: Any) -> dict[tuple[int, ...], list[list[Any]]]:
    """Divisibility by 16, as the launcher specializes it for aligned pointers and for strides of
    a power-of-two head_dim (not the block-table row stride, which is the table's width)."""
    return {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if name.endswith("_ptr") or (name.startswith("stride_") and name != "stride_bt")
    }


Variant = tuple[Any, str, int, dict[str, Any]]


def _variants(dtype: str, group: int, head_dim: int, block_size: int) -> list[Variant]:
    """(kernel, variant name, num_warps, constexprs) as `kernels.triton_attention` (for 8 KV
    heads) and `kernels.triton_matmul` launch them."""
    decode_cfg, unified_cfg = tiling(DTYPES[dtype])
    dot_f32 = dtype == "fp32"
    block_d = max(16, triton.next_power_of_2(head_dim))
    heads, hd = 8 * group, 8 * head_dim
    decode = dict(
        NUM_HEADS=heads,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=block_d,
        BLOCK_N=decode_cfg.block_n,
        DOT_F32=dot_f32,
    )
    write = dict(
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        HD=hd,
        BLOCK_T=max(1, WRITE_KV_ELEMENTS // triton.next_power_of_2(hd)),
        BLOCK_HD=triton.next_power_of_2(hd),
    )
    merge = dict(
        NUM_HEADS=heads,
        HEAD_DIM=head_dim,
        BLOCK_SPLITS=decode_cfg.max_splits,
        BLOCK_D=block_d,
    )
    shared = dict(
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_M=unified_cfg.block_m,
        BLOCK_D=block_d,
        BLOCK_N=unified_cfg.block_n,
        DOT_F32=dot_f32,
    )
    unified = dict(shared, BLOCK_Q=unified_cfg.block_q(group))
    matmul_cfg = config_for(DTYPES[dtype])
    matmul = dict(
        HAS_BIAS=True,
        BLOCK_M=matmul_cfg.block_m,
        BLOCK_N=matmul_cfg.block_n,
        BLOCK_K=matmul_cfg.block_k,
        DOT_F32=dot_f32,
    )
    warps = decode_cfg.num_warps
    return [
        (_k._linear_kernel, "", matmul_cfg.num_warps, matmul),
        (_k._write_kv_kernel, "", 4, write),
        (_k._unified_kernel, "", unified_cfg.num_warps, dict(unified, RESUME=False)),
        (_k._unified_kernel, "resume", unified_cfg.num_warps, dict(unified, RESUME=True)),
        (_k._shared_prefix_kernel, "", unified_cfg.num_warps, shared),
        (_k._decode_kernel, "direct", warps, dict(decode, SPLIT=False)),
        (_k._decode_kernel, "split", warps, dict(decode, SPLIT=True)),
        (_k._merge_kernel, "", 4, merge),
    ]


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill store bytes) reported by `ptxas -v` for one kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        cmd = [get_ptxas(arch).path, "-v", "--gpu-name", gpu, f.name, "-o", "/dev/null"]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return int(registers.group(1)) if registers else -1, int(spills.group(1)) if spills else 0


def compile_all(
    arch: int = 90,
    dtypes: tuple[str, ...] = ("fp16", "bf16"),
    group: int = 4,
    head_dim: int = 128,
    block_size: int = 16,
    registers: bool = False,
) -> list[CompiledKernel]:
    """Compile each kernel variant for `sm_{arch}` and return what each one took.

    Args:
        registers: also run `ptxas -v` on each kernel for its register and spill counts.

    Raises:
        RuntimeError: when the kernels were built for the interpreter.
        triton.CompilationError (or the backend's error) when a kernel does not compile.
    """
    if _k.INTERPRETED:
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    target = GPUTarget("cuda", arch, 32)
    done = []
    for dtype in dtypes:
        for fn, variant, warps, constexprs in _variants(dtype, group, head_dim, block_size):
            start = time.perf_counter()
            src = ASTSource(fn, _signature(fn, dtype, constexprs), constexprs, _aligned(fn))
            compiled = triton.compile(src, target=target, options={"num_warps": warps})
            seconds = time.perf_counter() - start
            usage = _ptxas_usage(compiled.asm["ptx"], arch) if registers else (None, None)
            shared = compiled.metadata.shared
            done.append(CompiledKernel(fn.__name__, dtype, variant, warps, shared, seconds, *usage))
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    ap.add_argument("--dtypes", nargs="+", default=["fp16", "bf16", "fp32"], choices=DTYPES)
    ap.add_argument("--group", type=int, default=4, help="query heads per KV head")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--registers", action="store_true", help="report registers and spills")
    args = ap.parse_args()
    kernels = compile_all(
        args.arch, tuple(args.dtypes), args.group, args.head_dim, args.block_size, args.registers
    )
    for k in kernels:
        line = f"{k.name:<22}{k.dtype:<6}{k.variant:<8}warps {k.num_warps}  "
        line += f"smem {k.shared_bytes:>7} B  {k.seconds:5.1f}s"
        if k.registers is not None:
            line += f"  regs {k.registers:>3}  spills {k.spill_bytes} B"
        print(line)


if __name__ == "__main__":
    main()
