/* SMP bring-up as an OS does it: the BSP learns the CPU count from CMOS 0x5F
 * (QEMU's and pyhyve's convention), copies a real-mode trampoline to 0x8000,
 * sends INIT and two SIPIs to all other CPUs through its local APIC, and each
 * AP prints "ap <APIC ID>" on the debug port under a spinlock.  The BSP
 * prints "all <N> cpus up" once every AP has checked in, then powers off. */
#include "rom.inc"

#define TRAMPOLINE   0x8000
#define SIPI_VECTOR  (TRAMPOLINE >> 12)
#define PRINT_LOCK   0x7000
#define AP_COUNT     0x7004
#define CPU_COUNT    0x7008
#define AP_STACK_TOP 0x7800
#define LAPIC_ICR_LO 0xFEE00300
#define LAPIC_ICR_HI 0xFEE00310
#define ICR_ALL_BUT_SELF (3 << 18)
#define ICR_INIT     0x4500
#define ICR_STARTUP  0x4600

    ROM_START
#include "pmode.inc"

main32:
    movb $0x5F, %al                /* CMOS: number of CPUs - 1 */
    outb %al, $0x70
    inb $0x71, %al
    movzbl %al, %eax
    incl %eax
    movl %eax, CPU_COUNT
    movl $0, AP_COUNT
    movl $0, PRINT_LOCK
    movl $trampoline, %esi         /* copy the AP trampoline below 1 MiB */
    movl $TRAMPOLINE, %edi
    movl $(trampoline_end - trampoline), %ecx
    rep movsb
    .globl trampoline_copied
trampoline_copied:                 /* the GDB stub test stops here */
    movl $0, LAPIC_ICR_HI
    movl $(ICR_ALL_BUT_SELF | ICR_INIT), LAPIC_ICR_LO
    movl $(ICR_ALL_BUT_SELF | ICR_STARTUP | SIPI_VECTOR), LAPIC_ICR_LO
    movl $(ICR_ALL_BUT_SELF | ICR_STARTUP | SIPI_VECTOR), LAPIC_ICR_LO
    movl CPU_COUNT, %ebx
    decl %ebx
1:  pause
    cmpl %ebx, AP_COUNT
    jne 1b
    movw $DEBUG_PORT, %dx
    movl $banner, %esi
    movl $(banner_end - banner), %ecx
    rep outsb
    movl CPU_COUNT, %eax
    call print_dec32
    movl $tail, %esi
    movl $(tail_end - tail), %ecx
    rep outsb
    POWEROFF

print_dec32:                       /* %eax in decimal to DEBUG_PORT */
    movl $10, %ecx
    xorl %edi, %edi
1:  xorl %edx, %edx
    divl %ecx
    pushl %edx                     /* digits come out lowest first */
    incl %edi
    testl %eax, %eax
    jnz 1b
    movw $DEBUG_PORT, %dx
2:  popl %eax
    addb $'0', %al
    outb %al, %dx
    decl %edi
    jnz 2b
    ret

banner: .ascii "all "
banner_end:
tail:   .ascii " cpus up\n"
tail_end:

/* Runs on each AP in real mode at TRAMPOLINE (CS = TRAMPOLINE >> 4, IP = 0). */
    .code16
trampoline:
    cli
    xorw %ax, %ax
    movw %ax, %ds
    movl $1, %eax
    cpuid
    shrl $24, %ebx                 /* initial APIC ID */
6:  movb $1, %al
    xchgb %al, PRINT_LOCK          /* xchg with memory is locked */
    testb %al, %al
    jz 7f
    pause
    jmp 6b
7:  xorw %ax, %ax                  /* one shared stack: only the lock holder uses it */
    movw %ax, %ss
    movw $AP_STACK_TOP, %sp
    movw $DEBUG_PORT, %dx
    movb $'a', %al
    outb %al, %dx
    movb $'p', %al
    outb %al, %dx
    movb $' ', %al
    outb %al, %dx
    movw %bx, %ax
    movw $10, %cx
    xorw %di, %di
8:  xorw %dx, %dx
    divw %cx
    pushw %dx
    incw %di
    testw %ax, %ax
    jnz 8b
    movw $DEBUG_PORT, %dx
9:  popw %ax
    addb $'0', %al
    outb %al, %dx
    decw %di
    jnz 9b
    movb $'\n', %al
    outb %al, %dx
    movb $0, PRINT_LOCK
    lock incl AP_COUNT
10: hlt
    jmp 10b
trampoline_end:

    RESET_VECTOR start16
