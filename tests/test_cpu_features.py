"""cpu.features: CPUID features taken away, as QEMU's -cpu ...,-feature, and what
the guest then reads with CPUID (tests/guests/cpuidprobe.S, in long mode).

On this development host kvm_pvm rewrites leaves 1 and 7 of every KVM_SET_CPUID2
with the host CPU's flags (measured: KVM_GET_CPUID2 returns the host's leaf 1
ECX/EDX and leaf 7, OR'd with what pyhyve set, while leaf 0x80000001 is kept as
set).  That is why the Linux guest turned XSAVE on although pyhyve's table had
no XSAVE bit.  pyhyve reads the table back and warns for a feature the host put
back; the end-to-end test holds it to that on any host."""

import pytest

from build import build_rom
from guestrun import run_pyhyve
from pyhyve import cpuid
from pyhyve.kvm import Kvm
from pyhyve.vcpu import ExitStatus


def test_names_aliases_and_errors():
    assert cpuid.feature_mask("-xsave, -SSE4.1,-lahf-lm,-sse3") == \
        {"xsave", "sse4_1", "lahf_lm", "pni"}
    assert cpuid.feature_mask("") == frozenset()
    with pytest.raises(cpuid.FeatureError, match="unknown feature 'frobnicate'"):
        cpuid.feature_mask("-frobnicate")
    with pytest.raises(cpuid.FeatureError, match="must start with '-'"):
        cpuid.feature_mask("+xsave")


def test_hidden_features_leave_the_table(needs_kvm):
    supported = Kvm().supported_cpuid()
    leaf = next(e for e in supported if e.function == cpuid.EXT1)
    assert leaf.ecx & 1, "KVM offers LAHF/SAHF in long mode on every x86-64 host"
    entries = cpuid.vcpu_cpuid(supported, cpuid.Topology(), 0,
                               hidden=frozenset({"lahf_lm", "xsave"}))
    assert not cpuid.visible(entries, "lahf_lm")
    assert not cpuid.visible(entries, "xsave")
    assert not [e for e in entries if e.function == cpuid.XSAVE_LEAF]
    plain = cpuid.vcpu_cpuid(supported, cpuid.Topology(), 0)
    assert cpuid.visible(plain, "lahf_lm")


def probe(tmp_path, *args):
    debug = tmp_path / "cpuid.txt"
    proc = run_pyhyve(["-l", f"bootrom,{build_rom('cpuidprobe')}", "-l",
                       f"debugcon,file={debug}", *args, "cpuidvm"], timeout=120)
    assert proc.returncode == ExitStatus.POWEROFF, proc.stderr
    leaves = [[int(word, 16) for word in line.split()]
              for line in debug.read_text().splitlines()]
    return dict(zip((0, 1, 7, 0xD, 0x80000001, 0x40000000, 0x40000001), leaves)), proc.stderr


def test_guest_cpuid_follows_the_mask_or_pyhyve_says_why(needs_kvm, tmp_path):
    plain, stderr = probe(tmp_path)
    assert plain[0x80000001][2] & 1 and "cpu.features" not in stderr
    masked, stderr = probe(tmp_path, "-o", "cpu.features=-lahf_lm,-xsave")
    assert not masked[0x80000001][2] & 1             # leaf 0x80000001 is kept as set
    assert masked[0x40000000][1:] == plain[0x40000000][1:]
    xsave_seen = bool(masked[1][2] >> 26 & 1)
    warned = "put 'xsave' back into CPUID leaf 0x1" in stderr
    assert xsave_seen == warned, stderr
    assert "lahf_lm" not in stderr


@pytest.mark.parametrize("value, message", [
    ("-frobnicate", "cpu.features: unknown feature 'frobnicate'"),
    ("xsave", "cpu.features: 'xsave' must start with '-'"),
])
def test_bad_feature_is_one_line(needs_kvm, tmp_path, value, message):
    proc = run_pyhyve(["-l", f"bootrom,{build_rom('hello16')}", "-o", f"cpu.features={value}",
                       "badcpu"], timeout=60)
    assert proc.returncode == ExitStatus.ERROR
    assert proc.stderr.startswith(f"pyhyve: {message}") and proc.stderr.count("\n") == 1, \
        proc.stderr
