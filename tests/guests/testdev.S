/* pc-testdev as kvm-unit-tests uses it, in long mode: the scratch register
 * at ports 0xe0-0xe3 and its byte window 0xe8-0xeb, the flush-page port
 * 0xe4, the 64 KiB memory window at 0xff000000, and interrupt line IRQ_LINE
 * (port 0x2000 + N) through the I/O APIC, edge-triggered, taken twice.
 * Prints one "what value" line per check (value as 8 hex digits), then
 * powers off. */
#include "rom.inc"

#ifndef IRQ_LINE
#define IRQ_LINE 5
#endif
#define SCRATCH      0xe0
#define FLUSH        0xe4
#define BYTES        0xe8
#define IRQ_PORT     (0x2000 + IRQ_LINE)
#define IOMEM        0xFF000000
#define IDT          0x20000
#define IRQ_COUNT    0x21000
#define IRQ_VECTOR   0x30
#define LAPIC        0xFEE00000
#define LAPIC_TPR    0x80
#define LAPIC_EOI    0xB0
#define LAPIC_SVR    0xF0
#define IOAPIC       0xFEC00000
#define WAIT_LOOPS   1000000

.macro SHOW label
    pushq %rax
    PRINT_STR "\label "
    popq %rax
    call show_eax
.endm

    ROM_START
#include "longmode.inc"

main64:
    cld
    /* the scratch register, by size and place */
    movl $0x12345678, %eax
    outl %eax, $SCRATCH
    inl $SCRATCH, %eax
    SHOW "l0"
    movb $0xab, %al
    outb %al, $SCRATCH + 2
    inl $SCRATCH, %eax
    SHOW "b2"
    xorl %eax, %eax
    inw $SCRATCH + 2, %ax
    SHOW "w2"
    xorl %eax, %eax
    inb $BYTES + 1, %al
    SHOW "window-b1"
    movw $0xcdef, %ax
    outw %ax, $BYTES + 2
    inl $BYTES, %eax
    SHOW "window-l0"
    inl $BYTES + 2, %eax             /* 4 bytes from port 0xea: past the window */
    SHOW "window-l2"
    inl $SCRATCH + 2, %eax           /* 4 bytes from port 0xe2: past the register */
    SHOW "r2"
    movl $0x11223344, %eax
    outl %eax, $SCRATCH + 2
    inl $SCRATCH, %eax
    SHOW "l2"
    movl $0x100000, %eax             /* flush a page: nothing the guest sees */
    outl %eax, $FLUSH
    inl $SCRATCH, %eax
    SHOW "after-flush"

    /* the memory window */
    movl $IOMEM, %ebx
    movl $0xdeadbeef, (%rbx)
    movw $0x1234, 0x10(%rbx)
    movb $0x5a, 0xffff(%rbx)
    movl (%rbx), %eax
    SHOW "m0"
    movzbl 1(%rbx), %eax
    SHOW "m1"
    movzwl 2(%rbx), %eax
    SHOW "m2"
    movl 0x10(%rbx), %eax
    SHOW "m10"
    movzbl 0xffff(%rbx), %eax
    SHOW "mffff"
    movl 0x20(%rbx), %eax
    SHOW "m20"

    /* an interrupt line, twice */
    call setup_interrupts
    sti
    call raise_and_wait
    call raise_and_wait
    cli
    movl IRQ_COUNT, %eax
    SHOW "irq"
    POWEROFF

raise_and_wait:
    movl IRQ_COUNT, %esi
    incl %esi
    movw $IRQ_PORT, %dx
    movb $1, %al
    outb %al, %dx
    movl $WAIT_LOOPS, %ecx
1:  cmpl %esi, IRQ_COUNT
    jae 2f
    decl %ecx
    jnz 1b
2:  ret

setup_interrupts:
    movl $IDT, %edi                  /* the only gate: IRQ_VECTOR */
    xorl %eax, %eax
    movl $((IRQ_VECTOR + 1) * 16 / 4), %ecx
    rep stosl
    movl $(IDT + IRQ_VECTOR * 16), %edi
    leaq irq_handler(%rip), %rax
    movw %ax, (%rdi)
    movw $0x18, 2(%rdi)              /* the 64-bit code segment */
    movw $0x8E00, 4(%rdi)            /* present, DPL 0, 64-bit interrupt gate */
    shrq $16, %rax
    movw %ax, 6(%rdi)
    shrq $16, %rax
    movl %eax, 8(%rdi)
    lidt idt_descriptor(%rip)
    movl $0, IRQ_COUNT
    movb $0xFF, %al                  /* mask both 8259s: the I/O APIC delivers */
    outb %al, $0x21
    outb %al, $0xA1
    movl $LAPIC, %eax
    movl $0, LAPIC_TPR(%rax)
    movl $(0x100 | 0xFF), LAPIC_SVR(%rax)
    movl $IOAPIC, %eax
    movl $(0x10 + 2 * IRQ_LINE + 1), (%rax)
    movl $0, 0x10(%rax)              /* destination: APIC ID 0 */
    movl $(0x10 + 2 * IRQ_LINE), (%rax)
    movl $IRQ_VECTOR, 0x10(%rax)     /* fixed, physical, edge, active high, unmasked */
    ret

irq_handler:
    pushq %rax
    pushq %rdx
    incl IRQ_COUNT
    movw $IRQ_PORT, %dx              /* lower the line for the next edge */
    xorl %eax, %eax
    outb %al, %dx
    movl $LAPIC, %eax
    movl $0, LAPIC_EOI(%rax)
    popq %rdx
    popq %rax
    iretq

    .balign 8
idt_descriptor:
    .word (IRQ_VECTOR + 1) * 16 - 1
    .quad IDT

show_eax:                            /* %eax as 8 hex digits, then a newline */
    movl %eax, %eax
    movl $8, %ecx
    call puthex
    movb $'\n', %al
    movw $DEBUG_PORT, %dx
    outb %al, %dx
    ret

#include "lib64.inc"
hex_digits: .ascii "0123456789abcdef"
    RESET_VECTOR start16
