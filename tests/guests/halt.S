/* Print a line, then halt with interrupts disabled: bhyve's exit status 2. */
#include "rom.inc"

    ROM_START
    .code16
start16:
    cli
    movw $ROM_ALIAS_SEG, %ax
    movw %ax, %ds
    movw $ROMOFF(message), %si
    movw $(message_end - message), %cx
    movw $DEBUG_PORT, %dx
    rep outsb
1:  hlt
    jmp 1b

message:
    .ascii "halting\n"
message_end:

    RESET_VECTOR start16
