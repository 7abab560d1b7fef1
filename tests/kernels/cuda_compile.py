"""Compile graft's Triton kernels for an NVIDIA Hopper target without a GPU, from the Python
source through PTX to cubin (triton ships ptxas). Run as a module with ``TRITON_INTERPRET``
unset: under the interpreter the kernels are not JIT functions and compile nothing.

    python -m tests.kernels.cuda_compile   # one line per kernel and dtype, exit 1 on failure
"""

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.triton_fused import _fused_kernel
from kernels.triton_sgmv import _expand_kernel, _shrink_kernel

TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200
INDEX_POINTERS = ("tile_seg_ptr", "tile_row_ptr", "seg_starts_ptr", "seg_pages_ptr", "seg_rank_ptr")
KERNELS = (
    (_shrink_kernel, {"R_PAD": 16, "BLOCK_M": 32, "BLOCK_K": 64}),
    (_expand_kernel, {"R_PAD": 16, "BLOCK_M": 32, "BLOCK_N": 64}),
    (_fused_kernel, {"R_PAD": 16, "BLOCK_M": 32, "BLOCK_K": 64, "BLOCK_N": 128}),
)


def signature(fn, dtype: str, constants: dict) -> dict[str, str]:
    """Every argument's type as the launcher would see it: data in ``dtype``, the shrink
    output and scales in float32, index tables int32, the rest int32 scalars."""
    types = {name: f"*{dtype}" for name in ("x_ptr", "a_ptr", "b_ptr", "y_ptr")}
    types |= {name: "*i32" for name in INDEX_POINTERS}
    types |= {"v_ptr": "*fp32", "seg_scale_ptr": "*fp32"}
    return {
        name: "constexpr" if name in constants else types.get(name, "i32") for name in fn.arg_names
    }


def main() -> int:
    if not isinstance(_shrink_kernel, triton.runtime.JITFunction):
        print("TRITON_INTERPRET is set: nothing to compile", file=sys.stderr)
        return 1
    failed = 0
    for dtype in ("fp32", "bf16", "fp16"):
        for fn, blocks in KERNELS:
            constants = {**blocks, "IS_INTERPRETED": False}
            source = ASTSource(
                fn=fn, signature=signature(fn, dtype, constants), constexprs=constants
            )
            try:
                compiled = triton.compile(source, target=TARGET)
                print(f"{dtype} {fn.__name__} ok: {len(compiled.asm['cubin'])} bytes of cubin")
            except Exception as exc:  # every failure is reported, then the exit code says so
                failed += 1
                print(f"{dtype} {fn.__name__} FAILED: {type(exc).__name__}: {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
