/* COUNT port writes to EXIT_PORT (one VM exit each), then power off.
 * bench/exits.py times this loop.  The default port is 0x92 (System Control
 * Port A, writing 0 keeps A20 off and resets nothing): KVM queues writes to
 * the POST port 0x80 rather than exit for them (pyhyve/coalesced.py). */
#include "rom.inc"

#ifndef COUNT
#define COUNT 100000
#endif
#ifndef EXIT_PORT
#define EXIT_PORT 0x92
#endif

    ROM_START
    .code16
start16:
    cli
    movl $COUNT, %ecx
    xorb %al, %al                /* the value written */
    movw $EXIT_PORT, %dx         /* through %dx: ports above 0xFF need it */
1:  outb %al, %dx
    decl %ecx
    jnz 1b
    POWEROFF

    RESET_VECTOR start16
