/* Reboots itself twice through the reset control register (0xCF9), counting
 * boots in RAM, which a warm reset keeps; then powers off.  Each boot prints
 * "boot N, port 0x92 = V": V is what port 0x92 holds at the start of the
 * boot, and the guest sets it to 2 before each reset, so a reset that left
 * the chipset alone shows V = 2. */
#include "rom.inc"

#define BOOTS 0x7000

    ROM_START
    .code16
start16:
    cli
    xorw %ax, %ax
    movw %ax, %es
    incb %es:BOOTS
    PRINT16 boot, boot_end
    movb %es:BOOTS, %al
    addb $'0', %al
    outb %al, %dx
    PRINT16 port, port_end
    inb $0x92, %al
    addb $'0', %al
    outb %al, %dx
    movb $'\n', %al
    outb %al, %dx
    cmpb $3, %es:BOOTS
    jae done
    movb $2, %al
    outb %al, $0x92
    movw $0xCF9, %dx
    movb $0x06, %al
    outb %al, %dx
1:  hlt
    jmp 1b
done:
    POWEROFF

boot:
    .ascii "boot "
boot_end:
port:
    .ascii ", port 0x92 = "
port_end:

    RESET_VECTOR start16
