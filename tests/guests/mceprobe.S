/* Long mode: the machine-check architecture as the guest sees it.  Prints
 * CPUID leaf 1 EDX's MCE and MCA bits, then "MSR=VALUE" for MCG_CAP,
 * MCG_STATUS, MCG_CTL and the four MSRs of each bank MCG_CAP counts; then
 * clears MC2_CTL (0 is one of the two values a guest may write there) and
 * reads it back; then "done", and powers off.  Compared line by line with
 * what the same guest prints under QEMU. */
#include "rom.inc"
#define MCG_CAP 0x179
#define MCG_STATUS 0x17A
#define MCG_CTL 0x17B
#define MC0_CTL 0x400
#define MC2_CTL 0x408

    ROM_START
#include "longmode.inc"

main64:
    PRINT_STR "cpuid1.edx.mce_mca="
    movl $1, %eax
    xorl %ecx, %ecx
    cpuid
    movl %edx, %eax
    andl $((1 << 7) | (1 << 14)), %eax
    movl $4, %ecx
    call puthex
    call putnl
    movl $MCG_CAP, %ebx
    call show
    movl $MCG_STATUS, %ebx
    call show
    movl $MCG_CTL, %ebx
    call show
    movl $MCG_CAP, %ecx            /* banks: MCG_CAP[7:0] */
    rdmsr
    movzbl %al, %r12d
    shll $2, %r12d
    addl $MC0_CTL, %r12d
    movl $MC0_CTL, %ebx
1:  cmpl %r12d, %ebx
    jae 2f
    call show
    incl %ebx
    jmp 1b
2:  movl $MC2_CTL, %ecx
    xorl %eax, %eax
    xorl %edx, %edx
    wrmsr
    movl $MC2_CTL, %ebx
    call show
    PRINT_STR "done\n"
    POWEROFF

show:                              /* %ebx: MSR; prints "MSR=VALUE\n" */
    movl %ebx, %eax
    movl $3, %ecx
    call puthex
    movb $'=', %al
    outb %al, %dx
    movl %ebx, %ecx
    rdmsr
    shlq $32, %rdx
    movl %eax, %eax
    orq %rdx, %rax
    movl $16, %ecx
    call puthex
    jmp putnl

#include "lib64.inc"
hex_digits: .ascii "0123456789abcdef"
    RESET_VECTOR start16
