/* Enter 32-bit protected mode with an empty IDT and fault: #UD cannot be
 * delivered, nor can #DF, so the CPU shuts down (a triple fault).
 * (A real-mode divide error with a zero-limit IVT does not shut down under
 * this host's instruction emulator; the protected-mode path does.) */
#include "rom.inc"

    ROM_START
#include "pmode.inc"

main32:
    lidt idt_descriptor
    ud2                      /* #UD -> no IDT -> #DF -> no IDT -> shutdown */
1:  hlt
    jmp 1b

idt_descriptor:
    .word 0
    .long 0

    RESET_VECTOR start16
