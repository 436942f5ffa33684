/* Ask the keyboard controller to pulse the reset line (command 0xFE on port
 * 0x64), as operating systems do to reboot: bhyve's exit status 0. */
#include "rom.inc"

    ROM_START
    .code16
start16:
    cli
    movb $0xFE, %al
    outb %al, $0x64
1:  hlt
    jmp 1b

    RESET_VECTOR start16
