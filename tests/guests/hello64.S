/* Switch from real mode to 64-bit long mode, print with `rep outsb`, power off. */
#include "rom.inc"

    ROM_START
#include "longmode.inc"

main64:
    PRINT64 message, message_end
    POWEROFF

message:
    .ascii "hello from long mode\n"
message_end:

    RESET_VECTOR start16
