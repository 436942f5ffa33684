/* The multiboot test kernel's header and entry.  The header asks for page-
 * aligned modules and memory information (flags bits 0 and 1); built with
 * AOUT_KLUDGE it also gives the load addresses (bit 16), so that the flat
 * binary, which has no ELF headers, can be loaded from them alone. */
#define MB_MAGIC 0x1BADB002
#ifdef AOUT_KLUDGE
#define MB_FLAGS 0x00010003
#else
#define MB_FLAGS 0x00000003
#endif

    .section .prefix, "a"
    .ascii "multiboot test kernel\0"       /* the first bytes at load_addr */
    .balign 4

    .section .multiboot, "a"
    .balign 4
mb_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
#ifdef AOUT_KLUDGE
    .long mb_header                     /* header_addr */
    .long __load_start                  /* load_addr */
    .long __load_end                    /* load_end_addr: .text to .data */
    .long __bss_end                     /* bss_end_addr: zeroed by the loader */
    .long mb_start                      /* entry_addr */
#endif

/* Entry: 32-bit protected mode, flat segments, no paging, interrupts off,
 * EAX = 0x2BADB002, EBX = the multiboot information; the stack is ours. */
    .text
    .code32
    .globl mb_start
mb_start:
    movl %eax, entry_eax
    movl $stack_top, %esp               /* ESP is undefined at entry */
    pushfl
    popl entry_eflags
    movl %ebx, entry_ebx
    movl %cr0, %eax
    movl %eax, entry_cr0
    movw %cs, entry_cs
    movw %ds, entry_ds
    movw %ss, entry_ss
    call mb_main
1:  cli
    hlt
    jmp 1b

    .data
    .globl entry_eax, entry_ebx, entry_eflags, entry_cr0, entry_cs, entry_ds, entry_ss
entry_eax:    .long 0
entry_ebx:    .long 0
entry_eflags: .long 0
entry_cr0:    .long 0
entry_cs:     .word 0
entry_ds:     .word 0
entry_ss:     .word 0

    .section .bss
    .balign 16
    .skip 8192
stack_top:

    .section .note.GNU-stack, "", @progbits
