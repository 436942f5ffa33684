/* Long mode: enable the HPET, then time 32 reads of its main counter with rdtsc
   around each, as Linux's tsc_read_refs() does when it calibrates the TSC against
   the HPET (it gives up when five reads in a row take 50000 TSC cycles or more).
   Prints "hpet-read min M max X" (TSC cycles, hex), then powers off. */
#include "rom.inc"

#define HPET_CONF    0xFED00010
#define HPET_COUNTER 0xFED000F0
#define READS 32

    ROM_START
#include "longmode.inc"

main64:
    movl $HPET_CONF, %ebx
    movl $1, (%rbx)                  /* ENABLE_CNF */
    movq $-1, %r12                   /* min */
    xorq %r13, %r13                  /* max */
    movl $READS, %r14d
1:  rdtsc
    shlq $32, %rdx
    orq %rax, %rdx
    movq %rdx, %r15
    movl $HPET_COUNTER, %ebx
    movl (%rbx), %eax
    rdtsc
    shlq $32, %rdx
    orq %rax, %rdx
    subq %r15, %rdx
    cmpq %r12, %rdx
    jae 2f
    movq %rdx, %r12
2:  cmpq %r13, %rdx
    jbe 3f
    movq %rdx, %r13
3:  decl %r14d
    jnz 1b
    leaq prefix(%rip), %rsi
    call puts
    movq %r12, %rax
    xorl %ecx, %ecx
    call puthex
    leaq middle(%rip), %rsi
    call puts
    movq %r13, %rax
    xorl %ecx, %ecx
    call puthex
    movb $'\n', %al
    movw $DEBUG_PORT, %dx
    outb %al, %dx
    POWEROFF

prefix: .asciz "hpet-read min "
middle: .asciz " max "

#include "lib64.inc"
hex_digits: .ascii "0123456789abcdef"
    RESET_VECTOR start16
