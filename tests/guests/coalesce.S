/* Writes that KVM may queue rather than exit for (coalesced PIO) reach their
 * device in the guest's order.  Long mode; prints NAME=VALUE lines on the
 * debug port, whose writes exit but flush nothing:
 * - COM1 in loopback, FIFOs on, interrupts off: two bytes written to THR
 *   are in the receive FIFO when LSR and RBR are read;
 * - the same with the received-data interrupt enabled (THR writes exit);
 * - CMOS bytes chosen through the RTC's index ports 0x70 and 0x72, with
 *   POST-port (0x80) writes between, read back as written;
 * - out of loopback, the THR-empty interrupt enabled, a THR write raises
 *   it (IIR) and reading IIR acknowledges it.
 * Then "done", and power off; with SPIN defined, COM1 gets SPIN_TEXT with
 * its interrupts off instead and the guest spins without another exit. */
#include "rom.inc"
#define THR 0x3F8
#define IER 0x3F9
#define IIR 0x3FA
#define FCR 0x3FA
#define MCR 0x3FC
#define LSR 0x3FD
#define RTC_INDEX 0x70
#define RTC_DATA 0x71
#define RTC_EXT_INDEX 0x72
#define RTC_EXT_DATA 0x73
#define POST 0x80

.macro WRITE_PORT port, value
    movw $\port, %dx
    movb $\value, %al
    outb %al, %dx
.endm

.macro SHOW name, port             /* "NAME=XX\n": the byte read at PORT */
    PRINT_STR "\name="
    movw $\port, %dx
    inb %dx, %al
    movzbl %al, %eax
    movl $2, %ecx
    call puthex
    call putnl
.endm

    ROM_START
#include "longmode.inc"

main64:
#ifdef SPIN
    leaq spin_text(%rip), %rsi
    movl $(spin_text_end - spin_text), %ecx
    movw $THR, %dx
    rep outsb
1:  jmp 1b
#endif
    WRITE_PORT MCR, 0x10                 /* loopback */
    WRITE_PORT FCR, 0x07                 /* FIFOs on and empty, trigger level 1 */
    WRITE_PORT THR, 'A'
    WRITE_PORT THR, 'B'
    SHOW lsr, LSR
    SHOW rbr, THR
    SHOW rbr, THR
    SHOW lsr, LSR
    WRITE_PORT IER, 0x01                 /* received data */
    WRITE_PORT THR, 'C'
    SHOW iir, IIR
    SHOW rbr, THR
    SHOW iir, IIR
    WRITE_PORT IER, 0x00

    WRITE_PORT RTC_INDEX, 0x40
    WRITE_PORT POST, 0x11
    WRITE_PORT RTC_DATA, 0x5A
    WRITE_PORT RTC_INDEX, 0x41
    WRITE_PORT POST, 0x22
    WRITE_PORT RTC_DATA, 0xA5
    WRITE_PORT RTC_INDEX, 0x40
    SHOW cmos40, RTC_DATA
    WRITE_PORT RTC_INDEX, 0x41
    SHOW cmos41, RTC_DATA
    WRITE_PORT RTC_EXT_INDEX, 0x10
    WRITE_PORT RTC_EXT_DATA, 0x77
    WRITE_PORT RTC_EXT_INDEX, 0x11
    WRITE_PORT RTC_EXT_DATA, 0x88
    WRITE_PORT RTC_EXT_INDEX, 0x10
    SHOW cmos90, RTC_EXT_DATA

    WRITE_PORT MCR, 0x00
    WRITE_PORT IER, 0x02                 /* THR empty */
    SHOW iir, IIR                  /* enabling it with THR empty raises it */
    WRITE_PORT THR, 'x'
    SHOW iir, IIR
    SHOW iir, IIR
    WRITE_PORT IER, 0x00
    PRINT_STR "done\n"
    POWEROFF

#ifdef SPIN
spin_text: .ascii "queued, then idle\n"
spin_text_end:
#endif
#include "lib64.inc"
hex_digits: .ascii "0123456789abcdef"
    RESET_VECTOR start16
