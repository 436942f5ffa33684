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
    leaq message(%rip), %rsi
    movl $(message_end - message), %ecx
    movw $DEBUG_PORT, %dx
    rep outsb
    movw $PM1A_CNT, %dx
    movw $S5_SLEEP, %ax
    outw %ax, %dx
1:  hlt
    jmp 1b

    .globl message
message:
    .ascii "gdb guest done\n"
message_end:

    RESET_VECTOR start16
