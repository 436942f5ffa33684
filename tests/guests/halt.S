/* Print a line, then halt with interrupts disabled: bhyve's exit status 2. */
#include "rom.inc"

    ROM_START
    .code16
start16:
    cli
    PRINT16 message, message_end
1:  hlt
    jmp 1b

message:
    .ascii "halting\n"
message_end:

    RESET_VECTOR start16
