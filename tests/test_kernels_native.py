"""Standalone C++ kernel test (csrc/tests/test_kernels.cpp), built and run outside Python:

- x86-64 with AddressSanitizer + UndefinedBehaviorSanitizer (every variant this CPU runs), and
  with ThreadSanitizer (the row thread pool);
- x86-64 with the AVX-512 file compiled against SIMDe's portable emulation (checks the AVX-512
  code's logic bit for bit on CPUs without AVX-512; real AVX-512 runs where the CPU has it);
- AArch64 cross-compiled for -march=armv8-a and -march=armv8.2-a+dotprod, run under qemu-user.

The test binary prints "isa <name>: ran|skipped (...)" per variant; we assert on those lines.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
COMMON = ["-std=c++17", "-ffp-contract=off", f"-I{CSRC}"]
TEST_SRC = [str(CSRC / "kernels.cpp"), str(CSRC / "kernels_generic.cpp"), str(CSRC / "tests" / "test_kernels.cpp")]
X86_FLAGS = {
    "kernels_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "kernels_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"],
}
QEMU_LIB = "/usr/aarch64-linux-gnu"
IS_X86 = platform.machine() in ("x86_64", "AMD64")


def _run(cmd: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd[:3])} ... failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def _build(cxx: str, out: Path, per_file: dict[str, list[str]], flags: list[str]) -> Path:
    """Compile the ISA files with their own flags, then link them with the front door + test."""
    objs = []
    for name, extra in per_file.items():
        obj = out.parent / (Path(name).stem + ".o")
        _run([cxx, *COMMON, *flags, *extra, "-c", str(CSRC / name), "-o", str(obj)])
        objs.append(str(obj))
    _run([cxx, *COMMON, *flags, *TEST_SRC, *objs, "-o", str(out)])
    return out


def _ran(stdout: str) -> list[str]:
    return [line.split()[1].rstrip(":") for line in stdout.splitlines() if line.startswith("isa ") and line.endswith(": ran")]


def _check(stdout: str, must_run: list[str], record_property, target: str) -> None:
    assert "OK (0 failures)" in stdout, stdout[-4000:]
    ran = _ran(stdout)
    record_property("native_isas", f"{target}: {', '.join(ran)}")
    for isa in must_run:
        assert isa in ran, f"{isa} did not run on {target}:\n{stdout}"


@pytest.mark.skipif(not IS_X86, reason="x86-64 host only")
@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
def test_native_x86_sanitizers(tmp_path, record_property):
    san = ["-O1", "-g", "-fsanitize=address,undefined,float-cast-overflow", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    exe = _build("g++", tmp_path / "test_kernels_asan", X86_FLAGS, san)
    r = _run([str(exe)])
    _check(r.stdout, ["generic"], record_property, "x86-64 asan+ubsan")
    import bitllm.kernels as bk

    for isa in bk.available_isas():  # every variant Python sees must also run here
        assert isa in _ran(r.stdout)


@pytest.mark.skipif(not IS_X86, reason="x86-64 host only")
@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
def test_native_x86_thread_sanitizer(tmp_path, record_property):
    """The row thread pool under ThreadSanitizer (the test runs 1, 2 and 3 threads)."""
    exe = _build("g++", tmp_path / "test_kernels_tsan", X86_FLAGS, ["-O1", "-g", "-fsanitize=thread"])
    r = _run([str(exe)])
    assert "WARNING: ThreadSanitizer" not in r.stderr, r.stderr[-4000:]
    _check(r.stdout, ["generic"], record_property, "x86-64 tsan")


@pytest.mark.skipif(not IS_X86, reason="x86-64 host only")
@pytest.mark.skipif(not Path("/usr/include/simde/x86/avx512.h").exists(),
                    reason="SIMDe headers absent (apt-get install libsimde-dev) — AVX-512 logic not emulated")
def test_native_avx512_emulated(tmp_path, record_property):
    per_file = {"kernels_avx2.cpp": X86_FLAGS["kernels_avx2.cpp"], "kernels_avx512.cpp": ["-mavx2", "-mfma", "-Wno-psabi"]}
    flags = ["-O1", "-DBITLLM_SIMDE_AVX512"]
    exe = _build("g++", tmp_path / "test_kernels_simde", per_file, flags)
    r = _run([str(exe)])
    _check(r.stdout, ["generic", "avx512"], record_property, "x86-64 avx512 via SIMDe emulation")


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None or shutil.which("qemu-aarch64") is None,
                    reason="cross toolchain or qemu-user absent (apt-get install g++-aarch64-linux-gnu qemu-user)")
@pytest.mark.parametrize("march", ["armv8-a", "armv8.2-a+dotprod"])
def test_native_aarch64_qemu(tmp_path, record_property, march):
    per_file = {"kernels_neon.cpp": [], "kernels_neon_dotprod.cpp": ["-march=armv8.2-a+dotprod"]}
    exe = _build("aarch64-linux-gnu-g++", tmp_path / "test_kernels_a64", per_file, ["-O2", f"-march={march}"])
    r = _run(["qemu-aarch64", "-L", QEMU_LIB, "-cpu", "max", str(exe)])
    _check(r.stdout, ["generic", "neon", "neon_dotprod"], record_property, f"aarch64 {march} (qemu -cpu max)")
    if march == "armv8-a":  # a Cortex-A72 (Raspberry Pi 4) has no dotprod: dispatch must skip it
        r = _run(["qemu-aarch64", "-L", QEMU_LIB, "-cpu", "cortex-a72", str(exe)])
        assert "OK (0 failures)" in r.stdout
        assert "neon" in _ran(r.stdout) and "neon_dotprod" not in _ran(r.stdout)
