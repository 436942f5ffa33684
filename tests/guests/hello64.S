/* Switch from real mode to 64-bit long mode, print with `rep outsb`, power off. */
#include "rom.inc"

    ROM_START
#include "longmode.inc"

main64:
    leaq message(%rip), %rsi
    movl $(message_end - message), %ecx
    movw $DEBUG_PORT, %dx
    rep outsb
    movw $PM1A_CNT, %dx
    movw $S5_SLEEP, %ax
    outw %ax, %dx
1:  hlt
    jmp 1b

message:
    .ascii "hello from long mode\n"
message_end:

    RESET_VECTOR start16
