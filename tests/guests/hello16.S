/* Real mode: print a line on the debug port, then power off. */
#include "rom.inc"

    ROM_START
    .code16
start16:
    cli
    PRINT16 message, message_end
    POWEROFF

message:
    .ascii "hello from real mode\n"
message_end:

    RESET_VECTOR start16
