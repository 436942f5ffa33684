/* The PVH test kernel's entry: 32-bit protected mode without paging, flat
 * segments, interrupts off, EBX = the hvm_start_info, any stack. */
    .section .head, "ax"
    .code32
    .globl pvh_start
pvh_start:
    cli
    cld
    /* .bss (which holds the stack) is ours to clear; EBX survives. */
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    xorl %eax, %eax
    rep stosb
    movl $stack_top, %esp
    pushl %ebx
    call pvh_main
1:  cli
    hlt
    jmp 1b

    /* The note a PVH loader looks for: name "Xen", type 18
     * (XEN_ELFNOTE_PHYS32_ENTRY), the 32-bit entry's physical address. */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                             /* namesz: "Xen\0" */
    .long 4                             /* descsz */
    .long 18                            /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long pvh_start

    .section .bss
    .balign 16
    .skip 16384
stack_top:

    .section .note.GNU-stack, "", @progbits
