/* COUNT iterations of a two-instruction loop with no exits, then power off:
 * timing it tells whether guest code runs natively or through an emulator. */
#include "rom.inc"

    ROM_START
    .code16
start16:
    cli
    movl $COUNT, %ecx
1:  decl %ecx
    jnz 1b
    POWEROFF

    RESET_VECTOR start16
