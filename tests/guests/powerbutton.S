/* Waits for the ACPI power button: prints "waiting", polls PM1a_STS until
 * PWRBTN_STS is set, prints "button", then powers off (S5), or with
 * -DREBOOT=1 resets itself through the reset control register (0xCF9).
 * A guest that listens, for the tests of pyhyvectl --powerdown and QMP's
 * system_powerdown. */
#include "rom.inc"

#define PM1A_STS     0x400
#define PWRBTN_STS   (1 << 8)

    ROM_START
    .code16
start16:
    cli
    PRINT16 waiting, waiting_end
    movw $PM1A_STS, %dx
1:  inw %dx, %ax
    testw $PWRBTN_STS, %ax
    jz 1b
    PRINT16 button, button_end
#ifdef REBOOT
    movw $0xCF9, %dx
    movb $0x06, %al
    outb %al, %dx
1:  hlt
    jmp 1b
#else
    POWEROFF
#endif

waiting:
    .ascii "waiting\n"
waiting_end:
button:
    .ascii "button\n"
button_end:

    RESET_VECTOR start16
