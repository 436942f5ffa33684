/* A 512-byte MBR: print a line on COM1, read the disk's second sector through
 * the BIOS (int 13h) and print the text it holds, then power off through the
 * ACPI PM1a control register (bhyve's 0x404; QEMU's isa-debug-exit sits there
 * in the QEMU reference run).  Linked at 0x7C00, where the BIOS loads it. */
    .code16
    .text
    .globl _start
_start:
    cli
    xorw %ax, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw $0x7C00, %sp
    cld
    movb %dl, boot_drive
    movw $hello, %si
    call print
    movw $0x0201, %ax           /* read 1 sector */
    movw $0x0002, %cx           /* cylinder 0, sector 2 */
    xorb %dh, %dh               /* head 0 */
    movb boot_drive, %dl
    movw $0x8000, %bx           /* to 0000:8000 */
    int $0x13
    jc 1f
    movw $0x8000, %si
    call print
    jmp 2f
1:  movw $failed, %si
    call print
2:  movw $0x404, %dx
    movw $((5 << 10) | (1 << 13)), %ax   /* SLP_TYP=5 (S5), SLP_EN */
    outw %ax, %dx
3:  hlt
    jmp 3b

/* print the NUL-terminated string at %si on COM1, waiting for THRE */
print:
    lodsb
    testb %al, %al
    jz 2f
    movb %al, %bl
    movw $0x3FD, %dx
1:  inb %dx, %al
    testb $0x20, %al
    jz 1b
    movw $0x3F8, %dx
    movb %bl, %al
    outb %al, %dx
    jmp print
2:  ret

boot_drive: .byte 0
hello:  .asciz "MBR: hello from the boot sector\r\n"
failed: .asciz "MBR: int 13h read failed\r\n"

    . = _start + 510
    .byte 0x55, 0xAA
