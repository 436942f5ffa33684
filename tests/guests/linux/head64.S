/* The protected-mode part of the bzImage test kernel, loaded at 1 MiB
 * (code32_start).  Offset 0 is where a 32-bit boot protocol loader would
 * enter; this kernel only offers the 64-bit entry (XLF_KERNEL_64), so that
 * one halts.  Offset 0x200 is the 64-bit entry: long mode, the first 4 GiB
 * identity-mapped, interrupts off, RSI = the zero page, any stack. */
    .section .head, "ax"
    .code32
startup_32:
    cli
1:  hlt
    jmp 1b

    .org 0x200
    .code64
    .globl startup_64
startup_64:
    cli
    cld
    /* .bss (which holds the stack) is ours to clear: loaders only copy the file. */
    movq $__bss_start, %rdi
    movq $__bss_end, %rcx
    subq %rdi, %rcx
    xorl %eax, %eax
    rep stosb
    movq $stack_top, %rsp
    movq %rsi, %rdi
    call bzimage_main
1:  cli
    hlt
    jmp 1b

    .section .bss
    .balign 16
    .skip 16384
stack_top:

    .section .note.GNU-stack, "", @progbits
