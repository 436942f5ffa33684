/* The bootrom's variable store (-l bootrom,ROM,VARS), in flat 32-bit mode:
 * the VARS_SIZE bytes just below this 64 KiB ROM, spoken to as CFI flash the
 * way EDK II's flash driver does.  Prints (8 hex digits each):
 *   count   the byte at offset 0, kept across runs
 *   plain   offset 1 after a plain write of 0x99 there (a command, not data)
 *   status  what a read returns after READ_STATUS (0x70)
 *   now     offset 0 after WRITE_BYTE (0x10) of count + 1
 *   dword   offset 4 after WRITE_BYTE and a 4-byte write of 0x44332211
 * then powers off. */
#include "rom.inc"

#ifndef VARS_SIZE
#define VARS_SIZE 0x1000
#endif
#define VARS         (ROM_BASE - VARS_SIZE)
#define WRITE_BYTE   0x10
#define READ_STATUS  0x70
#define READ_ARRAY   0xFF

.macro SHOW label, end
    pushl %eax
    movl $\label, %esi
    movl $(\end - \label), %ecx
    movw $DEBUG_PORT, %dx
    rep outsb
    popl %eax
    call show_eax
.endm

    ROM_START
#include "pmode.inc"

main32:
    cld
    movl $VARS, %ebx
    movzbl (%ebx), %edi              /* the count */
    movl %edi, %eax
    SHOW s_count, s_plain
    movb $0x99, 1(%ebx)              /* not a command EDK II sends: no data stored */
    movb $READ_ARRAY, 1(%ebx)
    movzbl 1(%ebx), %eax
    SHOW s_plain, s_status
    movb $READ_STATUS, (%ebx)
    movzbl (%ebx), %eax
    movb $READ_ARRAY, (%ebx)
    SHOW s_status, s_now
    leal 1(%edi), %eax
    movb $WRITE_BYTE, (%ebx)
    movb %al, (%ebx)
    movb $READ_ARRAY, (%ebx)
    movzbl (%ebx), %eax
    SHOW s_now, s_dword
    movb $WRITE_BYTE, 4(%ebx)
    movl $0x44332211, 4(%ebx)
    movb $READ_ARRAY, 4(%ebx)
    movl 4(%ebx), %eax
    SHOW s_dword, s_end
    POWEROFF

show_eax:                            /* %eax as 8 hex digits, then a newline */
    movl %eax, %esi
    movl $8, %ecx
    movw $DEBUG_PORT, %dx
1:  roll $4, %esi
    movl %esi, %eax
    andl $0xF, %eax
    movb hex_digits(%eax), %al
    outb %al, %dx
    loop 1b
    movb $'\n', %al
    outb %al, %dx
    ret

s_count:  .ascii "count "
s_plain:  .ascii "plain "
s_status: .ascii "status "
s_now:    .ascii "now "
s_dword:  .ascii "dword "
s_end:
hex_digits: .ascii "0123456789abcdef"
    RESET_VECTOR start16
