/* Real mode checks reported on the debug port:
 *  - reads of an unclaimed port return all ones at widths 1, 2 and 4;
 *  - writes to the bootrom's alias below 1 MiB are ignored (it is ROM). */
#include "rom.inc"
#define UNCLAIMED_PORT 0x99

    ROM_START
    .code16
start16:
    cli
    movw $ROM_ALIAS_SEG, %ax
    movw %ax, %ds
    inb $UNCLAIMED_PORT, %al
    cmpb $0xFF, %al
    jne fail
    inw $UNCLAIMED_PORT, %ax
    cmpw $0xFFFF, %ax
    jne fail
    inl $UNCLAIMED_PORT, %eax
    cmpl $0xFFFFFFFF, %eax
    jne fail
    movw $ROMOFF(ok_ports), %si
    call puts16
    movb ROMOFF(rom_byte), %al
    movb $0x00, ROMOFF(rom_byte)
    cmpb ROMOFF(rom_byte), %al
    jne fail
    movw $ROMOFF(ok_rom), %si
    call puts16
    POWEROFF
fail:
    movw $ROMOFF(failed), %si
    call puts16
    POWEROFF

#include "lib16.inc"

ok_ports: .asciz "unclaimed ports read all ones\n"
ok_rom:   .asciz "rom writes ignored\n"
failed:   .asciz "FAILED\n"
rom_byte: .byte 0xA5

    RESET_VECTOR start16
