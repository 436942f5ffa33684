/* A guest for the GDB stub test: long mode, a known instruction to stop at
 * (`breakhere`), known register and memory contents, then print and power off. */
#include "rom.inc"

    ROM_START
#include "longmode.inc"

main64:
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
