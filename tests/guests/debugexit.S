/* isa-debug-exit: write VALUE, WIDTH bytes wide (1, 2 or 4), to port PORT.
 * If the VM goes on (the port is not the device's), print "missed" and
 * write 0x7e to END_PORT, where the test always puts the device. */
#include "rom.inc"

#ifndef PORT
#define PORT 0xf4
#endif
#ifndef VALUE
#define VALUE 0x21
#endif
#ifndef WIDTH
#define WIDTH 1
#endif
#ifndef END_PORT
#define END_PORT 0xf4
#endif

    ROM_START
    .code16
start16:
    cli
    movw $PORT, %dx
    movl $VALUE, %eax
#if WIDTH == 1
    outb %al, %dx
#elif WIDTH == 2
    outw %ax, %dx
#else
    outl %eax, %dx
#endif
    PRINT16 missed, missed_end
    movw $END_PORT, %dx
    movb $0x7e, %al
    outb %al, %dx
    POWEROFF

missed:
    .ascii "missed\n"
missed_end:

    RESET_VECTOR start16
