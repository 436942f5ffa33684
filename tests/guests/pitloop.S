/* Real mode: how many times the guest polls PIT channel 2's output (port 0x61 bit
   5) during a 10 ms one-shot count, as Linux's pit_calibrate_tsc() does (with
   rdtsc in the loop).  Linux gives up on the PIT below 1000 polls (CAL_PIT_LOOPS)
   and prints "tsc: Unable to calibrate against PIT".  Prints "polls N" (hex). */
#include "rom.inc"

#define PIT_LATCH_10MS 11932        /* 1193182 Hz / 100 */

    ROM_START
    .code16
start16:
    cli
    inb $0x61, %al
    andb $~0x02, %al                /* speaker off */
    orb $0x01, %al                  /* gate 2 high */
    outb %al, $0x61
    movb $0xB0, %al                 /* channel 2, lobyte/hibyte, mode 0 */
    outb %al, $0x43
    movw $PIT_LATCH_10MS, %ax
    outb %al, $0x42
    movb %ah, %al
    outb %al, $0x42
    xorl %esi, %esi
1:  incl %esi
    rdtsc
    inb $0x61, %al
    testb $0x20, %al
    jz 1b
    PRINT16 prefix, prefix_end
    movl $8, %ecx                   /* 8 hex digits of %esi */
2:  roll $4, %esi
    movl %esi, %eax
    andl $0xF, %eax
    addb $'0', %al
    cmpb $'9', %al
    jbe 3f
    addb $('a' - '0' - 10), %al
3:  movw $DEBUG_PORT, %dx
    outb %al, %dx
    loop 2b
    movb $'\n', %al
    outb %al, %dx
    POWEROFF

prefix:
    .ascii "polls "
prefix_end:

    RESET_VECTOR start16
