/* Switch from real mode to 64-bit long mode, print with `rep outsb`, power off. */
#include "rom.inc"

#define PML4  0x10000
#define PDPT  0x11000
#define PD_LO 0x12000
#define PD_HI 0x13000
#define EFER  0xC0000080

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
    movw %ax, %es
    movw %ax, %ss
    movl $0x9000, %esp
    /* page tables: identity-map the first 2 MiB and the last 2 MiB below 4 GiB */
    movl $PML4, %edi
    xorl %eax, %eax
    movl $(4 * 4096 / 4), %ecx
    rep stosl
    movl $(PDPT | 3), PML4
    movl $(PD_LO | 3), PDPT
    movl $(PD_HI | 3), PDPT + 3 * 8
    movl $0x83, PD_LO
    movl $(0xFFE00000 | 0x83), PD_HI + 511 * 8
    movl %cr4, %eax
    orl $(1 << 5), %eax            /* PAE */
    movl %eax, %cr4
    movl $PML4, %eax
    movl %eax, %cr3
    movl $EFER, %ecx
    rdmsr
    orl $(1 << 8), %eax            /* LME */
    wrmsr
    movl %cr0, %eax
    orl $(1 << 31), %eax           /* PG */
    movl %eax, %cr0
    ljmpl $0x18, $start64

    .code64
start64:
    leaq message(%rip), %rsi
    movl $(message_end - message), %ecx
    movw $DEBUG_PORT, %dx
    rep outsb
    movw $PM1A_CNT, %dx
    movw $S5_SLEEP, %ax
    outw %ax, %dx
1:  hlt
    jmp 1b

    .balign 8
gdt:
    .quad 0
    .quad 0x00CF9B000000FFFF       /* 0x08: 32-bit code (accessed: the GDT is in ROM) */
    .quad 0x00CF93000000FFFF       /* 0x10: data */
    .quad 0x00AF9B000000FFFF       /* 0x18: 64-bit code */
gdt_end:
gdt_descriptor:
    .word gdt_end - gdt - 1
    .long gdt

message:
    .ascii "hello from long mode\n"
message_end:

    RESET_VECTOR start16
