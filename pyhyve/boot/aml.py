"""A small encoder for ACPI Machine Language (ACPI 6.x, section 20), enough for a DSDT.

Every function returns the AML bytes of one construct, so terms compose as
plain byte strings: `scope("\\_SB", device("PCI0", name("_UID", 0)))`.
Python values stand for AML data wherever a term takes one: an int is an
Integer (in its smallest encoding), a str is a String, and bytes are AML that
is already encoded (a nested package, a name reference, a buffer).

Names follow ASL spelling: "\\" roots a path, each "^" climbs one scope, "."
separates segments, and a segment shorter than four characters is padded with
"_" ("_S5" is the NameSeg "_S5_").
"""

import struct

ZERO_OP = 0x00
ONE_OP = 0x01
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
METHOD_OP = 0x14
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82                # after EXT_OP_PREFIX
ROOT_CHAR = 0x5C
PARENT_PREFIX_CHAR = 0x5E
NULL_NAME = 0x00
LOCAL0_OP = 0x60
ARG0_OP = 0x68
STORE_OP = 0x70
RETURN_OP = 0xA4
ONES_OP = 0xFF

ONES = (1 << 64) - 1            # Ones in a revision-2 (64-bit integer) definition block
NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ_0123456789")


# --- encodings (20.2.4 package length, 20.2.2 names, 20.2.3 data) -----------------------
def pkg_length(content_length: int) -> bytes:
    """The PkgLength in front of `content_length` bytes; it counts its own bytes too.

    One byte holds up to 63 in bits 0-5; longer forms put the count of
    following bytes in bits 6-7, the low nibble in bits 0-3, and the rest,
    eight bits at a time, in the following bytes.
    """
    if content_length + 1 <= 0x3F:
        return bytes([content_length + 1])
    for extra in (1, 2, 3):
        total = content_length + 1 + extra
        if total < 1 << (4 + 8 * extra):
            following = (total >> 4).to_bytes(extra, "little")
            return bytes([(extra << 6) | (total & 0x0F)]) + following
    raise ValueError(f"AML package of {content_length} bytes is longer than PkgLength allows")


def name_seg(segment: str) -> bytes:
    """A four-character NameSeg: a letter or "_" first, then letters, digits or "_"."""
    padded = segment.ljust(4, "_")
    if not segment or len(padded) != 4 or not set(padded) <= NAME_CHARS or padded[0].isdigit():
        raise ValueError(f"invalid AML name segment '{segment}'")
    return padded.encode("ascii")


def name_string(path: str) -> bytes:
    """A NameString: root or parent prefixes, then zero, one, two or more segments."""
    prefix = b""
    if path.startswith("\\"):
        prefix, path = bytes([ROOT_CHAR]), path[1:]
    else:
        while path.startswith("^"):
            prefix, path = prefix + bytes([PARENT_PREFIX_CHAR]), path[1:]
    segments = [name_seg(segment) for segment in path.split(".")] if path else []
    if not segments:
        if not prefix:
            raise ValueError("empty AML name")
        return prefix + bytes([NULL_NAME])
    if len(segments) == 1:
        return prefix + segments[0]
    if len(segments) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segments)
    if len(segments) > 255:
        raise ValueError(f"AML name path '{path}' has more than 255 segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segments)]) + b"".join(segments)


def integer(value: int) -> bytes:
    """An Integer in its shortest encoding: Zero, One, Ones, or a 1/2/4/8-byte constant."""
    if not 0 <= value <= ONES:
        raise ValueError(f"AML integer {value} is outside 0..2^64-1")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value == ONES:
        return bytes([ONES_OP])
    for prefix, size in ((BYTE_PREFIX, 1), (WORD_PREFIX, 2), (DWORD_PREFIX, 4)):
        if value < 1 << (8 * size):
            return bytes([prefix]) + value.to_bytes(size, "little")
    return bytes([QWORD_PREFIX]) + value.to_bytes(8, "little")


def dword(value: int) -> bytes:
    """A DWordConst whatever the value: for fields readers match byte for byte."""
    return bytes([DWORD_PREFIX]) + struct.pack("<I", value)


def string(text: str) -> bytes:
    """A String: ASCII characters 0x01-0x7F, NUL-terminated."""
    data = text.encode("ascii")
    if b"\0" in data:
        raise ValueError("AML strings cannot contain NUL")
    return bytes([STRING_PREFIX]) + data + b"\0"


def eisa_id(text: str) -> bytes:
    """EISAID("PNP0A03"): three letters in five bits each, then four hex digits.

    Always a DWordConst, as iasl emits it: the disassembler and SeaBIOS's DSDT
    scanner recognise an EISA ID only in that form.
    """
    if len(text) != 7 or not text[:3].isalpha() or not text[:3].isupper():
        raise ValueError(f"invalid EISA ID '{text}'")
    vendor = 0
    for letter in text[:3]:
        vendor = (vendor << 5) | (ord(letter) - ord("@"))
    product = int(text[3:], 16)
    return dword(int.from_bytes(struct.pack(">HH", vendor, product), "little"))


def data(value) -> bytes:
    """A Python value as an AML data object (see the module docstring)."""
    if isinstance(value, bool):
        raise TypeError("write AML booleans as 0 or 1")
    if isinstance(value, int):
        return integer(value)
    if isinstance(value, str):
        return string(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise TypeError(f"no AML encoding for {type(value).__name__}")


def buffer(content: bytes) -> bytes:
    """Buffer() {content}, its size an Integer."""
    body = integer(len(content)) + bytes(content)
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


def package(*elements) -> bytes:
    """Package() {elements}: each element as `data()` encodes it."""
    if len(elements) > 255:
        raise ValueError("an AML Package holds at most 255 elements")
    body = bytes([len(elements)]) + b"".join(data(element) for element in elements)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


# --- named objects and namespace modifiers (20.2.5) --------------------------------------
def name(path: str, value) -> bytes:
    """Name(path, value)."""
    return bytes([NAME_OP]) + name_string(path) + data(value)


def scope(path: str, *terms: bytes) -> bytes:
    """Scope(path) {terms}."""
    body = name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(path: str, *terms: bytes) -> bytes:
    """Device(path) {terms}."""
    body = name_string(path) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


def method(path: str, arg_count: int, *terms: bytes, serialized: bool = False,
           sync_level: int = 0) -> bytes:
    """Method(path, arg_count, Serialized or NotSerialized, sync_level) {terms}."""
    if not 0 <= arg_count <= 7 or not 0 <= sync_level <= 15:
        raise ValueError("an AML method takes 0-7 arguments and a sync level of 0-15")
    flags = arg_count | (int(serialized) << 3) | (sync_level << 4)
    body = name_string(path) + bytes([flags]) + b"".join(terms)
    return bytes([METHOD_OP]) + pkg_length(len(body)) + body


# --- statements and operands inside methods (20.2.5.3, 20.2.6) ----------------------------
def arg(index: int) -> bytes:
    """ArgN, a method's argument (0-6)."""
    if not 0 <= index <= 6:
        raise ValueError("AML methods have Arg0-Arg6")
    return bytes([ARG0_OP + index])


def local(index: int) -> bytes:
    """LocalN, a method's local variable (0-7)."""
    if not 0 <= index <= 7:
        raise ValueError("AML methods have Local0-Local7")
    return bytes([LOCAL0_OP + index])


def store(source, target: bytes) -> bytes:
    """Store(source, target): `target` is encoded AML (name_string(), local(), arg())."""
    return bytes([STORE_OP]) + data(source) + target


def return_(value) -> bytes:
    """Return(value)."""
    return bytes([RETURN_OP]) + data(value)


# --- resource descriptors (6.4), the contents of a ResourceTemplate ----------------------
END_TAG = 0x79                  # small item 0xF, one byte long: a checksum, 0 = none
IO_PORT_TAG = 0x47              # small item 0x8, seven bytes
IRQ_NO_FLAGS_TAG = 0x22         # small item 0x4, two bytes
MEMORY32_FIXED_TAG = 0x86
DWORD_ADDRESS_TAG = 0x87
WORD_ADDRESS_TAG = 0x88
EXTENDED_IRQ_TAG = 0x89
QWORD_ADDRESS_TAG = 0x8A

MEMORY_RANGE, IO_RANGE, BUS_NUMBER_RANGE = 0, 1, 2      # address-space resource types
ADDRESS_MIN_FIXED = 1 << 2
ADDRESS_MAX_FIXED = 1 << 3
ADDRESS_CONSUMER = 1 << 0
IO_ENTIRE_RANGE = 3             # _RNG: ISA and non-ISA ranges both decoded
MEMORY_READ_WRITE = 1 << 0
MEMORY_CACHEABLE = 1 << 1       # _MEM = 1; 0 is non-cacheable

INTERRUPT_CONSUMER = 1 << 0
INTERRUPT_EDGE = 1 << 1
INTERRUPT_ACTIVE_LOW = 1 << 2
INTERRUPT_SHARED = 1 << 3


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate() {descriptors}: a buffer closed by an end tag with no checksum."""
    return buffer(b"".join(descriptors) + bytes([END_TAG, 0]))


def io(minimum: int, maximum: int, alignment: int, length: int) -> bytes:
    """IO(Decode16, minimum, maximum, alignment, length): an I/O port range."""
    return struct.pack("<BBHHBB", IO_PORT_TAG, 1, minimum, maximum, alignment, length)


def irq_no_flags(*irqs: int) -> bytes:
    """IRQNoFlags() {irqs}: ISA IRQs, edge-triggered, active-high, exclusive."""
    mask = 0
    for irq in irqs:
        if not 0 <= irq <= 15:
            raise ValueError(f"ISA IRQ {irq} is not 0-15")
        mask |= 1 << irq
    return struct.pack("<BH", IRQ_NO_FLAGS_TAG, mask)


def interrupt(*interrupts: int, consumer: bool = True, edge: bool = False,
              active_low: bool = False, shared: bool = False) -> bytes:
    """Interrupt(consumer/producer, Level/Edge, ActiveHigh/ActiveLow, Exclusive/Shared)
    {interrupts}: the extended descriptor, for GSIs beyond the ISA range."""
    if not 1 <= len(interrupts) <= 255:
        raise ValueError("an Interrupt descriptor lists 1-255 interrupts")
    flags = (consumer * INTERRUPT_CONSUMER | edge * INTERRUPT_EDGE |
             active_low * INTERRUPT_ACTIVE_LOW | shared * INTERRUPT_SHARED)
    body = struct.pack(f"<BB{len(interrupts)}I", flags, len(interrupts), *interrupts)
    return struct.pack("<BH", EXTENDED_IRQ_TAG, len(body)) + body


def memory32_fixed(base: int, length: int, read_write: bool = True) -> bytes:
    """Memory32Fixed(ReadWrite or ReadOnly, base, length)."""
    return struct.pack("<BHBII", MEMORY32_FIXED_TAG, 9, int(read_write), base, length)


def _address_space(tag: int, width: str, resource_type: int, type_flags: int,
                   minimum: int, maximum: int, translation: int, producer: bool) -> bytes:
    """The Word/DWord/QWord address-space descriptor a host bridge's _CRS is made of:
    a fixed range (MinFixed, MaxFixed, PosDecode) from minimum to maximum inclusive."""
    if maximum < minimum:
        raise ValueError(f"address range {minimum:#x}-{maximum:#x} is empty")
    general = ADDRESS_MIN_FIXED | ADDRESS_MAX_FIXED | (0 if producer else ADDRESS_CONSUMER)
    fields = struct.pack(f"<BBB5{width}", resource_type, general, type_flags, 0, minimum,
                         maximum, translation, maximum - minimum + 1)
    return struct.pack("<BH", tag, len(fields)) + fields


def word_bus_number(minimum: int, maximum: int, producer: bool = True) -> bytes:
    """WordBusNumber(ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, minimum, maximum)."""
    return _address_space(WORD_ADDRESS_TAG, "H", BUS_NUMBER_RANGE, 0, minimum, maximum, 0,
                          producer)


def word_io(minimum: int, maximum: int, producer: bool = True) -> bytes:
    """WordIO(ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, ...)."""
    return _address_space(WORD_ADDRESS_TAG, "H", IO_RANGE, IO_ENTIRE_RANGE, minimum, maximum,
                          0, producer)


def _memory_flags(cacheable: bool, read_write: bool) -> int:
    return (MEMORY_CACHEABLE if cacheable else 0) | (MEMORY_READ_WRITE if read_write else 0)


def dword_memory(minimum: int, maximum: int, cacheable: bool = False, read_write: bool = True,
                 producer: bool = True) -> bytes:
    """DWordMemory(ResourceProducer, PosDecode, MinFixed, MaxFixed, Cacheable or
    NonCacheable, ReadWrite, 0, minimum, maximum, ...): a window below 4 GiB."""
    return _address_space(DWORD_ADDRESS_TAG, "I", MEMORY_RANGE,
                          _memory_flags(cacheable, read_write), minimum, maximum, 0, producer)


def qword_memory(minimum: int, maximum: int, cacheable: bool = False, read_write: bool = True,
                 producer: bool = True) -> bytes:
    """QWordMemory(...): the same as dword_memory, for a window anywhere in 64 bits."""
    return _address_space(QWORD_ADDRESS_TAG, "Q", MEMORY_RANGE,
                          _memory_flags(cacheable, read_write), minimum, maximum, 0, producer)
