"""Benchmarks record the machine they ran on: CPU model and vector flags parsed from /proc/cpuinfo."""

import os

from mea_hf.utils.machine import describe_machine, lacks_native_bf16, machine_info, parse_cpuinfo

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu vme sse sse2 avx avx2 fma avx512f avx512_bf16
processor\t: 1
model name\t: AMD EPYC 9R14
flags\t\t: fpu vme sse sse2 avx avx2 fma avx512f avx512_bf16
"""
ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics sve
CPU implementer\t: 0x41
"""


def test_parse_cpuinfo_reads_the_model_and_the_vector_flags_of_x86_and_arm():
    assert parse_cpuinfo(X86) == ("AMD EPYC 9R14", ["avx2", "avx512f", "avx512_bf16"])
    model, flags = parse_cpuinfo(ARM)
    assert flags == ["asimd", "sve"] and model  # ARM names no model: the platform's machine name stands in


def test_lacks_native_bf16_is_true_only_when_the_cpu_names_no_bf16_extension():
    assert not lacks_native_bf16(X86)  # avx512_bf16
    assert lacks_native_bf16(X86.replace(" avx512_bf16", ""))  # AVX-512 alone does not do bf16 arithmetic
    assert lacks_native_bf16(ARM) and not lacks_native_bf16(ARM.replace("sve", "sve bf16"))


def test_machine_info_describes_this_machine():
    info = machine_info()
    assert info["cores"] == os.cpu_count() and info["torch_threads"] >= 1 and info["cpu"]
    line = describe_machine(info)
    assert line.startswith(info["cpu"]) and f"{info['cores']} cores" in line
