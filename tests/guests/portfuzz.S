/* Whole-VM fuzzing: ITERATIONS random accesses, each one of
 *   a port write or read (port 0-0xFFFF, or for half of them 0-0x7FF, where
 *   the legacy devices, PCI configuration and ACPI registers are),
 *   an MMIO write or read (0xC0000000-0xFEFFFFFF minus the LAPIC page, or for
 *   half of them the ECAM configuration space of bus 0, slots 0-7),
 * of a random width (1, 2 or 4 bytes) and, for writes, a random value, drawn
 * from a xorshift32 PRNG seeded with SEED (non-zero).  Port accesses that
 * would legitimately end the VM are skipped (see `avoid`).  Then it prints
 * "fuzz done" on the debug port and powers off.
 *
 * Devices may DMA into RAM at random, so the guest keeps its whole state in
 * registers (no stack, no variables):
 *   esi  PRNG state          edi  accesses left
 *   ebp  the operation       ebx  the width
 *   edx  the port/address    eax, ecx  scratch */
#include "rom.inc"

#ifndef SEED
#define SEED 1
#endif
#ifndef ITERATIONS
#define ITERATIONS 20000
#endif
#define MMIO_BASE  0xC0000000
#define MMIO_SIZE  0x3F000000       /* up to 0xFEFFFFFF: the bootrom lies above */
#define LAPIC_BASE 0xFEE00000
#define OP_READ    1                /* bits of the operation; bits 2-3: the width */
#define OP_MMIO    2
#define OP_NEAR    16               /* a port below 0x800, or ECAM of slots 0-7 */
#define ECAM_BASE  0xE0000000
#define ECAM_SLOTS_0_7 0x3FFFF

/* esi = xorshift32(esi) (13, 17, 5); the new value also in eax */
.macro NEXT
    movl %esi, %eax
    shll $13, %eax
    xorl %eax, %esi
    movl %esi, %eax
    shrl $17, %eax
    xorl %eax, %esi
    movl %esi, %eax
    shll $5, %eax
    xorl %eax, %esi
    movl %esi, %eax
.endm

/* One of three instructions, by the width in %ebx (1, 2 or 4), then the next access. */
.macro BY_WIDTH byte, word, dword
    cmpl $1, %ebx
    jne 1f
    \byte
    jmp next_access
1:  cmpl $2, %ebx
    jne 2f
    \word
    jmp next_access
2:  \dword
    jmp next_access
.endm

    ROM_START
#include "pmode.inc"

main32:
    cld
    movl $SEED, %esi
    movl $ITERATIONS, %edi
next_access:
    decl %edi
    js done
    NEXT
    movl %eax, %ebp
    movl %eax, %ecx                /* the width: bits 2-3 give 1, 2, 4, 4 */
    shrl $2, %ecx
    andl $3, %ecx
    cmpl $3, %ecx
    jne 1f
    decl %ecx
1:  movl $1, %ebx
    shll %cl, %ebx
    testl $OP_MMIO, %ebp
    jnz mmio

port:
    NEXT
    movzwl %ax, %edx
    testl $OP_NEAR, %ebp
    jz 1f
    andl $0x7FF, %edx
1:  movl $avoid, %ecx                /* skip if [port, port + width) meets a range */
2:  movzwl 2(%ecx), %eax
    cmpl %eax, %edx
    ja 3f                          /* it starts after the range */
    movzwl (%ecx), %eax
    subl %ebx, %eax
    cmpl %eax, %edx
    ja next_access                 /* port + width > range start: overlaps */
3:  addl $4, %ecx
    cmpl $avoid_end, %ecx
    jne 2b
    NEXT                           /* the value */
    testl $OP_READ, %ebp
    jnz port_read
    BY_WIDTH "outb %al, %dx", "outw %ax, %dx", "outl %eax, %dx"
port_read:
    BY_WIDTH "inb %dx, %al", "inw %dx, %ax", "inl %dx, %eax"

mmio:
    NEXT
    andl $0x3FFFFFFF, %eax
    cmpl $MMIO_SIZE, %eax
    jae mmio                       /* above the window: draw again */
    leal MMIO_BASE(%eax), %edx
    testl $OP_NEAR, %ebp
    jz 1f
    andl $ECAM_SLOTS_0_7, %edx
    orl $ECAM_BASE, %edx
1:  leal 3(%edx), %ecx             /* nothing in or reaching into the LAPIC page */
    subl $LAPIC_BASE, %ecx
    cmpl $(4096 + 3), %ecx
    jb mmio
    NEXT                           /* the value */
    testl $OP_READ, %ebp
    jnz mmio_read
    BY_WIDTH "movb %al, (%edx)", "movw %ax, (%edx)", "movl %eax, (%edx)"
mmio_read:
    BY_WIDTH "movb (%edx), %al", "movw (%edx), %ax", "movl (%edx), %eax"

done:
    movl $done_msg, %esi
    movl $(done_msg_end - done_msg), %ecx
    movw $DEBUG_PORT, %dx
    rep outsb
    POWEROFF

/* Ports that legitimately end the VM: first, last (inclusive) */
    .balign 4
avoid:
    .word 0x64, 0x64               /* i8042 commands (0xFE pulses reset) */
    .word 0x92, 0x92               /* system control port A: fast reset */
    .word 0xCF9, 0xCF9             /* reset control */
    .word PM1A_CNT, PM1A_CNT + 1   /* PM1a_CNT: S5 powers off */
    .word 0x510, 0x51B             /* fw_cfg, whose DMA could write anywhere */
avoid_end:

done_msg: .ascii "fuzz done\n"
done_msg_end:

    RESET_VECTOR start16
