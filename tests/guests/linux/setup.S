/* The real-mode setup area of the bzImage test kernel: the boot sector with
 * the setup header (Documentation/arch/x86/boot.rst), then the code a 16-bit
 * boot loader runs.
 *
 * pyhyve, like any 64-bit boot protocol loader, only reads the header here
 * and enters the protected-mode part at its 64-bit entry itself.  QEMU's
 * -kernel instead runs this code, as SeaBIOS-era loaders do: its option ROM
 * loads this area at 0x10000, sets DS = ES = SS to it and jumps to offset
 * 0x200 with CS = DS + 0x20.  So this code does what Linux's setup does for
 * a 64-bit kernel, without the decompressor: it copies the header into a
 * zero page, asks the BIOS for the E820 map, and enters long mode with its
 * own GDT and page tables to jump to the 64-bit entry (1 MiB + 0x200) with
 * RSI pointing at the zero page, the state pyhyve gives that entry.
 *
 * Linked at 0: every label is an offset from the start of the setup area.
 * The builder (tests/guests/kernels.py) fills in syssize and init_size. */

#define SETUP_SECTS 4                   /* 4 x 512 bytes after the boot sector */
#define KERNEL_64_ENTRY 0x100200        /* code32_start + 0x200 */
#define MSR_EFER 0xC0000080
#define SMAP 0x534D4150                 /* "SMAP", the E820 call's signature */
#define E820_MAX 128

/* struct boot_params offsets */
#define BP_E820_ENTRIES 0x1E8
#define BP_E820_TABLE   0x2D0

    .code16
    .section .text, "ax"
    .globl _start
_start:
    /* 0x000: the boot sector, which boot-protocol loaders never run. */
    .org 0x1F1
hdr:
setup_sects:        .byte SETUP_SECTS
root_flags:         .word 0
syssize:            .long 0             /* filled in by the builder */
ram_size:           .word 0
vid_mode:           .word 0xFFFF        /* NORMAL_VGA */
root_dev:           .word 0
boot_flag:          .word 0xAA55
    /* 0x200: a short jump over the header; its displacement is the header's length */
                    .byte 0xEB, start_of_setup - 1f
1:
header:             .ascii "HdrS"
version:            .word BOOT_PROTOCOL_VERSION
realmode_swtch:     .long 0
start_sys_seg:      .word 0x1000
kernel_version:     .word kernel_version_string - 0x200
type_of_loader:     .byte 0
loadflags:          .byte 0x01          /* LOADED_HIGH: the kernel goes at 1 MiB */
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
min_alignment:      .byte 21
xloadflags:         .word 0x0001        /* XLF_KERNEL_64: there is a 64-bit entry */
cmdline_size:       .long 2047
hardware_subarch:   .long 0
hardware_subarch_data: .quad 0
payload_offset:     .long 0
payload_length:     .long 0
setup_data:         .quad 0
pref_address:       .quad 0x100000
init_size:          .long 0             /* filled in by the builder */
handover_offset:    .long 0
kernel_info_offset: .long 0
hdr_end:

/* Memory this code uses, above itself in its 64 KiB segment (what the boot
 * protocol calls the heap; QEMU puts the command line at setup + 64 KiB):
 *   Z            the zero page: the next page boundary at least 4 KiB up
 *   Z + 0x1000   PML4, Z + 0x2000 PDPT, Z + 0x3000..0x6FFF four page
 *                directories mapping the first 4 GiB with 2 MiB pages
 *   Z + 0x8000   the top of the real-mode stack
 * Z - setup < 0x2000, so everything lies below setup + 0xA000. */
start_of_setup:
    cli
    cld
    /* Make CS equal DS (QEMU enters with CS = DS + 0x20), so that labels
     * work the same through either. */
    movw %ds, %ax
    pushw %ax
    pushw $1f
    lretw
1:  movw %ax, %es
    movw %ax, %ss
    movzwl %ax, %ebp
    shll $4, %ebp                       /* EBP: the setup area's linear address */
    leal 0x1FFF(%ebp), %ebx
    andl $~0xFFF, %ebx                  /* EBX: Z, linear */
    movl %ebx, zero_page_linear
    movl %ebx, %edi
    subl %ebp, %edi                     /* DI: Z as an offset in our segment */
    movw %di, zero_page_offset
    leal 0x8000(%edi), %esp

    /* A zeroed zero page and page tables. */
    xorl %eax, %eax
    movw $(7 * 4096 / 4), %cx
    rep stosl

    /* The setup header, as the loader filled it in (command line, initrd,
     * type_of_loader), goes into the zero page, as Linux's copy_boot_params. */
    movw $hdr, %si
    movw zero_page_offset, %di
    addw $hdr, %di
    movw $(hdr_end - hdr), %cx
    rep movsb

    /* A20 on through port 0x92 (the BIOS normally left it on already). */
    inb $0x92, %al
    orb $0x02, %al
    andb $0xFE, %al                     /* not bit 0: that resets the machine */
    outb %al, $0x92

    /* The memory map from the BIOS: INT 15h, AX=E820h, one entry a call. */
    movw zero_page_offset, %di
    addw $BP_E820_TABLE, %di
    xorl %ebx, %ebx                     /* continuation value: 0 for the first call */
e820_next:
    movl $0xE820, %eax
    movl $20, %ecx
    movl $SMAP, %edx
    pushw %di
    int $0x15
    popw %di
    jc e820_done                        /* carry: error, or past the last entry */
    cmpl $SMAP, %eax
    jne e820_done
    addw $20, %di
    incb e820_count
    cmpb $E820_MAX, e820_count
    jae e820_done
    testl %ebx, %ebx                    /* 0: that was the last entry */
    jnz e820_next
e820_done:
    movb e820_count, %al
    movw zero_page_offset, %di
    movb %al, BP_E820_ENTRIES(%di)

    /* Page tables: PML4[0] -> PDPT, PDPT[0..3] -> four page directories. */
    movl zero_page_linear, %eax
    addl $(0x2000 + 3), %eax            /* present, writable */
    movl %eax, 0x1000(%di)
    movw $4, %cx
    leaw 0x2000(%di), %si
1:  addl $0x1000, %eax
    movl %eax, (%si)
    addw $8, %si
    decw %cx
    jnz 1b
    leaw 0x3000(%di), %si
    movl $0x83, %eax                    /* present, writable, 2 MiB page */
    movw $2048, %cx
1:  movl %eax, (%si)                    /* the high half stays 0: all below 4 GiB */
    addl $0x200000, %eax
    addw $8, %si
    decw %cx
    jnz 1b

    /* Into 32-bit protected mode through our GDT, whose linear address (and
     * that of start32) depends on where the loader put us. */
    movw %ds, %ax
    movzwl %ax, %ebp
    shll $4, %ebp
    leal gdt(%ebp), %eax
    movl %eax, gdt_descriptor + 2
    leal start32(%ebp), %eax
    movl %eax, start32_pointer
    lgdtl gdt_descriptor
    movl zero_page_linear, %esi         /* RSI for the 64-bit entry */
    leal 0x1000(%esi), %edi             /* the PML4 */
    movl %cr0, %eax
    orl $1, %eax                        /* PE */
    movl %eax, %cr0
    ljmpl *start32_pointer

    .code32
start32:
    movl $0x18, %eax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %fs
    movw %ax, %gs
    movw %ax, %ss
    movl %cr4, %eax
    orl $(1 << 5), %eax                 /* PAE */
    movl %eax, %cr4
    movl %edi, %cr3
    movl $MSR_EFER, %ecx
    rdmsr
    orl $(1 << 8), %eax                 /* LME */
    wrmsr
    movl %cr0, %eax
    orl $(1 << 31), %eax                /* PG: long mode is now active */
    movl %eax, %cr0
    ljmpl $0x10, $KERNEL_64_ENTRY

    .balign 8
gdt:    /* the selectors Linux's boot protocol uses: __BOOT_CS 0x10, __BOOT_DS 0x18 */
    .quad 0
    .quad 0x00CF9B000000FFFF            /* 0x08: 32-bit code, for start32 */
    .quad 0x00AF9B000000FFFF            /* 0x10: 64-bit code */
    .quad 0x00CF93000000FFFF            /* 0x18: data */
gdt_end:
gdt_descriptor:
    .word gdt_end - gdt - 1
    .long 0                             /* linear base, set at run time */
start32_pointer:
    .long 0                             /* start32's linear address, set at run time */
    .word 0x08
zero_page_linear:
    .long 0
zero_page_offset:
    .word 0
e820_count:
    .byte 0
kernel_version_string:
    .asciz "pyhyve bzImage test kernel"

    .org (SETUP_SECTS + 1) * 512
    .section .note.GNU-stack, "", @progbits
