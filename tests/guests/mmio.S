/* MMIO accesses of every width to a test device at MMIO_BASE (0xC0000000):
 * write 1/2/4/8-byte values, read each width back and write what was read to
 * the device's echo register at +0x100, then power off. */
#include "rom.inc"
#define MMIO_BASE 0xC0000000

    ROM_START
#include "longmode.inc"

main64:
    movl $MMIO_BASE, %ebx
    movb $0x11, (%rbx)
    movw $0x2222, 2(%rbx)
    movl $0x44444444, 4(%rbx)
    movabsq $0x8888888888888888, %rax
    movq %rax, 8(%rbx)
    movzbl 0x10(%rbx), %eax
    movq %rax, 0x100(%rbx)
    movzwl 0x10(%rbx), %eax
    movq %rax, 0x100(%rbx)
    movl 0x10(%rbx), %eax
    movq %rax, 0x100(%rbx)
    movq 0x10(%rbx), %rax
    movq %rax, 0x100(%rbx)
    POWEROFF

    RESET_VECTOR start16
