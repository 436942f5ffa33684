/* Echo what arrives on COM1 back to COM1, polling the line status register;
 * power off on 'q'.  Prints "ready" on the debug port first.  Real mode, no
 * interrupts: a console test needs only the UART's data path. */
#include "rom.inc"
#define COM1_DATA 0x3f8
#define COM1_LSR  0x3fd
#define LSR_DATA_READY 0x01
#define LSR_THR_EMPTY  0x20

    ROM_START
    .code16
start16:
    cli
    PRINT16 message, message_end
wait_input:
    movw $COM1_LSR, %dx
    inb %dx, %al
    testb $LSR_DATA_READY, %al
    jz wait_input
    movw $COM1_DATA, %dx
    inb %dx, %al
    cmpb $'q', %al
    je quit
    movb %al, %bl
    movw $COM1_LSR, %dx
wait_output:
    inb %dx, %al
    testb $LSR_THR_EMPTY, %al
    jz wait_output
    movw $COM1_DATA, %dx
    movb %bl, %al
    outb %al, %dx
    jmp wait_input
quit:
    POWEROFF

message:
    .ascii "ready\n"
message_end:

    RESET_VECTOR start16
