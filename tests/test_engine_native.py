"""Standalone C++ engine test (csrc/engine/test_engine_main.cpp), built and run without Python:
a golden tiny model exported as an engine file is decoded greedily on x86-64 and on AArch64 (cross-
compiled, run under qemu-user with -cpu max), and both must emit the reference path's tokens. The
same binary's `--simd` mode checks the engine's vector helpers on both."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from bitllm.engine.golden import make_golden
from bitllm.engine.loader import export_engine_file

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
ENGINE_SRC = ["engine/engine.cpp", "engine/engine_file.cpp", "engine/simd.cpp", "engine/test_engine_main.cpp",
              "kernels.cpp", "kernels_generic.cpp"]
COMMON = ["-std=c++17", "-O2", "-ffp-contract=off", "-pthread", f"-I{CSRC}", f"-I{CSRC / 'engine'}"]
QEMU_LIB = "/usr/aarch64-linux-gnu"
HAVE_ARM = shutil.which("aarch64-linux-gnu-g++") is not None and shutil.which("qemu-aarch64") is not None


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd[:4])} ... failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _build(cxx: str, out: Path, isa_files: dict[str, list[str]], flags: list[str]) -> Path:
    objs = []
    for name, extra in isa_files.items():
        obj = out.parent / f"{out.name}-{Path(name).stem}.o"
        _run([cxx, *COMMON, *flags, *extra, "-c", str(CSRC / name), "-o", str(obj)])
        objs.append(str(obj))
    _run([cxx, *COMMON, *flags, *(str(CSRC / s) for s in ENGINE_SRC), *objs, "-o", str(out)])
    return out


@pytest.fixture(scope="module")
def engine_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("native")
    files = []
    for fam, method, fmt in (("llama", "ternary", "i2"), ("bitnet", "binary", "b1")):
        g = make_golden(d, fam, method, fmt)
        meta = {"golden.prompt": " ".join(map(str, g.prompt)), "golden.tokens": " ".join(map(str, g.tokens))}
        files.append(export_engine_file(g.directory, d / f"{fam}-{method}.engine", metadata=meta))
    return files


def _decode(cmd_prefix: list[str], exe: Path, files: list[Path]) -> list[str]:
    outs = []
    for f in files:
        r = _run([*cmd_prefix, str(exe), str(f), "2"])
        assert "OK 64 tokens match" in r.stdout, r.stdout
        outs.append(r.stdout.split("tokens=")[1].splitlines()[0])
    return outs


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 host only")
@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
def test_engine_standalone_x86(tmp_path, engine_files):
    isa = {"kernels_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
           "kernels_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]}
    exe = _build("g++", tmp_path / "test_engine", isa, [])
    _decode([], exe, engine_files)
    # the vector helpers' contracts (the LM head's 4-row dots bit-identical to one-row dots, SiLU)
    assert "SIMD OK" in _run([str(exe), "--simd"]).stdout


@pytest.mark.skipif(not HAVE_ARM, reason="cross toolchain or qemu-user absent (apt-get install g++-aarch64-linux-gnu qemu-user)")
def test_engine_standalone_aarch64_qemu(tmp_path, engine_files, record_property):
    """One armv8-a build (the dotprod kernels carry their own flag), run as a dotprod core (-cpu max,
    a Pi 5 class) and as a Cortex-A72 without dotprod (a Pi 4): both give the golden tokens."""
    isa = {"kernels_neon.cpp": [], "kernels_neon_dotprod.cpp": ["-march=armv8.2-a+dotprod"]}
    exe = _build("aarch64-linux-gnu-g++", tmp_path / "test_engine_a64", isa, ["-march=armv8-a"])
    ran = []
    for cpu, want in (("max", "neon_dotprod"), ("cortex-a72", "neon")):
        outs = _decode(["qemu-aarch64", "-L", QEMU_LIB, "-cpu", cpu], exe, engine_files)
        r = _run(["qemu-aarch64", "-L", QEMU_LIB, "-cpu", cpu, str(exe), str(engine_files[0]), "1"])
        assert r.stdout.startswith(f"isa={want} "), r.stdout
        assert "SIMD OK" in _run(["qemu-aarch64", "-L", QEMU_LIB, "-cpu", cpu, str(exe), "--simd"]).stdout
        ran.append(want)
    record_property("native_isas", f"engine aarch64 (qemu): {', '.join(ran)}")
