/* A bzImage with no 64-bit entry, for -f kexec's 16-bit entry: a boot sector
 * with the setup header (boot protocol PROTOCOL, 2.01 or later; no
 * XLF_KERNEL_64), setup code, and one sector of "protected-mode kernel" that
 * only carries a signature.  A loader puts the boot sector and setup at X
 * (pyhyve 0x90000; QEMU 0x10000 or 0x90000), the rest at 1 MiB, fills in the
 * header and starts the setup code in real mode at CS:IP = X/16 + 0x20:0,
 * DS = ES = FS = GS = SS = X/16, SP at the heap's end, interrupts off.
 *
 * The setup code reports, one fact a line on the debug port 0x402:
 *   entry cs=.... ds=.... es=.... fs=.... gs=.... ss=.... sp=.... ip=.... if=.
 *         (ip: where CS:IP pointed at entry, in the code segment; 0 for the
 *          boot protocol's CS = X/16 + 0x20, IP = 0)
 *   header loadflags=.. heap_end_ptr=.... type_of_loader=.. vid_mode=....
 *   cmdline_ptr=........                    (2.02+: cmd_line_ptr; before, the
 *                                            0xA33F magic's offset made linear)
 *   cmdline: <the command line>
 *   initrd: ........ bytes at ........ fnv1a=........   (or "initrd: none")
 *   kernel: signature at 0x100000 ok        (or "kernel: no signature at 0x100000")
 *   done
 * and powers off through the PM1a control port bhyve's FADT describes.
 * Memory above 1 MiB is read in unreal mode (FS with a 4 GiB limit).
 * Linked at 0: every label is an offset from X. */
#include "rom.inc"

#ifndef PROTOCOL
#define PROTOCOL 0x0202
#endif
#define SETUP_SECTS 2
#define CAN_USE_HEAP 0x80

    .code16
    .section .text, "ax"
    .globl _start
_start:
    .org 0x020
cmd_line_magic:     .word 0             /* before 2.02: 0xA33F, then the offset */
cmd_line_offset:    .word 0
    .org 0x1F1
setup_sects:        .byte SETUP_SECTS
root_flags:         .word 0
syssize:            .long 32            /* 512 bytes in 16-byte units */
ram_size:           .word 0
vid_mode:           .word 0xFFFF        /* NORMAL_VGA */
root_dev:           .word 0
boot_flag:          .word 0xAA55
    /* 0x200: CS:IP at entry; a jump over the header, its length */
                    .byte 0xEB, start_of_setup - 1f
1:
header:             .ascii "HdrS"
version:            .word PROTOCOL
realmode_swtch:     .long 0
start_sys_seg:      .word 0x1000
kernel_version:     .word 0
type_of_loader:     .byte 0
loadflags:          .byte 0x01          /* LOADED_HIGH */
setup_move_size:    .word 0x8000
code32_start:       .long 0x100000
ramdisk_image:      .long 0
ramdisk_size:       .long 0
bootsect_kludge:    .long 0
heap_end_ptr:       .word 0
ext_loader_ver:     .byte 0
ext_loader_type:    .byte 0
cmd_line_ptr:       .long 0
initrd_addr_max:    .long 0x7FFFFFFF
kernel_alignment:   .long 0x200000
relocatable_kernel: .byte 0
min_alignment:      .byte 0
xloadflags:         .word 0             /* no XLF_KERNEL_64: no 64-bit entry */
cmdline_size:       .long 255

/* What the loader left, saved through CS before anything changes it. */
#define SAVE(reg, var) movw reg, %cs:(var - 0x200)
start_of_setup:
    SAVE(%sp, saved_sp)
    SAVE(%ss, saved_ss)
    SAVE(%ds, saved_ds)
    SAVE(%es, saved_es)
    SAVE(%fs, saved_fs)
    SAVE(%gs, saved_gs)
    SAVE(%cs, saved_cs)
    pushfw
    popw %cs:(saved_flags - 0x200)
    call 1f
1:  popw %cs:(saved_ip - 0x200)
    cli
    cld
    /* From here DS = the setup area (CS - 0x20), whatever the loader set. */
    movw %cs, %ax
    subw $0x20, %ax
    movw %ax, %ds
    movw %ax, %es

    movw $s_entry_cs, %si
    movw saved_cs, %ax
    call put_field
    movw $s_ds, %si
    movw saved_ds, %ax
    call put_field
    movw $s_es, %si
    movw saved_es, %ax
    call put_field
    movw $s_fs, %si
    movw saved_fs, %ax
    call put_field
    movw $s_gs, %si
    movw saved_gs, %ax
    call put_field
    movw $s_ss, %si
    movw saved_ss, %ax
    call put_field
    movw $s_sp, %si
    movw saved_sp, %ax
    call put_field
    movw $s_ip, %si
    movw saved_ip, %ax
    subw $(1b - 0x200), %ax             /* the IP the loader jumped to */
    call put_field
    movw $s_if, %si
    call puts
    movw saved_flags, %ax
    shrw $9, %ax
    andb $1, %al
    addb $'0', %al
    call putc
    call newline

    movw $s_loadflags, %si
    call puts
    movb loadflags, %al
    call put_hex8
    movw $s_heap_end_ptr, %si
    movw heap_end_ptr, %ax
    call put_field
    movw $s_type_of_loader, %si
    call puts
    movb type_of_loader, %al
    call put_hex8
    movw $s_vid_mode, %si
    movw vid_mode, %ax
    call put_field
    call newline

    /* The command line's linear address: cmd_line_ptr, or before 2.02 the
     * offset after the 0xA33F magic, in this segment. */
#if PROTOCOL >= 0x0202
    movl cmd_line_ptr, %ebx
#else
    xorl %ebx, %ebx
    cmpw $0xA33F, cmd_line_magic
    jne 2f
    movw %ds, %bx
    shll $4, %ebx
    movzwl cmd_line_offset, %eax
    addl %eax, %ebx
2:
#endif
    movw $s_cmdline_ptr, %si
    call puts
    movl %ebx, %eax
    call put_hex32
    call newline

    call unreal_fs
    movw $s_cmdline, %si
    call puts
    testl %ebx, %ebx
    jz 4f
    movw $4096, %cx
3:  movb %fs:(%ebx), %al
    testb %al, %al
    jz 4f
    call putc
    incl %ebx
    loop 3b
4:  call newline

    movw $s_initrd, %si
    call puts
    movl ramdisk_size, %ecx
    testl %ecx, %ecx
    jnz 5f
    movw $s_none, %si
    call puts
    jmp 7f
5:  movl %ecx, %eax
    call put_hex32
    movw $s_bytes_at, %si
    call puts
    movl ramdisk_image, %eax
    call put_hex32
    movl ramdisk_image, %ebx
    movl $0x811C9DC5, %eax              /* FNV-1a, 32 bits */
6:  xorb %fs:(%ebx), %al
    imull $0x01000193, %eax
    incl %ebx
    decl %ecx
    jnz 6b
    movw $s_fnv, %si
    call puts
    call put_hex32
7:  call newline

    movl $0x100000, %ebx
    movw $s_kernel_ok, %si
    cmpl $0x36314D50, %fs:(%ebx)        /* "PM16" */
    jne 8f
    cmpl $0x4E52454B, %fs:4(%ebx)       /* "KERN" */
    je 9f
8:  movw $s_kernel_bad, %si
9:  call puts
    movw $s_done, %si
    call puts
    POWEROFF

/* FS: base 0, limit 4 GiB, kept after a return to real mode ("unreal mode"). */
unreal_fs:
    movw %ds, %ax
    movzwl %ax, %eax
    shll $4, %eax
    addl $gdt, %eax
    movl %eax, gdt_base
    lgdtl gdt_limit
    movl %cr0, %eax
    orb $1, %al
    movl %eax, %cr0
    jmp 1f
1:  movw $0x08, %dx
    movw %dx, %fs
    andb $0xFE, %al
    movl %eax, %cr0
    jmp 2f
2:  ret

/* SI: a label; AX: a value printed as 4 hex digits after it. */
put_field:
    call puts
    jmp put_hex16

put_hex32:
    rorl $16, %eax
    call put_hex16
    rorl $16, %eax
put_hex16:
    xchgb %al, %ah
    call put_hex8
    xchgb %al, %ah
put_hex8:
    pushw %ax
    shrb $4, %al
    call put_nibble
    popw %ax
    pushw %ax
    call put_nibble
    popw %ax
    ret
put_nibble:
    andb $0x0F, %al
    addb $'0', %al
    cmpb $'9', %al
    jbe putc
    addb $('a' - '0' - 10), %al
putc:
    pushw %dx
    movw $DEBUG_PORT, %dx
    outb %al, %dx
    popw %dx
    ret
newline:
    movb $'\n', %al
    jmp putc
puts:                                   /* DS:SI, NUL-terminated */
    pushw %ax
1:  lodsb
    testb %al, %al
    jz 2f
    call putc
    jmp 1b
2:  popw %ax
    ret

    .balign 8
gdt:
    .quad 0
    .quad 0x00CF93000000FFFF            /* 0x08: flat data, 4 GiB */
gdt_limit:
    .word 15
gdt_base:
    .long 0

saved_sp:    .word 0
saved_ss:    .word 0
saved_ds:    .word 0
saved_es:    .word 0
saved_fs:    .word 0
saved_gs:    .word 0
saved_cs:    .word 0
saved_flags: .word 0
saved_ip:    .word 0

s_entry_cs:       .asciz "entry cs="
s_ds:             .asciz " ds="
s_es:             .asciz " es="
s_fs:             .asciz " fs="
s_gs:             .asciz " gs="
s_ss:             .asciz " ss="
s_sp:             .asciz " sp="
s_ip:             .asciz " ip="
s_if:             .asciz " if="
s_loadflags:      .asciz "header loadflags="
s_heap_end_ptr:   .asciz " heap_end_ptr="
s_type_of_loader: .asciz " type_of_loader="
s_vid_mode:       .asciz " vid_mode="
s_cmdline_ptr:    .asciz "cmdline_ptr="
s_cmdline:        .asciz "cmdline: "
s_initrd:         .asciz "initrd: "
s_none:           .asciz "none"
s_bytes_at:       .asciz " bytes at "
s_fnv:            .asciz " fnv1a="
s_kernel_ok:      .asciz "kernel: signature at 0x100000 ok\n"
s_kernel_bad:     .asciz "kernel: no signature at 0x100000\n"
s_done:           .asciz "done\n"

    /* The protected-mode kernel: a signature the setup code looks for. */
    .org (SETUP_SECTS + 1) * 512
    .ascii "PM16KERN"
    .fill 512 - 8, 1, 0xF4
