/* Long mode: print EAX EBX ECX EDX of the CPUID leaves in `leaves`, one line each,
   then power off. */
#include "rom.inc"

    ROM_START
#include "longmode.inc"

main64:
    leaq leaves(%rip), %r12
1:  movl (%r12), %eax
    cmpl $0xFFFFFFFF, %eax
    je 3f
    xorl %ecx, %ecx
    cpuid
    movl %eax, %r13d
    movl %ebx, %r14d
    movl %ecx, %r15d
    movl %edx, %ebp
    movl %r13d, %eax
    call put32
    movl %r14d, %eax
    call put32
    movl %r15d, %eax
    call put32
    movl %ebp, %eax
    call put32
    movb $'\n', %al
    movw $DEBUG_PORT, %dx
    outb %al, %dx
    addq $4, %r12
    jmp 1b
3:  POWEROFF

put32:
    movl $8, %ecx
    call puthex
    movb $' ', %al
    movw $DEBUG_PORT, %dx
    outb %al, %dx
    ret

leaves: .long 0, 1, 7, 0xd, 0x80000001, 0x40000000, 0x40000001, 0xFFFFFFFF

#include "lib64.inc"
hex_digits: .ascii "0123456789abcdef"
    RESET_VECTOR start16
