"""Ahead-of-time compile check of every Triton kernel for sm_90a (H100/H200) and sm_80 (A100), no GPU.

    python -m megafast.kernels.aot_check [--arch 90 80] [--jobs N] [--markdown]

For each :class:`~megafast.kernels.aot_specs.LaunchSpec` (every launch training makes, at realistic
shapes) this specialises the arguments exactly as Triton's JIT does at a launch (its own binder:
16-byte-aligned pointers and integers divisible by 16 get ``tt.divisibility`` 16), compiles with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``, reads the dynamic shared
memory from the metadata and the registers and spill bytes from ``ptxas -v`` (the triton wheel's
own ptxas) on the PTX. None of these fail at compile time on a real GPU either (only at launch),
hence the explicit checks. A launch fails the check when it does not compile, needs more shared
memory than the GPU has (:data:`SHARED_LIMIT`), spills registers, or (sm_90a) uses ``tl.dot`` on
16-bit operands without lowering it to wgmma.

Launches that specialise identically are compiled once; the ptxas figures are read from the
compile's own ``ptxas -v`` log and cached by the compiled kernel's hash under Triton's cache
directory, so a second run only re-specialises and loads Triton's cached binaries.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import io
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Optional

SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes of dynamic shared memory per block (opt-in maximum)
ARCH_NAME = {90: "sm_90a", 80: "sm_80"}


@dataclass
class Result:
    """One compiled launch."""

    arch: str
    kernel: str
    shape: str
    dtype: str
    constexprs: str
    warps: int
    stages: int
    shared: int = 0
    registers: int = 0
    spill_bytes: int = 0  # spill stores + spill loads, bytes per thread
    wgmma: Optional[bool] = None  # None: not a dot kernel (or not sm_90a)
    error: str = ""

    def problems(self, capability: int) -> list[str]:
        """Why this launch would fail or be slow on the GPU (empty when it is clean)."""
        out = []
        if self.error:
            out.append(f"does not compile: {self.error}")
            return out
        if self.shared > SHARED_LIMIT[capability]:
            out.append(f"needs {self.shared} B shared memory > {SHARED_LIMIT[capability]}")
        if self.spill_bytes:
            out.append(f"spills {self.spill_bytes} B/thread")
        if self.wgmma is False:
            out.append("tl.dot on 16-bit operands without wgmma")
        return out


def _python_function(kernel):
    """(the plain Python function under a @triton.jit / autotune / interpreter wrapper, the
    @triton.jit options that change specialisation: do_not_specialize[_on_alignment])."""
    fn, options = kernel, {}
    while not callable(fn) or hasattr(fn, "fn"):
        for name in ("do_not_specialize", "do_not_specialize_on_alignment"):
            value = getattr(fn, name, None) or getattr(fn, "kwargs", {}).get(name)
            if value:
                options[name] = value
        fn = fn.fn
    return fn, options


@functools.lru_cache(maxsize=None)
def _jit_and_binder(kernel, capability: int):
    """One JITFunction and argument binder per kernel and target (building them parses the source)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    backend = make_backend(GPUTarget("cuda", capability, 32))
    fn, options = _python_function(kernel)
    jit = JITFunction(fn, **options)
    return jit, backend, create_function_from_signature(jit.signature, jit.params, backend)


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def ptxas_usage(ptx: str, arch: str, capability: int) -> tuple[int, int]:
    """(registers, spill bytes) of the kernel in ``ptx`` from the triton wheel's ``ptxas -v``."""
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run(
            [get_ptxas(capability).path, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True, check=True,
        )
    return parse_ptxas_log(proc.stderr + proc.stdout)


def parse_ptxas_log(log: str) -> tuple[int, int]:
    """(registers, spill store + load bytes per thread) from a ``ptxas -v`` log."""
    regs = max((int(x) for x in _PTXAS_RE["registers"].findall(log)), default=0)
    spills = sum(int(x) for x in _PTXAS_RE["spill_stores"].findall(log))
    spills += sum(int(x) for x in _PTXAS_RE["spill_loads"].findall(log))
    return regs, spills


def _cache_path(key: str) -> str:
    from triton import knobs

    root = os.path.join(knobs.cache.dir, "megafast_aot")
    os.makedirs(root, exist_ok=True)
    return os.path.join(root, key + ".json")


def specialize(spec, capability: int):
    """(JITFunction, signature, constexprs, attrs, options) exactly as Triton's JIT derives them at
    this launch (its own binder: pointer alignment, integers divisible by 16 or equal to 1)."""
    jit, backend, binder = _jit_and_binder(spec.kernel, capability)
    kwargs = dict(spec.constexprs, num_warps=spec.num_warps, num_stages=spec.num_stages)
    bound, specialization, options = binder(*spec.args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    return jit, signature, constexprs, attrs, options


def compile_key(spec, capability: int) -> str:
    """Launches with equal keys compile to the same binary (same specialisation and options)."""
    jit, signature, constexprs, attrs, options = specialize(spec, capability)
    return repr((capability, jit.fn.__module__, jit.fn.__name__, sorted(signature.items()),
                 sorted((k, repr(v)) for k, v in constexprs.items()), sorted(attrs.items()),
                 sorted(options.__dict__.items())))


def compile_spec(spec, capability: int) -> Result:
    """Specialise, compile and measure one launch for compute capability ``capability``."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    arch = ARCH_NAME[capability]
    res = Result(arch, spec.name, spec.shape, spec.dtype,
                 " ".join(f"{k}={v}" for k, v in spec.constexprs.items() if k.startswith("BLOCK")),
                 spec.num_warps, spec.num_stages)
    try:
        jit, signature, constexprs, attrs, options = specialize(spec, capability)
        log = io.StringIO()  # a fresh compile prints its own ptxas -v log: read it instead of rerunning ptxas
        saved = knobs.nvidia.dump_ptxas_log
        knobs.nvidia.dump_ptxas_log = True
        try:
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(ASTSource(jit, signature, constexprs, attrs),
                                          target=GPUTarget("cuda", capability, 32), options=options.__dict__)
        finally:
            knobs.nvidia.dump_ptxas_log = saved
        res.shared = int(compiled.metadata.shared)
        cache = _cache_path(f"{compiled.metadata.hash}_{arch}")
        if os.path.exists(cache):
            with open(cache) as f:
                res.registers, res.spill_bytes = json.load(f)
        else:
            if _PTXAS_RE["registers"].search(log.getvalue()):
                res.registers, res.spill_bytes = parse_ptxas_log(log.getvalue())
            else:  # Triton's cache held the binary: no log printed
                res.registers, res.spill_bytes = ptxas_usage(compiled.asm["ptx"], arch, capability)
            with open(cache + ".tmp", "w") as f:
                json.dump([res.registers, res.spill_bytes], f)
            os.replace(cache + ".tmp", cache)
        if spec.uses_dot and capability == 90 and spec.dtype in ("bf16", "fp16"):
            res.wgmma = "wgmma.mma_async" in compiled.asm["ptx"]
    except Exception as e:  # noqa: BLE001 - reported as a failed launch, with the message
        res.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    return res


def _run_one(item: tuple[int, int]) -> Result:
    capability, index = item
    from megafast.kernels.aot_specs import launch_specs

    return compile_spec(launch_specs(capability)[index], capability)


def check_all(capabilities=(90, 80), jobs: Optional[int] = None, only: Optional[str] = None) -> list[Result]:
    """Compile every launch for every capability, each distinct specialisation once (``jobs``
    processes; default: the CPUs); one :class:`Result` per launch, in :func:`launch_specs` order.
    ``only``: just the launches whose kernel name contains this text (e.g. "flash_attn")."""
    from megafast.kernels.aot_specs import launch_specs

    specs = {cc: launch_specs(cc) for cc in capabilities}
    launches, first = [], {}  # (capability, spec index, key); key -> its first launch
    for cc in capabilities:
        for i, spec in enumerate(specs[cc]):
            if only is not None and only not in spec.name:
                continue
            key = compile_key(spec, cc)
            first.setdefault(key, (cc, i))
            launches.append((cc, i, key))
    items = list(first.values())
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(items)))
    # Fresh worker processes without TRITON_INTERPRET: under the interpreter (the CPU kernel tests set
    # it before importing Triton) some kernels do not compile, e.g. tl.static_range bodies that index
    # pointers (their constants are not wrapped as the compiler expects).
    import multiprocessing

    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            compiled = list(pool.map(_run_one, items))
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    by_key = dict(zip(first, compiled))
    results = []
    for cc, i, key in launches:
        spec, done = specs[cc][i], by_key[key]
        fields = {**asdict(done), "kernel": spec.name, "shape": spec.shape, "dtype": spec.dtype}
        results.append(Result(**fields))
    return results


def failures(results: list[Result]) -> list[str]:
    """One line per problem of any launch."""
    out = []
    for r in results:
        for p in r.problems(90 if r.arch == "sm_90a" else 80):
            where = f"{r.shape} {r.dtype} {r.constexprs} w{r.warps} s{r.stages}"
            out.append(f"{r.arch} {r.kernel} [{where}]: {p}")
    return out


def table(results: list[Result]) -> str:
    """Markdown table: kernel, shape, dtype, blocks, warps, stages, shared bytes, registers, spills, wgmma."""
    lines = [
        "| arch | kernel | shape | dtype | blocks | warps | stages | shared B | regs | spill B | wgmma |",
        "|---|---|---|---|---|---|---|---:|---:|---:|---|",
    ]
    for r in results:
        wg = "-" if r.wgmma is None else ("yes" if r.wgmma else "NO")
        lines.append(
            f"| {r.arch} | {r.kernel} | {r.shape} | {r.dtype} | {r.constexprs} | {r.warps} | {r.stages} | "
            f"{r.shared} | {r.registers} | {r.spill_bytes} | {wg}{' ERROR ' + r.error if r.error else ''} |"
        )
    return "\n".join(lines)


def summary(results: list[Result]) -> str:
    """Per arch: launches, compile errors, max shared memory (and where), max registers, spills, wgmma."""
    out = []
    for arch in sorted({r.arch for r in results}, reverse=True):
        rs = [r for r in results if r.arch == arch]
        ok = [r for r in rs if not r.error]
        top = max(ok, key=lambda r: r.shared, default=None)
        dots = [r for r in ok if r.wgmma is not None]
        out.append(
            f"{arch}: {len(rs)} launches, {len(rs) - len(ok)} compile errors, "
            f"{sum(1 for r in ok if r.spill_bytes)} spilling, max shared "
            f"{top.shared if top else 0} B ({top.kernel if top else '-'} {top.shape if top else ''} "
            f"{top.dtype if top else ''} {top.constexprs if top else ''} w{top.warps if top else 0}"
            f" s{top.stages if top else 0}), max registers {max((r.registers for r in ok), default=0)}"
            + (f", wgmma in {sum(r.wgmma for r in dots)}/{len(dots)} 16-bit dot launches" if dots else "")
        )
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SHARED_LIMIT))
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--json", help="write every result here")
    p.add_argument("--only", help="check only the kernels whose name contains this text, e.g. 'flash_attn'")
    args = p.parse_args(argv)
    results = check_all(tuple(args.arch), args.jobs, args.only)
    print(table(results))
    print()
    print(summary(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    bad = failures(results)
    for line in bad:
        print("FAIL", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
