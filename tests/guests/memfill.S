/* Fill guest RAM from 1 MiB up to FILL_END with a non-zero pattern, print
 * "filled" on the debug port, then print a "." every TICK_DELAY loops for
 * ever.  bench/snapshot.py suspends it: every page of the guest is in use,
 * so the snapshot carries all of its memory, and the first "." a restored
 * VM prints shows it runs again.  With DIRTY_PAGES, each tick also changes
 * that many pages, walking through the filled area (bench/migrate.py: a
 * guest that dirties memory at a set rate).  32-bit protected mode, no
 * paging. */
#include "rom.inc"
#ifndef FILL_END
#define FILL_END (256 << 20)
#endif
#ifndef TICK_DELAY
#define TICK_DELAY 5000
#endif
#ifndef DIRTY_PAGES
#define DIRTY_PAGES 0
#endif
#define FILL_START (1 << 20)
#define PATTERN 0x5AA5F00D

    ROM_START
#include "pmode.inc"

main32:
    cld
    movl $FILL_START, %edi
    movl $((FILL_END - FILL_START) / 4), %ecx
    movl $PATTERN, %eax
    rep stosl
    movl $filled, %esi
    movl $(filled_end - filled), %ecx
    movw $DEBUG_PORT, %dx
    rep outsb
    movl $FILL_START, %esi          /* the next page to dirty */
tick:
#if DIRTY_PAGES
    movl $DIRTY_PAGES, %ebx
2:  incl (%esi)
    addl $4096, %esi
    cmpl $FILL_END, %esi
    jb 3f
    movl $FILL_START, %esi
3:  decl %ebx
    jnz 2b
#endif
    movl $TICK_DELAY, %ecx
1:  decl %ecx
    jnz 1b
    movb $'.', %al
    outb %al, %dx
    jmp tick

filled:
    .ascii "filled\n"
filled_end:

    RESET_VECTOR start16
