"""Every multi-LoRA backend against `TorchReferenceBackend` and against peft, on one table of shapes.

On a machine without CUDA the Triton kernels run in Triton's CPU interpreter (`tests/conftest.py`
sets TRITON_INTERPRET=1 before anything imports triton); with CUDA the `gpu`-marked copies of the
same checks run the compiled kernels, in float32, bfloat16 and float16. A third check compiles the
kernels for a real GPU target (sm_90, bf16 and fp32, both forms) on the CPU: the interpreter alone
accepts some programs the compiler rejects.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from routing.lora import FusedLoraModel, SlotGroupedBackend, TorchReferenceBackend, get_backend
from routing.lora.backend import CpuLoraBackend, DenseSlotsBackend
from routing.lora.triton_backend import TritonBackend, interpreting
from test_fused_lora import CASES, case_adapters, make_base, make_tokenizer, tokens

CUDA = torch.cuda.is_available()
needs_interpreter = pytest.mark.skipif(not interpreting(), reason="Triton is compiling for CUDA in this process "
                                       "(TRITON_INTERPRET unset); the gpu-marked tests cover the kernels")
on_cuda = pytest.mark.skipif(not CUDA or interpreting(), reason="needs CUDA and compiled (not interpreted) Triton")

# (B, T, K, slots, max rank, ranks of the slots, in, out): padding entries, bare-base rows, ragged
# ranks zero-padded to the slot rank, in/out not multiples of the kernels' blocks, T = 1 and T > 1.
SHAPES = {
    "decode_k1": (5, 1, 1, 4, 8, (8, 4, 1, 8), 24, 40),
    "decode_k3_padded": (6, 1, 3, 5, 16, (16, 3, 8, 16, 5), 70, 33),
    "decode_wide": (3, 1, 2, 3, 8, (8, 8, 2), 130, 150),
    "decode_split_k": (3, 1, 2, 3, 8, (8, 5, 8), 600, 40),  # in > 512: the decode shrink splits in 2
    "prefill_k1": (3, 17, 1, 3, 16, (16, 7, 1), 40, 72),
    "prefill_k3": (4, 20, 3, 4, 8, (8, 2, 5, 8), 66, 24),
    "prefill_long": (2, 40, 2, 2, 4, (4, 3), 32, 130),
}


def make_case(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0):
    """Stacks, routing and inputs for SHAPES[name]; row 0 is a bare-base row, row 1 mixes in padding."""
    b, t, k, slots, max_rank, ranks, d_in, d_out = SHAPES[name]
    g = torch.Generator().manual_seed(seed)
    a_stack, b_stack = torch.zeros(slots, max_rank, d_in), torch.zeros(slots, d_out, max_rank)
    for i, r in enumerate(ranks):
        a_stack[i, :r] = torch.randn(r, d_in, generator=g) / d_in ** 0.5
        b_stack[i, :, :r] = torch.randn(d_out, r, generator=g)
    scale = torch.rand(slots, generator=g) * 2 + 0.1
    indices = torch.stack([torch.randperm(slots, generator=g)[:k] for _ in range(b)])
    indices[0] = -1
    if k > 1:
        indices[1, -1] = -1
    weights = torch.randn(b, k, generator=g)
    x, y = torch.randn(b, t, d_in, generator=g), torch.randn(b, t, d_out, generator=g)
    to = lambda v: v.to(device=device, dtype=dtype)  # noqa: E731
    return dict(y=to(y), x=to(x), a_stack=to(a_stack), b_stack=to(b_stack), scale=scale.to(device),
                indices=indices.to(device), weights=weights.to(device))


def reference(case: dict) -> torch.Tensor:
    """TorchReferenceBackend in float32 on the same (possibly bf16-rounded) inputs."""
    f = {k: v.float() if v.is_floating_point() else v for k, v in case.items()}
    return TorchReferenceBackend().add_lora(f["y"].clone(), f["x"], f["a_stack"], f["b_stack"], f["scale"],
                                            f["indices"], f["weights"])


def check(backend, case: dict, atol: float, rtol: float) -> None:
    y0 = case["y"].clone()
    got = backend.add_lora(case["y"].clone(), case["x"], case["a_stack"], case["b_stack"], case["scale"],
                           case["indices"], case["weights"])
    assert got.dtype == y0.dtype and got.shape == y0.shape
    torch.testing.assert_close(got.float(), reference(case), atol=atol, rtol=rtol)
    assert torch.equal(got[0], y0[0]), "a bare-base row must come back bit-identical"
    assert not torch.equal(got[1:], y0[1:]), "no row changed: the case is vacuous"


# ---- the table -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
def test_grouped_matches_reference(shape):
    check(SlotGroupedBackend(), make_case(shape), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_dense_matches_reference(shape):
    check(DenseSlotsBackend(), make_case(shape), atol=1e-5, rtol=1e-5)


def test_dense_sees_slot_changes():
    """The dense backend keeps the B stack's (L*R, out) layout between calls: a slot written in place
    afterwards must be seen, not served from the kept layout."""
    backend = DenseSlotsBackend()
    case = make_case("decode_k1")
    check(backend, case, atol=1e-5, rtol=1e-5)
    case["b_stack"].mul_(3.0)
    check(backend, case, atol=1e-5, rtol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_interpreted_matches_reference(shape):
    check(TritonBackend(), make_case(shape), atol=1e-5, rtol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("shape", [s for s in SHAPES if SHAPES[s][1] == 1] + ["prefill_k3"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_interpreted_half_precision(shape, dtype):
    """fp16 in both forms; bf16 only in the decode form on the interpreter: triton 3.9's interpreter
    multiplies bf16 `tl.dot` operands as raw 16-bit integers (`create_dot` has no bf16 conversion),
    so the segmented form's bf16 result is garbage there. The gpu test covers bf16 prefill."""
    if dtype == torch.bfloat16 and SHAPES[shape][1] > 1:
        pytest.skip("triton 3.9 interpreter: tl.dot on bf16 is wrong (compiled kernels are checked on CUDA)")
    check(TritonBackend(), make_case(shape, dtype), atol=HALF_TOL[dtype], rtol=HALF_TOL[dtype])


# Half-precision tolerance. Inputs are rounded to the half type *before* the fp32 reference sees them,
# and the kernels accumulate in fp32 (h is kept in fp32), so the only rounding left is the final store
# of y: |error| <= 1/2 ulp of y, i.e. 2^-9 relative for bf16 (8 significant bits) and 2^-12 for fp16,
# plus fp32 summation-order noise. We allow two ulps: 2^-7 (bf16), 2^-10 (fp16).
HALF_TOL = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def test_triton_no_adapter_anywhere_is_a_no_op():
    case = make_case("decode_k1")
    case["indices"][:] = -1
    y = case["y"].clone()
    out = TritonBackend().add_lora(y, case["x"], case["a_stack"], case["b_stack"], case["scale"],
                                   case["indices"], case["weights"])
    assert torch.equal(out, case["y"])


# ---- peft exactness through the fused model -----------------------------------------------------

@pytest.fixture(scope="module")
def peft_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("backend-adapters")
    tok = make_tokenizer()
    base = make_base(len(tok))
    peft_models, paths = case_adapters(base, root)
    return dict(tok=tok, base=base, peft=peft_models, paths=paths)


def fused_with(world, backend, device="cpu"):
    fused = FusedLoraModel(copy.deepcopy(world["base"]).to(device), max_loras=len(world["paths"]), max_rank=8,
                           backend=backend)
    for name, p in world["paths"].items():
        fused.load_adapter(name, p)
    return fused


def peft_exactness(world, backend, device="cpu", tol=1e-4, cases=tuple(CASES)):
    """The `cases` adapters alone (K=1), and a mixed batch with a bare row, against peft (float32)."""
    fused = fused_with(world, backend, device)
    ids = tokens(3, 7, len(world["tok"]), seed=1)
    for name in cases:
        with torch.no_grad():
            want = world["peft"][name](input_ids=ids).logits
            with fused.routing([[(name, 1.0)]] * 3):
                got = fused(input_ids=ids.to(device)).logits.cpu()
        assert (got - want).abs().max().item() <= tol, name
    names = ["plain", None, "rslora", "qv_only"]
    ids = tokens(len(names), 5, len(world["tok"]), seed=2)
    with torch.no_grad(), fused.routing([[(n, 1.0)] if n else [] for n in names]):
        got = fused(input_ids=ids.to(device)).logits.cpu()
    for b, n in enumerate(names):
        with torch.no_grad():
            alone = (world["peft"][n] if n else world["base"])(input_ids=ids[b:b + 1]).logits[0]
        assert (got[b] - alone).abs().max().item() <= tol, f"row {b} ({n})"


def test_grouped_peft_exactness(peft_world):
    peft_exactness(peft_world, SlotGroupedBackend())


def test_dense_peft_exactness(peft_world):
    peft_exactness(peft_world, DenseSlotsBackend())


@needs_interpreter
def test_triton_interpreted_peft_exactness(peft_world):
    """Three cases that between them cover alpha/r scaling, rank and alpha patterns, and per-layer
    selection (the interpreter costs ~0.1 s per launch); every case runs compiled on CUDA."""
    peft_exactness(peft_world, TritonBackend(), cases=("plain", "rank_alpha_pattern", "layer1_only"))


# ---- selection, and the kernels compiled for real GPUs ---------------------------------------------

def test_get_backend_on_cpu_is_the_measured_rule():
    backend = get_backend("cpu")
    assert isinstance(backend, CpuLoraBackend)
    case = make_case("prefill_k3")
    check(backend, case, atol=1e-5, rtol=1e-5)
    pick = lambda rows, k, r, d, tokens=1, reused=False, slots=64: type(backend.choose(  # noqa: E731
        torch.zeros(rows, k, dtype=torch.long), slots, r, d[0], d[1], tokens, reused=reused)).__name__
    smol_gate = (576, 1536)
    assert pick(64, 3, 8, smol_gate, slots=16) == "DenseSlotsBackend"   # 128 columns, 19 M MACs: dense
    assert pick(320, 3, 8, smol_gate, slots=16) == "SlotGroupedBackend"  # 94 M MACs: past dense's bound
    assert pick(16, 1, 8, smol_gate) == "TorchReferenceBackend"      # 1.0 MiB: the gather is faster
    assert pick(16, 3, 8, smol_gate) == "SlotGroupedBackend"         # 3.1 MiB, new routing each step
    assert pick(16, 3, 8, smol_gate, reused=True) == "TorchReferenceBackend"  # a static batch keeps it
    assert pick(64, 3, 16, smol_gate, reused=True) == "SlotGroupedBackend"    # 24.8 MiB: never held
    assert pick(64, 3, 16, smol_gate, tokens=64) == "TorchReferenceBackend"   # prefill: K*R <= T


COMPILE = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from routing.lora.triton_backend import _expand_kernel, _shrink_kernel
    for arch in (90,):
        for dt in ("bf16", "fp32"):
            for dot, bm in ((True, 16), (False, 1)):
                sig = dict(zip(_shrink_kernel.arg_names, [f"*{dt}", f"*{dt}", "*i64", "*fp32", "*fp32", "*fp32"]
                               + ["i32"] * 14 + ["constexpr"] * 5))
                triton.compile(ASTSource(_shrink_kernel, sig, constexprs=dict(
                    BLOCK_M=bm, BLOCK_K=64, BLOCK_R=16, USE_DOT=dot, DOT_PRECISION="ieee" if dt == "fp32" else "tf32")),
                    target=GPUTarget("cuda", arch, 32))
                sig = dict(zip(_expand_kernel.arg_names, ["*fp32", f"*{dt}", "*i64", f"*{dt}"]
                               + ["i32"] * 13 + ["constexpr"] * 5))
                triton.compile(ASTSource(_expand_kernel, sig, constexprs=dict(
                    BLOCK_M=bm, BLOCK_N=64, BLOCK_R=16, BLOCK_KK=4, USE_DOT=dot)), target=GPUTarget("cuda", arch, 32))
    print("compiled")
""")


def test_triton_kernels_compile_for_sm90(tmp_path):
    """Lowering to PTX and cubin (Triton's bundled ptxas) needs no GPU; a fresh process without
    TRITON_INTERPRET, since this one interprets."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


# ---- the same checks on CUDA --------------------------------------------------------------------------

@pytest.mark.gpu
@on_cuda
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_cuda_matches_reference(shape, dtype):
    tol = 1e-5 if dtype == torch.float32 else HALF_TOL[dtype]
    check(TritonBackend(), make_case(shape, dtype, "cuda"), atol=tol, rtol=tol)


@pytest.mark.gpu
@on_cuda
def test_triton_cuda_peft_exactness_and_selection(peft_world):
    assert isinstance(get_backend("cuda"), TritonBackend)
    peft_exactness(peft_world, get_backend("cuda"), device="cuda", tol=1e-4)
