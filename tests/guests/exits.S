/* COUNT port writes to EXIT_PORT (one VM exit each), then power off.
 * bench/exits.py times this loop. */
#include "rom.inc"

#ifndef COUNT
#define COUNT 100000
#endif
#ifndef EXIT_PORT
#define EXIT_PORT 0x80
#endif

    ROM_START
    .code16
start16:
    cli
    movl $COUNT, %ecx
    movw $EXIT_PORT, %dx         /* through %dx: ports above 0xFF need it */
1:  outb %al, %dx
    decl %ecx
    jnz 1b
    POWEROFF

    RESET_VECTOR start16
