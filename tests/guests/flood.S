/* A guest that floods one device from its AP while its BSP does steady work,
 * for tests/test_resource_limits.py: neither pyhyve's memory nor the BSP's
 * progress may suffer from what one vCPU does to a device.
 *
 * The BSP (long mode, from longmode.inc: this host's instruction emulator
 * cannot run a 32-bit protected-mode iret) finds and sets up the target,
 * wakes the AP with INIT/SIPI (as smp.S does), waits until it checks in and
 * prints "flooding".  Then it counts down WORK_LOOPS and prints "tick N" on
 * the debug port, again and again until it has ticked TICKS times and the AP
 * has done FLOOD_TARGET iterations (blocks of BLOCK bytes for FLOOD_UART,
 * single accesses otherwise): a flooding vCPU that stalls stops the run too.
 * Last it prints "flood N" (the AP's iterations so far) and "irqs N"
 * (interrupts its IDT took), and powers off while the AP is still at it.
 * The AP stays in real mode and loops forever on port I/O, which reaches
 * every target:
 *   FLOOD_UART         rep outsb of BLOCK bytes to COM1's THR, never looking at
 *                      LSR (pyhyve's THR is always empty: waiting would only
 *                      double the exits per byte)
 *   FLOOD_NOTIFY       QUEUE_NOTIFY (legacy I/O BAR + 0x10) of the transitional
 *                      virtio-rnd; with DRIVER_OK set the driver first places
 *                      queue 0 (empty) and sets DRIVER_OK, else it only resets
 *                      the device and notifies a queue that is not there
 *   FLOOD_MSI          pci-testdev's "raise vector 0" register (I/O BAR 1 + 8)
 *                      with MSI enabled to vector IRQ_VECTOR on the BSP, which
 *                      takes them (IF=1) unless MASKED=1 leaves them pending
 * A setup step that fails prints why and powers off at once. */
#include "rom.inc"

#define FLOOD_UART         1
#define FLOOD_NOTIFY       2
#define FLOOD_MSI          3
#ifndef FLOOD
#error "build with -DFLOOD=1..3"
#endif
#ifndef DRIVER_OK
#define DRIVER_OK 1
#endif
#ifndef MASKED
#define MASKED 0
#endif
#ifndef TICKS
#define TICKS 10
#endif
#ifndef WORK_LOOPS
#define WORK_LOOPS 200000
#endif
#ifndef FLOOD_TARGET
#define FLOOD_TARGET 0
#endif

/* Low RAM, around longmode.inc's stack (below 0x9000) and page tables
 * (0x10000-0x13FFF); the AP's data stays below 64 KiB for real mode. */
#define AP_STARTED   0x5000
#define FLOOD_COUNT  0x5004
#define IRQ_COUNT    0x5008
#define FLOOD_PORT   0x500C          /* word: where the AP writes */
#define FLOOD_VALUE  0x5010          /* dword: what it writes there */
#define AP_STACK_TOP 0x5800
#define TRAMPOLINE   0x6000
#define SIPI_VECTOR  (TRAMPOLINE >> 12)
#define UART_BLOCK   0xA000          /* BLOCK bytes the AP sends over and over */
#define BLOCK        4096
#define IDT          0x14000         /* 256 16-byte gates */
#define RING         0x20000         /* virtqueue 0: 64 entries fit in two pages */

#define LAPIC        0xFEE00000
#define LAPIC_SVR    0xF0
#define LAPIC_EOI    0xB0
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define ICR_ALL_BUT_SELF (3 << 18)
#define ICR_INIT     0x4500
#define ICR_STARTUP  0x4600
#define IRQ_VECTOR   0x40

#define COM1         0x3F8

#define PCI_COMMAND  0x04
#define PCI_BAR0     0x10
#define PCI_BAR1     0x14
#define PCI_CAP_PTR  0x34
#define CMD_IO_MEM_MASTER 7
#define CAP_ID_MSI   0x05
#define MSI_ENABLE   (1 << 16)       /* message control bit 0, seen in the cap's dword */
#define VIRTIO_RNG_ID 0x10051AF4     /* device 0x1005 : vendor 0x1AF4, as config dword 0 */
#define TESTDEV_ID   0x00051B36
#define DEFAULT_IOBASE 0xC000        /* for an I/O BAR nobody placed */
#define VIRTIO_QUEUE_PFN    0x08
#define VIRTIO_QUEUE_SELECT 0x0E
#define VIRTIO_QUEUE_NOTIFY 0x10
#define VIRTIO_STATUS       0x12
#define S_ACK_DRIVER        3
#define S_DRIVER_OK         4
#define TESTDEV_RAISE       0x08

.macro PRINT32 label
    movl $\label, %esi
    movl $(\label\()_end - \label), %ecx
    movw $DEBUG_PORT, %dx
    rep outsb
.endm

.macro FAIL label
    movl $\label, %esi
    movl $(\label\()_end - \label), %ecx
    jmp fail
.endm

    ROM_START
#include "longmode.inc"

main64:
    cld
    movl $0, AP_STARTED
    movl $0, FLOOD_COUNT
    movl $0, IRQ_COUNT
    call setup_idt
    call setup_target
    movl $trampoline, %esi         /* the AP's code, below 1 MiB */
    movl $TRAMPOLINE, %edi
    movl $(trampoline_end - trampoline), %ecx
    rep movsb
    movl $LAPIC, %eax
    movl $0, LAPIC_ICR_HI(%rax)
    movl $(ICR_ALL_BUT_SELF | ICR_INIT), LAPIC_ICR_LO(%rax)
    movl $(ICR_ALL_BUT_SELF | ICR_STARTUP | SIPI_VECTOR), LAPIC_ICR_LO(%rax)
    movl $(ICR_ALL_BUT_SELF | ICR_STARTUP | SIPI_VECTOR), LAPIC_ICR_LO(%rax)
1:  pause
    cmpl $0, AP_STARTED
    je 1b
    PRINT32 s_flooding
#if FLOOD == FLOOD_MSI && !MASKED
    sti
#endif
    movl $1, %ebx                  /* the tick number */
2:  movl $WORK_LOOPS, %ecx
3:  decl %ecx
    jnz 3b
    PRINT32 s_tick
    movl %ebx, %eax
    call print_dec_nl
    incl %ebx
    cmpl $(TICKS + 1), %ebx
    jb 2b
    cmpl $FLOOD_TARGET, FLOOD_COUNT
    jb 2b
    cli
    PRINT32 s_flood
    movl FLOOD_COUNT, %eax
    call print_dec_nl
    PRINT32 s_irqs
    movl IRQ_COUNT, %eax
    call print_dec_nl
    POWEROFF

fail:                              /* %esi: the reason, %ecx: its length */
    movw $DEBUG_PORT, %dx
    rep outsb
    POWEROFF

/* --- the target --------------------------------------------------------------- */
setup_target:
#if FLOOD == FLOOD_UART
    movw $COM1, FLOOD_PORT
    movl $UART_BLOCK, %edi         /* lines of 63 printable bytes and a newline */
    xorl %ecx, %ecx
1:  movl %ecx, %eax
    andl $0x3F, %eax
    addl $0x30, %eax
    cmpl $0x6F, %eax
    jne 2f
    movl $'\n', %eax
2:  movb %al, (%edi,%ecx)
    incl %ecx
    cmpl $BLOCK, %ecx
    jne 1b
    ret
#elif FLOOD == FLOOD_NOTIFY
    movl $VIRTIO_RNG_ID, %eax
    call find_device
    call io_bar0
    movl %eax, %ebp
    leal VIRTIO_STATUS(%ebp), %edx
    xorl %eax, %eax
    outb %al, %dx                  /* reset */
#if DRIVER_OK
    movb $S_ACK_DRIVER, %al
    outb %al, %dx
    leal VIRTIO_QUEUE_SELECT(%ebp), %edx
    xorl %eax, %eax
    outw %ax, %dx
    movl $RING, %edi               /* an empty queue: zeroed rings */
    movl $(2 * 4096 / 4), %ecx
    rep stosl
    leal VIRTIO_QUEUE_PFN(%ebp), %edx
    movl $(RING >> 12), %eax
    outl %eax, %dx
    leal VIRTIO_STATUS(%ebp), %edx
    movb $(S_ACK_DRIVER | S_DRIVER_OK), %al
    outb %al, %dx
#endif
    leal VIRTIO_QUEUE_NOTIFY(%ebp), %eax
    movw %ax, FLOOD_PORT
    movl $0, FLOOD_VALUE           /* queue 0 */
    ret
#elif FLOOD == FLOOD_MSI
    movb $0xFF, %al                /* mask both 8259s: the local APIC delivers */
    outb %al, $0x21
    outb %al, $0xA1
    movl $LAPIC, %eax              /* software-enable the local APIC */
    movl $(0x100 | 0xFF), LAPIC_SVR(%rax)
    movl $TESTDEV_ID, %eax
    call find_device
    leal PCI_CAP_PTR(%ebx), %edi
    call cfg_read
    andl $0xFC, %eax
    movl $48, %ecx                 /* at most 48 capabilities fit: a loop is a bug */
1:  testl %eax, %eax
    jz 8f
    decl %ecx
    jz 8f
    movl %eax, %esi
    leal (%ebx,%esi), %edi
    call cfg_read
    cmpb $CAP_ID_MSI, %al
    je 2f
    shrl $8, %eax
    andl $0xFC, %eax
    jmp 1b
2:  leal 4(%ebx,%esi), %edi        /* address: the local APIC of APIC ID 0 */
    movl $0xFEE00000, %eax
    call cfg_write
    leal 8(%ebx,%esi), %edi        /* address, upper half */
    xorl %eax, %eax
    call cfg_write
    leal 12(%ebx,%esi), %edi       /* data: fixed, edge, the vector */
    movl $IRQ_VECTOR, %eax
    call cfg_write
    leal 16(%ebx,%esi), %edi       /* per-vector mask: none */
    xorl %eax, %eax
    call cfg_write
    leal (%ebx,%esi), %edi
    call cfg_read
    orl $MSI_ENABLE, %eax
    leal (%ebx,%esi), %edi
    call cfg_write
    leal PCI_BAR1(%ebx), %edi
    call cfg_read
    andl $0xFFFC, %eax
    jz 9f
    addl $TESTDEV_RAISE, %eax
    movw %ax, FLOOD_PORT
    movl $0, FLOOD_VALUE           /* vector 0 of the device's MSI */
    ret
8:  FAIL s_no_msi
9:  FAIL s_no_bar
#else
#error "unknown FLOOD"
#endif

#if FLOOD == FLOOD_NOTIFY || FLOOD == FLOOD_MSI
/* %eax: vendor and device ID as config dword 0.  Returns the first function 0
 * on bus 0 that has them in %ebx (config-address form), with I/O, memory and
 * bus mastering on. */
find_device:
    movl %eax, %esi
    xorl %ebx, %ebx
1:  movl %ebx, %edi
    call cfg_read
    cmpl %esi, %eax
    je 2f
    addl $0x800, %ebx
    cmpl $(32 << 11), %ebx
    jne 1b
    FAIL s_no_device
2:  leal PCI_COMMAND(%ebx), %edi
    call cfg_read
    orl $CMD_IO_MEM_MASTER, %eax
    andl $0xFFFF, %eax
    leal PCI_COMMAND(%ebx), %edi
    call cfg_write
    ret

/* %ebx: function.  Its I/O BAR 0's base in %eax, placed if nobody did. */
io_bar0:
    leal PCI_BAR0(%ebx), %edi
    call cfg_read
    testl $1, %eax
    jz 8f
    andl $0xFFFC, %eax
    jnz 1f
    leal PCI_BAR0(%ebx), %edi
    movl $DEFAULT_IOBASE, %eax
    call cfg_write
    movl $DEFAULT_IOBASE, %eax
1:  ret
8:  FAIL s_no_bar

cfg_read:                          /* %edi: config address -> %eax */
    movl %edi, %eax
    orl $0x80000000, %eax
    movw $0xCF8, %dx
    outl %eax, %dx
    movw $0xCFC, %dx
    inl %dx, %eax
    ret

cfg_write:                         /* %edi: config address, %eax: value */
    pushq %rax
    movl %edi, %eax
    orl $0x80000000, %eax
    movw $0xCF8, %dx
    outl %eax, %dx
    popq %rax
    movw $0xCFC, %dx
    outl %eax, %dx
    ret
#endif

/* --- interrupts: exceptions end the run, any other vector is counted --------- */
setup_idt:
    xorl %ecx, %ecx
1:  movl $irq_handler, %eax
    cmpl $32, %ecx
    jae 2f
    movl $exception_handler, %eax
2:  movl %ecx, %edi
    shll $4, %edi
    addl $IDT, %edi
    movw %ax, (%rdi)               /* offset 15:0 */
    movw $0x18, 2(%rdi)            /* the 64-bit code segment */
    movw $0x8E00, 4(%rdi)          /* present, DPL 0, 64-bit interrupt gate */
    shrl $16, %eax
    movw %ax, 6(%rdi)              /* offset 31:16 (the ROM is below 4 GiB) */
    movq $0, 8(%rdi)
    incl %ecx
    cmpl $256, %ecx
    jne 1b
    lidt idt_descriptor(%rip)
    ret

irq_handler:
    pushq %rax
    incl IRQ_COUNT
    movl $LAPIC, %eax
    movl $0, LAPIC_EOI(%rax)
    popq %rax
    iretq

exception_handler:
    FAIL s_exception

/* --- output --------------------------------------------------------------------- */
print_dec_nl:                      /* %eax in decimal and a newline (clobbers ecx, edx, edi) */
    movl $10, %ecx
    xorl %edi, %edi
1:  xorl %edx, %edx
    divl %ecx
    pushq %rdx                     /* digits come out lowest first */
    incl %edi
    testl %eax, %eax
    jnz 1b
    movw $DEBUG_PORT, %dx
2:  popq %rax
    addb $'0', %al
    outb %al, %dx
    decl %edi
    jnz 2b
    movb $'\n', %al
    outb %al, %dx
    ret

    .balign 8
idt_descriptor:
    .word 256 * 16 - 1
    .quad IDT

s_flooding:    .ascii "flooding\n"
s_flooding_end:
s_tick:        .ascii "tick "
s_tick_end:
s_flood:       .ascii "flood "
s_flood_end:
s_irqs:        .ascii "irqs "
s_irqs_end:
s_no_device:   .ascii "no target device on bus 0\n"
s_no_device_end:
s_no_bar:      .ascii "target I/O BAR missing\n"
s_no_bar_end:
s_no_msi:      .ascii "MSI capability missing\n"
s_no_msi_end:
s_exception:   .ascii "exception\n"
s_exception_end:

/* The AP, in real mode at TRAMPOLINE (CS = TRAMPOLINE >> 4, IP = 0): check in,
 * then write FLOOD_VALUE to FLOOD_PORT forever, counting in FLOOD_COUNT. */
    .code16
trampoline:
    cli
    xorw %ax, %ax
    movw %ax, %ds
    movw %ax, %ss
    movw $AP_STACK_TOP, %sp
    lock incl AP_STARTED
    movw FLOOD_PORT, %dx
#if FLOOD == FLOOD_UART
1:  movw $UART_BLOCK, %si
    movw $BLOCK, %cx
    rep outsb
    incl FLOOD_COUNT
    jmp 1b
#elif FLOOD == FLOOD_NOTIFY
    movw FLOOD_VALUE, %ax
1:  outw %ax, %dx
    incl FLOOD_COUNT
    jmp 1b
#else
    movl FLOOD_VALUE, %eax
1:  outl %eax, %dx
    incl FLOOD_COUNT
    jmp 1b
#endif
trampoline_end:

    RESET_VECTOR start16
