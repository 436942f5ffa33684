/* Count in RAM: increment a counter at COUNTER_ADDR, print "count N" on the
 * debug port every EVERY increments (after a busy-wait of DELAY loops per
 * increment), power off once it reaches TARGET.  32-bit protected mode.
 * Used by the snapshot tests: all its state is in RAM and registers. */
#include "rom.inc"
#ifndef TARGET
#define TARGET 200
#endif
#ifndef EVERY
#define EVERY 10
#endif
#ifndef DELAY
#define DELAY 200000
#endif
#define COUNTER_ADDR 0x10000

    ROM_START
#include "pmode.inc"

main32:
    movl $0, COUNTER_ADDR
next:
    movl $DELAY, %ecx
1:  decl %ecx
    jnz 1b
    incl COUNTER_ADDR
    movl COUNTER_ADDR, %eax
    xorl %edx, %edx
    movl $EVERY, %ebx
    divl %ebx
    testl %edx, %edx
    jnz check
    /* "count " then the decimal number, then a newline */
    movw $DEBUG_PORT, %dx
    movl $prefix, %esi
    movl $(prefix_end - prefix), %ecx
    rep outsb
    movl COUNTER_ADDR, %eax
    movl $0x5000, %edi          /* digit buffer in RAM, filled backwards */
    xorl %ecx, %ecx
2:  xorl %edx, %edx
    movl $10, %ebx
    divl %ebx
    addb $'0', %dl
    decl %edi
    movb %dl, (%edi)
    incl %ecx
    testl %eax, %eax
    jnz 2b
    movl %edi, %esi
    movw $DEBUG_PORT, %dx
    rep outsb
    movb $'\n', %al
    outb %al, %dx
check:
    cmpl $TARGET, COUNTER_ADDR
    jb next
    POWEROFF

prefix:
    .ascii "count "
prefix_end:

    RESET_VECTOR start16
