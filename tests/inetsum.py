"""The internet checksum (RFC 1071), for the network tests that build and check
frames on the host side."""

import struct


def ones_complement_sum(data: bytes, start: int = 0) -> int:
    """16-bit ones' complement sum of `data` (big-endian words), from `start`."""
    if len(data) % 2:
        data += b"\0"
    total = start + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def inet_checksum(data: bytes) -> int:
    """What goes in an IPv4, ICMP, UDP or TCP checksum field."""
    return ~ones_complement_sum(data) & 0xFFFF
