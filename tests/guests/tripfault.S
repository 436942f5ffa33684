/* Enter 32-bit protected mode with an empty IDT and fault: #UD cannot be
 * delivered, nor can #DF, so the CPU shuts down (a triple fault).
 * (A real-mode divide error with a zero-limit IVT does not shut down under
 * this host's instruction emulator; the protected-mode path does.) */
#include "rom.inc"

    ROM_START
    .code16
start16:
    cli
    lgdtl %cs:ROMOFF(gdt_descriptor)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $start32

    .code32
start32:
    movw $0x10, %ax
    movw %ax, %ds
    lidt idt_descriptor
    ud2                      /* #UD -> no IDT -> #DF -> no IDT -> shutdown */
1:  hlt
    jmp 1b

    .balign 8
gdt:
    .quad 0
    .quad 0x00CF9B000000FFFF       /* 0x08: 32-bit code (accessed: the GDT is in ROM) */
    .quad 0x00CF93000000FFFF       /* 0x10: data */
gdt_end:
gdt_descriptor:
    .word gdt_end - gdt - 1
    .long gdt
idt_descriptor:
    .word 0
    .long 0

    RESET_VECTOR start16
