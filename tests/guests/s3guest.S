/* ACPI S3 (suspend to RAM) from a guest's side.  One image boots two ways:
 * as a disk's first sectors under SeaBIOS (the boot sector loads the rest,
 * SECTORS in all, to 0x7E00 with int 13h), and as a bzImage whose 16-bit
 * setup code is the program (protocol 2.01, so that pyhyve's -f kexec and
 * QEMU's -kernel both put it at 0x90000 and enter it at 0x9020:0).  The code
 * is linked at 0 and runs in whatever segment it was loaded at (CS = DS = SS).
 *
 * The program walks the ACPI tables (RSDP in the BIOS area, RSDT, FADT:
 * FACS, DSDT, PM1a_EVT, PM1a_CNT; the DSDT's _S3 and _S5 packages for their
 * SLP_TYP values) in unreal mode (FS reaches all 4 GiB), and fills 64 KiB at
 * 0x20000 with a pattern.  Each of CYCLES rounds: print three counts, write
 * the FACS firmware waking vector, clear the PM1 wake status bits, and (with
 * WAKE_RTC) arm the RTC alarm a few seconds ahead with AIE and RTC_EN; print
 * "sleeping" and write SLP_TYP(_S3) | SLP_EN to PM1a_CNT.  Woken, the
 * firmware (or pyhyve, for a kernel booted without one) enters `wake_entry`
 * in real mode; the program prints "resumed", PM1_STS's WAK_STS, RTC_STS and
 * PWRBTN_STS bits, whether the pattern is intact, and counts on from where it
 * was.  After the last round: three more counts, "done", and S5 through _S5.
 * Everything goes to the debug port 0x402 (SeaBIOS's log shares it: the
 * program's lines start with "s3: "). */
#include "rom.inc"                  /* DEBUG_PORT */
#define SECTORS      4
#define PATTERN_SEG  0x2000
#define STACK_TOP    0x9000         /* in the program's segment */
#define MBR_SEG      0x07C0         /* where the BIOS loads a boot sector */
#define SLP_EN       (1 << 13)
#define SLP_TYP_MASK (7 << 10)
#define WAKE_BITS    0x8500         /* WAK_STS, RTC_STS, PWRBTN_STS */
#define RTC_EN       (1 << 10)
#define RTC_AIE      0x20
#define ALARM_AFTER  3              /* seconds */
#define FACS_WAKING_VECTOR 12
#ifndef CYCLES
#define CYCLES 1
#endif
#ifndef WAKE_RTC
#define WAKE_RTC 0
#endif

/* From ENTRY, entered with IP 0 wherever the program was loaded: into the
 * program's own segment (CS - ENTRY / 16), as DS, ES and SS too, the stack at
 * STACK_TOP, interrupts off. */
.macro OWN_SEGMENT entry
    cli
    cld
    movw %cs, %ax
    subw $((\entry - _start) >> 4), %ax
    pushw %ax
    pushw $own_segment_\@
    lret
own_segment_\@:
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw $STACK_TOP, %sp
.endm

    .code16
    .text
    .globl _start
_start:                             /* as a boot sector: CS:IP = 0:0x7C00 */
    ljmp $MBR_SEG, $1f
1:  cli
    xorw %ax, %ax                   /* below us: SeaBIOS's disk code wants this stack */
    movw %ax, %ss
    movw $0x7C00, %sp
    movw %cs, %ax
    movw %ax, %ds
    movw %ax, %es
    cld
    movw $dap, %si                  /* %dl: the boot drive, as the BIOS left it */
    movb $0x42, %ah
    int $0x13
    jc 1f
    ljmp $(MBR_SEG + 0x20), $0      /* the setup code's entry, as a kernel loader jumps */
1:  movw $msg_load_failed, %si
fail:
    call puts16
halt:
    cli
    hlt
    jmp halt

dap:                                /* int 13h extended read: the rest, after us */
    .byte 16, 0
    .word SECTORS - 1
    .word 0x200, MBR_SEG
    .quad 1

#include "lib16.inc"

msg_load_failed:
    .asciz "s3: cannot load the program\n"

    /* the bzImage header (Documentation/x86/boot.rst), protocol 2.01 */
    .org 0x1F1
    .byte SECTORS - 1               /* setup_sects */
    .word 0                         /* root_flags */
    .long 32                        /* syssize: one 512-byte sector, 16-byte units */
    .word 0, 0xFFFF, 0              /* ram_size, vid_mode, root_dev */
    .word 0xAA55                    /* boot_flag, the boot sector's signature too */
setup_entry:                        /* 0x200: the setup code's entry, a jump over the header */
    .byte 0xEB, main - 1f
1:  .ascii "HdrS"
    .word 0x0201                    /* version */
    .long 0                         /* realmode_swtch */
    .word 0x1000, 0                 /* start_sys_seg, kernel_version */
    .byte 0, 0x01                   /* type_of_loader, loadflags: LOADED_HIGH */
    .word 0x8000                    /* setup_move_size */
    .long 0x100000, 0, 0, 0         /* code32_start, ramdisk_image, _size, bootsect_kludge */
    .word 0                         /* heap_end_ptr */
    .org 0x240                      /* later protocols' fields: QEMU writes 0x22C whatever
                                       the version */

main:                               /* as a kernel: CS = 0x9020, DS = SS = 0x9000 */
    OWN_SEGMENT setup_entry
    movw $msg_start, %si
    call puts16
    call unreal
    call find_fadt
    movw $msg_no_fadt, %si
    jc fail
    movb $'3', %bl
    call find_sleep_type
    movw $msg_no_s3, %si
    jc fail
    movw %ax, slp_typ_s3
    movb $'5', %bl
    call find_sleep_type
    movw $msg_no_s5, %si
    jc fail
    movw %ax, slp_typ_s5
    xorb %bl, %bl
    call pattern
    movb $CYCLES, cycles_left

cycle:
    call count3
    call linear_base                /* the waking vector: wake_entry's linear address */
    addl $wake_entry, %eax
    movl facs, %ebx                 /* unreal mode: the FACS may be above 1 MiB */
    movl %eax, %fs:FACS_WAKING_VECTOR(%ebx)
    movw pm1_evt, %dx
    movw $WAKE_BITS, %ax            /* write 1 to clear */
    outw %ax, %dx
#if WAKE_RTC
    call arm_rtc_alarm
#endif
    movw $msg_sleeping, %si
    call puts16
    movw slp_typ_s3, %ax
    call sleep
1:  pause                           /* QEMU may run a little before it stops the vCPU */
    jmp 1b

    .balign 16
wake_entry:             /* entered in real mode, CS:IP = linear address / 16 : 0 */
    OWN_SEGMENT wake_entry
    movw $msg_resumed, %si
    call puts16
    call unreal                     /* the wake reset left FS a 64 KiB segment */
    movw pm1_evt, %dx
    inw %dx, %ax
    andw $WAKE_BITS, %ax
    call puthex16
    call newline
    movb $1, %bl
    call pattern
    movw $msg_intact, %si
    jnc 1f
    movw $msg_changed, %si
1:  call puts16
    decb cycles_left
    jnz cycle
    call count3
    movw $msg_done, %si
    call puts16
    movw slp_typ_s5, %ax
    call sleep
    jmp halt

/* PM1a_CNT = SLP_TYP %ax | SLP_EN, keeping the other bits (SCI_EN) */
sleep:
    shlw $10, %ax
    orw $SLP_EN, %ax
    movw %ax, %bx
    movw pm1_cnt, %dx
    inw %dx, %ax
    andw $~(SLP_TYP_MASK | SLP_EN), %ax
    orw %bx, %ax
    outw %ax, %dx
    ret

count3:
    movw $3, %cx
1:  incw counter
    movw $msg_count, %si
    call puts16
    movw counter, %ax
    call puthex16
    call newline
    loop 1b
    ret

linear_base:                        /* %eax: the program's segment base */
    movw %cs, %ax
    movzwl %ax, %eax
    shll $4, %eax
    ret

/* Unreal mode: FS with base 0 and a 4 GiB limit, so that %fs:(32-bit address)
 * reaches the ACPI tables wherever the firmware put them. */
unreal:
    call linear_base
    addl $gdt, %eax
    movl %eax, gdt_descriptor + 2
    lgdtl gdt_descriptor
    movl %cr0, %eax
    orb $1, %al
    movl %eax, %cr0
    movw $8, %bx
    movw %bx, %fs
    andb $0xFE, %al
    movl %eax, %cr0
    ret

/* RSDP -> RSDT -> FADT: facs, dsdt, pm1_evt, pm1_cnt; CF when not found */
find_fadt:
    movl $0xE0000, %esi
1:  cmpl $0x20445352, %fs:(%esi)/* "RSD " */
    jne 2f
    cmpl $0x20525450, %fs:4(%esi)       /* "PTR " */
    je 3f
2:  addl $16, %esi
    cmpl $0x100000, %esi
    jb 1b
    stc
    ret
3:  movl %fs:16(%esi), %esi             /* the RSDT */
    movl %fs:4(%esi), %ecx
    addl %esi, %ecx
    leal 36(%esi), %edi
4:  cmpl %ecx, %edi
    jae 5f
    movl %fs:(%edi), %ebx
    cmpl $0x50434146, %fs:(%ebx)        /* "FACP" */
    je 6f
    addl $4, %edi
    jmp 4b
5:  stc
    ret
6:  movl %fs:36(%ebx), %eax
    movl %eax, facs
    movl %fs:40(%ebx), %eax
    movl %eax, dsdt
    movl %fs:56(%ebx), %eax
    movw %ax, pm1_evt
    movl %fs:64(%ebx), %eax
    movw %ax, pm1_cnt
    clc
    ret

/* The first element of the DSDT's Name(_Sn_, Package(...)), n in %bl: the
 * PM1a SLP_TYP value, in %ax; CF when there is none. */
find_sleep_type:
    movl dsdt, %esi
    movl %fs:4(%esi), %ecx
    addl %esi, %ecx
    subl $8, %ecx
    addl $36, %esi
1:  cmpl %ecx, %esi
    jae 9f
    cmpw $0x535F, %fs:(%esi)            /* "_S" */
    jne 2f
    cmpb %bl, %fs:2(%esi)
    jne 2f
    cmpw $0x125F, %fs:3(%esi)           /* "_", then PackageOp */
    je 3f
2:  incl %esi
    jmp 1b
3:  movzbl %fs:5(%esi), %eax            /* PkgLength: bits 7-6 count its extra bytes */
    shrb $6, %al
    leal 7(%esi,%eax), %esi         /* past NumElements: the first element */
    movb %fs:(%esi), %al
    cmpb $0x0A, %al                 /* BytePrefix */
    jne 4f
    movb %fs:1(%esi), %al
    jmp 5f
4:  cmpb $0x01, %al                 /* ZeroOp, OneOp */
    ja 9f
5:  movzbw %al, %ax
    clc
    ret
9:  stc
    ret

/* The pattern at PATTERN_SEG:0-0xFFFF, each word its offset XOR 0x5A5A:
 * written when %bl is 0, else checked (CF when a word differs). */
pattern:
    pushw %es
    movw $PATTERN_SEG, %ax
    movw %ax, %es
    xorw %di, %di
1:  movw %di, %ax
    xorw $0x5A5A, %ax
    testb %bl, %bl
    jnz 2f
    movw %ax, %es:(%di)
2:  cmpw %ax, %es:(%di)
    jne 3f
    addw $2, %di
    jnz 1b
    popw %es
    clc
    ret
3:  popw %es
    stc
    ret

#if WAKE_RTC
/* The RTC alarm ALARM_AFTER seconds ahead (minutes and hours "don't care"),
 * AIE on, and RTC_EN in PM1_EN: the alarm wakes the machine. */
arm_rtc_alarm:
1:  movb $0x0A, %al                 /* wait for no update in progress */
    outb %al, $0x70
    inb $0x71, %al
    testb $0x80, %al
    jnz 1b
    movb $0x00, %al                 /* seconds, BCD (SeaBIOS sets register B so) */
    outb %al, $0x70
    inb $0x71, %al
    movb %al, %ah                   /* BCD: %ah tens, %al units; add, mod 60 */
    shrb $4, %ah
    andb $0x0F, %al
    addb $ALARM_AFTER, %al
    cmpb $10, %al
    jb 2f
    subb $10, %al
    incb %ah
2:  cmpb $6, %ah
    jb 3f
    subb $6, %ah
3:  shlb $4, %ah
    orb %ah, %al
    movb %al, %ah
    movb $0x01, %al                 /* seconds alarm */
    outb %al, $0x70
    movb %ah, %al
    outb %al, $0x71
    movb $0x03, %al                 /* minutes alarm: any */
    outb %al, $0x70
    movb $0xFF, %al
    outb %al, $0x71
    movb $0x05, %al                 /* hours alarm: any */
    outb %al, $0x70
    movb $0xFF, %al
    outb %al, $0x71
    movb $0x0C, %al                 /* register C: clear pending flags */
    outb %al, $0x70
    inb $0x71, %al
    movb $0x0B, %al                 /* register B: AIE */
    outb %al, $0x70
    inb $0x71, %al
    orb $RTC_AIE, %al
    movb %al, %ah
    movb $0x0B, %al
    outb %al, $0x70
    movb %ah, %al
    outb %al, $0x71
    movw pm1_evt, %dx               /* PM1_EN: RTC_EN */
    addw $2, %dx
    inw %dx, %ax
    orw $RTC_EN, %ax
    outw %ax, %dx
    ret
#endif

puthex16:                           /* %ax, four hex digits */
    pushw %bx
    pushw %cx
    pushw %dx
    movw %ax, %bx
    movw $4, %cx
    movw $DEBUG_PORT, %dx
1:  rolw $4, %bx
    movb %bl, %al
    andb $0x0F, %al
    addb $'0', %al
    cmpb $'9', %al
    jbe 2f
    addb $('a' - '9' - 1), %al
2:  outb %al, %dx
    loop 1b
    popw %dx
    popw %cx
    popw %bx
    ret

newline:
    pushw %si
    movw $msg_newline, %si
    call puts16
    popw %si
    ret

    .balign 8
gdt:
    .quad 0
    .quad 0x00CF92000000FFFF        /* 0x08: data, base 0, 4 GiB */
gdt_descriptor:
    .word gdt_descriptor - gdt - 1
    .long 0                         /* gdt's linear address (unreal) */

facs:        .long 0
dsdt:        .long 0
pm1_evt:     .word 0
pm1_cnt:     .word 0
slp_typ_s3:  .word 0
slp_typ_s5:  .word 0
counter:     .word 0
cycles_left: .byte 0

msg_start:    .asciz "s3: started\n"
msg_no_fadt:  .asciz "s3: no FADT\n"
msg_no_s3:    .asciz "s3: no _S3 in the DSDT\n"
msg_no_s5:    .asciz "s3: no _S5 in the DSDT\n"
msg_count:    .asciz "s3: count "
msg_sleeping: .asciz "s3: sleeping\n"
msg_resumed:  .asciz "s3: resumed, PM1_STS wake bits "
msg_intact:   .asciz "s3: memory intact\n"
msg_changed:  .asciz "s3: memory changed\n"
msg_done:     .asciz "s3: done\n"
msg_newline:  .asciz "\n"

    .org SECTORS * 512              /* then the "protected-mode kernel": one sector */
    .fill 512, 1, 0
