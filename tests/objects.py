"""Which machine an object file is for, read from its header (ELF, Mach-O, WebAssembly), and the members of
the .tar archives and .a static libraries the compiler and `package` write."""

from __future__ import annotations

import struct
import tarfile
from pathlib import Path

ELF_MACHINES = {3: "x86", 62: "x86_64", 40: "arm", 183: "aarch64"}
MACHO_CPU_TYPES = {0x01000007: "x86_64", 0x0100000C: "arm64"}


def object_architecture(data: bytes) -> str:
    """e.g. "elf64-aarch64", "macho64-arm64", "wasm"; "unknown" for anything else."""
    if data[:4] == b"\x7fELF":
        bits = {1: "elf32", 2: "elf64"}[data[4]]
        machine = struct.unpack_from("<H" if data[5] == 1 else ">H", data, 18)[0]
        return f"{bits}-{ELF_MACHINES.get(machine, machine)}"
    if data[:4] == b"\xcf\xfa\xed\xfe":  # MH_MAGIC_64, little-endian
        cpu_type = struct.unpack_from("<I", data, 4)[0]
        return f"macho64-{MACHO_CPU_TYPES.get(cpu_type, hex(cpu_type))}"
    if data[:4] == b"\x00asm":
        return "wasm"
    return "unknown"


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def ar_members(path: Path) -> dict[str, bytes]:
    """Members of a static library (System V/GNU or BSD ar format), symbol tables left out."""
    data = path.read_bytes()
    assert data[:8] == b"!<arch>\n", f"{path} is not an ar archive"
    members, offset, long_names = {}, 8, b""
    while offset < len(data):
        header = data[offset : offset + 60]
        name, size = header[:16].decode().strip(), int(header[48:58])
        body = data[offset + 60 : offset + 60 + size]
        if name.startswith("#1/"):  # BSD: the name is the first N bytes of the body
            name_length = int(name[3:])
            name, body = body[:name_length].rstrip(b"\0").decode(), body[name_length:]
        elif name == "//":  # GNU table of long names
            long_names = body
        elif name.startswith("/") and name[1:].isdigit():
            start = int(name[1:])
            name = long_names[start : long_names.index(b"/\n", start)].decode()
        if name not in ("/", "//", "__.SYMDEF", "__.SYMDEF SORTED", "/SYM64/"):
            members[name.rstrip("/")] = body
        offset += 60 + size + size % 2
    return members
