"""Lists the GPU code a binary carries: the SASS (cubin) architectures and the PTX targets in its .nv_fatbin
section — what `cuobjdump --list-elf / --list-ptx` shows, for machines without cuobjdump.

    python3 bench/gpu/fatbin_archs.py build/native/Release/vdiff.node
    -> sm_80 sm_90 (SASS), compute_90 (PTX)

Reads the ELF section table itself (no objcopy). Cubins are found by their ELF magic with e_machine 190
(EM_CUDA); the architecture is e_flags' second byte (0x5a = 90). PTX is found by its `.target sm_NN` line.
Compressed entries (nvcc --compress-mode) hide both; the script then says so. Exit status 1 when no sm_90 SASS
is found.
"""
import re
import struct
import sys


def section(data: bytes, name: bytes) -> bytes:
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise SystemExit("not a 64-bit ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    def header(i):
        return struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
    strtab = header(shstrndx)
    for i in range(shnum):
        h = header(i)
        start = strtab[4] + h[0]
        if data[start:start + len(name) + 1] == name + b"\0":
            return data[h[4]:h[4] + h[5]]
    return b""


def main():
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    data = open(sys.argv[1], "rb").read()
    fatbin = section(data, b".nv_fatbin")
    if not fatbin:
        print("no .nv_fatbin section: no GPU code")
        return 1
    sass, at = set(), 0
    while (at := fatbin.find(b"\x7fELF", at)) >= 0:
        machine, = struct.unpack_from("<H", fatbin, at + 18)
        flags, = struct.unpack_from("<I", fatbin, at + 48)
        if machine == 190:
            sass.add((flags >> 8) & 0xFF)
        at += 4
    ptx = {int(m) for m in re.findall(rb"\.target sm_(\d+)", fatbin)}
    print(" ".join(f"sm_{a}" for a in sorted(sass)) + " (SASS), " + (" ".join(f"compute_{a}" for a in sorted(ptx)) or "none") + " (PTX)")
    if not sass and not ptx:
        print("entries may be compressed (nvcc --compress-mode): use cuobjdump --list-elf")
    return 0 if 90 in sass else 1


if __name__ == "__main__":
    sys.exit(main())
