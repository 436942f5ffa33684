/* Read and write an MSR no CPU has.  With bhyve's x86.strictmsr (the default)
 * that is #GP; with no IDT the #GP becomes a triple fault.  With -w the read
 * returns 0 and the write is dropped, and the guest prints and powers off. */
#include "rom.inc"
#define UNKNOWN_MSR 0x40001234

    ROM_START
#include "longmode.inc"

main64:
    lidt null_idt(%rip)
    movl $UNKNOWN_MSR, %ecx
    rdmsr
    orl %edx, %eax
    jnz 1f
    wrmsr
    PRINT64 message, message_end
1:  POWEROFF

null_idt:
    .word 0
    .quad 0
message:
    .ascii "unknown msr ignored\n"
message_end:

    RESET_VECTOR start16
