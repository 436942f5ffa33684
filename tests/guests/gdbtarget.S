/* A guest for the GDB stub test: long mode, a known instruction to stop at
 * (`breakhere`), known register and memory contents, then print and power off.
 * For `monitor phys`: virtual ALIAS + x is physical x (a 2 MiB page at
 * PD_LO entry 2), and physical KNOWN holds KNOWN_VALUE, so gdb reads it at
 * virtual ALIAS + KNOWN, and at KNOWN either way (identity-mapped too). */
#include "rom.inc"

#define ALIAS 0x400000
#define KNOWN 0x20000
    .globl known_phys, alias_virt
    .set known_phys, KNOWN
    .set alias_virt, ALIAS

    ROM_START
#include "longmode.inc"

main64:
    movq $0x83, PD_LO + (ALIAS >> 21) * 8    /* 2 MiB page at physical 0 */
    movq %cr3, %rax
    movq %rax, %cr3
    movabsq $0x0123456789abcdef, %rax
    movq %rax, KNOWN
    movabsq $0x1122334455667788, %rax
    .globl breakhere
breakhere:
    incq %rax                       /* gdb steps over this: rax + 1 */
    .globl after
after:
    PRINT64 message, message_end
    POWEROFF

    .globl message
message:
    .ascii "gdb guest done\n"
message_end:

    RESET_VECTOR start16
