/* Real mode: print a line on the debug port, then power off. */
#include "rom.inc"

    ROM_START
    .code16
start16:
    cli
    movw $ROM_ALIAS_SEG, %ax
    movw %ax, %ds
    movw $ROMOFF(message), %si
    movw $DEBUG_PORT, %dx
1:  lodsb
    testb %al, %al
    jz 2f
    outb %al, %dx
    jmp 1b
2:  POWEROFF16

message:
    .asciz "hello from real mode\n"

    RESET_VECTOR start16
