/* PCI as an OS's bus driver sees it, on pyhyve's pci-testdev (-s 3,pci-testdev):
 *  1. enumerate bus 0 through config mechanism #1 (0xCF8/0xCFC): function 0
 *     of every slot, functions 1-7 where the header type says multifunction;
 *     print "pci 00:SS.F VVVV:DDDD" for each function found;
 *  2. size every BAR (save, write all ones, read back, restore; a 64-bit BAR
 *     is a pair): "bar 00:SS.F N io|mem32|mem64 size=0xHEX";
 *  3. move the test device's BAR0 (memory) and BAR1 (I/O) while decoded and
 *     check its registers answer at the new places and not the old ones;
 *  4. take an MSI-X interrupt, then an INTx one through the I/O APIC.
 * Every wait is bounded; a check that fails prints why instead of "ok". */
#include "rom.inc"

#define IDT            0x20000         /* 256 16-byte gates, in RAM */
#define MSIX_COUNT     0x21000         /* interrupts counted by the handlers */
#define INTX_COUNT     0x21004
#define INTX_UNCLAIMED 0x21008
#define LAPIC          0xFEE00000
#define LAPIC_TPR      0x80
#define LAPIC_EOI      0xB0
#define LAPIC_SVR      0xF0
#define IOAPIC         0xFEC00000      /* IOREGSEL at +0, IOWIN at +0x10 */
#define TESTDEV        (3 << 11)       /* 00:03.0 in config-address form */
#define COMMAND        0x04
#define BAR0           0x10
#define CAP_POINTER    0x34
#define CAP_ID_MSIX    0x11
#define MSIX_ENABLE    (1 << 31)       /* message control bit 15, seen in the cap's dword */
#define MSIX_FN_MASK   (1 << 30)
#define MAGIC          0x54535450      /* pci-testdev register 0x00 */
#define REG_SCRATCH    0x04
#define REG_RAISE      0x08
#define REG_INTX       0x0C
#define NEW_BAR0       0xC0800000      /* in the PCI hole, clear of the allocator's BARs */
#define NEW_BAR1       0xD000
#define MSIX_VECTOR    0x40
#define INTX_VECTOR    0x41
#define SPURIOUS       0xFF
#define INTX_PIN       19              /* slot 3 INTA: link (3 + 1 - 1) % 4 = 3, pin 16 + 3 */
#define WAIT_LOOPS     1000000

    ROM_START
#include "longmode.inc"

main64:
    cld
    call setup_idt
    call enumerate
    call move_bars
    call setup_apics
    call test_msix
    call test_intx
    POWEROFF

/* --- 1 and 2: enumeration and BAR sizing ------------------------------------ */
enumerate:
    pushq %rbx
    pushq %r12
    xorl %r12d, %r12d              /* slot << 11 */
1:  movl %r12d, %ebx
    call probe_function
    testl %eax, %eax
    jz 3f                          /* no function 0: the slot is empty */
    leal 0x0C(%r12), %edi
    call cfg_read
    testl $(0x80 << 16), %eax      /* header type bit 7: multifunction */
    jz 3f
    movl %r12d, %ebx
2:  addl $0x100, %ebx              /* functions 1-7 */
    call probe_function
    movl %ebx, %eax
    andl $0x700, %eax
    cmpl $0x700, %eax
    jne 2b
3:  addl $0x800, %r12d
    cmpl $(32 << 11), %r12d
    jne 1b
    popq %r12
    popq %rbx
    ret

/* %ebx: function (config-address form).  Prints it and its BARs if present;
 * returns %eax = 0 if absent. */
probe_function:
    movl %ebx, %edi
    call cfg_read
    cmpw $0xFFFF, %ax              /* no device answers: reads all ones */
    jne 1f
    xorl %eax, %eax
    ret
1:  pushq %r12
    movl %eax, %r12d
    PRINT_STR "pci "
    call print_bdf
    PRINT_STR " "
    movzwl %r12w, %eax
    movl $4, %ecx
    call puthex
    PRINT_STR ":"
    movl %r12d, %eax
    shrl $16, %eax
    movl $4, %ecx
    call puthex
    PRINT_STR "\n"
    call size_bars
    popq %r12
    movl $1, %eax
    ret

/* %ebx: function.  Size its BARs with memory and I/O decode off, so that a
 * BAR holding all ones claims nothing meanwhile. */
size_bars:
    pushq %rbp
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    leal 0x0C(%rbx), %edi
    call cfg_read
    movl $6, %r15d                 /* a header type 0 function has six BARs */
    testl $(0x7F << 16), %eax
    jz 1f
    movl $2, %r15d                 /* a bridge (type 1) two */
1:  leal COMMAND(%rbx), %edi
    call cfg_read
    movzwl %ax, %ebp               /* the command register, to restore */
    movl %ebp, %esi
    andl $~3, %esi
    leal COMMAND(%rbx), %edi
    call cfg_write
    xorl %r13d, %r13d              /* BAR index */
2:  leal BAR0(%rbx,%r13,4), %r12d  /* this BAR's config address */
    movl %r12d, %edi
    call cfg_read
    movl %eax, %r14d               /* its original value */
    movl %r12d, %edi
    movl $0xFFFFFFFF, %esi
    call cfg_write
    movl %r12d, %edi
    call cfg_read
    pushq %rax
    movl %r12d, %edi
    movl %r14d, %esi
    call cfg_write
    popq %rax
    testl %eax, %eax
    jz 6f                          /* unimplemented: all bits read-only zero */
    testl $1, %r14d
    jnz 3f
    movl %r14d, %ecx
    andl $6, %ecx
    cmpl $4, %ecx                  /* memory type 2: 64-bit, the next BAR is its top */
    je 4f
    andl $0xFFFFFFF0, %eax
    negl %eax                      /* the size is the two's complement of the mask */
    leaq str_mem32(%rip), %rsi
    jmp 5f
3:  andl $0xFFFFFFFC, %eax
    testl $0xFFFF0000, %eax        /* an I/O BAR may implement only 16 bits */
    jnz 31f
    orl $0xFFFF0000, %eax
31: negl %eax
    leaq str_io(%rip), %rsi
    jmp 5f
4:  andl $0xFFFFFFF0, %eax
    pushq %rax                     /* the low half of the mask */
    leal 4(%r12), %edi
    call cfg_read
    pushq %rax                     /* the top register's original value */
    leal 4(%r12), %edi
    movl $0xFFFFFFFF, %esi
    call cfg_write
    leal 4(%r12), %edi
    call cfg_read
    popq %rsi
    pushq %rax
    leal 4(%r12), %edi
    call cfg_write                 /* restore the top */
    popq %rax
    shlq $32, %rax
    popq %rcx
    orq %rcx, %rax
    negq %rax
    leaq str_mem64(%rip), %rsi
5:  pushq %rax                     /* print "bar 00:SS.F N kind size=0xHEX" */
    pushq %rsi
    PRINT_STR "bar "
    call print_bdf
    PRINT_STR " "
    movl %r13d, %eax
    movl $1, %ecx
    call puthex
    PRINT_STR " "
    popq %rsi
    call puts
    PRINT_STR " size=0x"
    popq %rax
    xorl %ecx, %ecx
    call puthex
    PRINT_STR "\n"
    movl %r14d, %eax               /* a 64-bit BAR used two registers */
    testl $1, %eax
    jnz 6f
    andl $6, %eax
    cmpl $4, %eax
    jne 6f
    incl %r13d
6:  incl %r13d
    cmpl %r15d, %r13d
    jb 2b
    leal COMMAND(%rbx), %edi
    movl %ebp, %esi
    call cfg_write
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbp
    ret

/* --- 3: moving BARs ------------------------------------------------------------ */
move_bars:
    pushq %rbx
    pushq %r12
    movl $(TESTDEV | COMMAND), %edi
    movl $7, %esi                  /* I/O and memory decode, bus master (for MSI-X) */
    call cfg_write
    movl $(TESTDEV | BAR0), %edi
    call cfg_read
    andl $0xFFFFFFF0, %eax
    movl %eax, %r12d               /* where the allocator put BAR0 */
    movl (%r12), %eax
    cmpl $MAGIC, %eax
    jne 8f
    movl $(TESTDEV | BAR0), %edi   /* move it while decoded, as a hot-plug OS may */
    movl $NEW_BAR0, %esi
    call cfg_write
    movl $NEW_BAR0, %ebx
    movl (%rbx), %eax
    cmpl $MAGIC, %eax
    jne 8f
    movl $0x5A5AA5A5, REG_SCRATCH(%rbx)
    movl REG_SCRATCH(%rbx), %eax
    cmpl $0x5A5AA5A5, %eax
    jne 8f
    movl (%r12), %eax              /* nothing decodes the old place: all ones */
    cmpl $0xFFFFFFFF, %eax
    jne 8f
    PRINT_STR "moved ok\n"
    jmp 1f
8:  pushq %rax                     /* the value that was wrong */
    PRINT_STR "moved bad "
    popq %rax
    call print_hex8_nl
1:  movl $(TESTDEV | BAR0 + 4), %edi
    call cfg_read
    andl $0xFFFC, %eax
    movl %eax, %r12d               /* where the allocator put BAR1 */
    movl $(TESTDEV | BAR0 + 4), %edi
    movl $NEW_BAR1, %esi
    call cfg_write
    movw $NEW_BAR1, %dx
    inl %dx, %eax
    cmpl $MAGIC, %eax
    jne 8f
    movl %r12d, %edx
    inl %dx, %eax                  /* the old ports are unclaimed: all ones */
    cmpl $0xFFFFFFFF, %eax
    jne 8f
    PRINT_STR "io moved ok\n"
    jmp 9f
8:  pushq %rax                     /* the value that was wrong */
    PRINT_STR "io moved bad "
    popq %rax
    call print_hex8_nl
9:  popq %r12
    popq %rbx
    ret

/* --- 4: interrupts --------------------------------------------------------------- */
setup_idt:
    xorl %ecx, %ecx                /* every vector: a stub that reports it */
1:  movl %ecx, %eax
    shll $4, %eax
    leaq unexpected_stubs(%rip), %rdx
    addq %rdx, %rax
    call set_gate
    incl %ecx
    cmpl $256, %ecx
    jne 1b
    movl $MSIX_VECTOR, %ecx
    leaq msix_handler(%rip), %rax
    call set_gate
    movl $INTX_VECTOR, %ecx
    leaq intx_handler(%rip), %rax
    call set_gate
    movl $SPURIOUS, %ecx
    leaq spurious_handler(%rip), %rax
    call set_gate
    lidt idt_descriptor(%rip)
    movl $0, MSIX_COUNT
    movl $0, INTX_COUNT
    movl $0, INTX_UNCLAIMED
    ret

set_gate:                          /* vector %ecx -> handler %rax (clobbers rax, rdi) */
    movl %ecx, %edi
    shll $4, %edi
    addl $IDT, %edi
    movw %ax, (%rdi)               /* offset 15:0 */
    movw $0x18, 2(%rdi)            /* the 64-bit code segment */
    movw $0x8E00, 4(%rdi)          /* present, DPL 0, 64-bit interrupt gate */
    shrq $16, %rax
    movw %ax, 6(%rdi)              /* offset 31:16 */
    shrq $16, %rax
    movl %eax, 8(%rdi)             /* offset 63:32 */
    movl $0, 12(%rdi)
    ret

setup_apics:
    movb $0xFF, %al                /* mask both 8259s: the APICs deliver from here on */
    outb %al, $0x21
    outb %al, $0xA1
    movl $LAPIC, %eax
    movl $0, LAPIC_TPR(%rax)
    movl $(0x100 | SPURIOUS), LAPIC_SVR(%rax)  /* software-enable the local APIC */
    ret

test_msix:
    pushq %rbx
    pushq %r12
    movl $(TESTDEV | CAP_POINTER), %edi
    call cfg_read
    andl $0xFC, %eax
    movl $48, %r12d                /* at most 48 capabilities fit: a loop is a bug */
1:  testl %eax, %eax               /* walk the capability list to MSI-X */
    jz 7f
    decl %r12d
    jz 7f
    movl %eax, %ebx
    leal TESTDEV(%rbx), %edi
    call cfg_read
    cmpb $CAP_ID_MSIX, %al
    je 2f
    shrl $8, %eax
    andl $0xFC, %eax
    jmp 1b
2:  leal TESTDEV + 4(%rbx), %edi   /* table offset | BIR */
    call cfg_read
    movl %eax, %ecx
    andl $7, %ecx
    andl $~7, %eax
    pushq %rax
    leal TESTDEV + BAR0(,%rcx,4), %edi
    call cfg_read
    andl $0xFFFFFFF0, %eax
    popq %rcx
    addl %ecx, %eax                /* entry 0 of the table */
    movl $LAPIC, (%rax)            /* message address: APIC ID 0 */
    movl $0, 4(%rax)
    movl $MSIX_VECTOR, 8(%rax)     /* message data: fixed, edge, the vector */
    movl $0, 12(%rax)              /* vector control: unmasked */
    leal TESTDEV(%rbx), %edi
    call cfg_read
    orl $MSIX_ENABLE, %eax
    andl $~MSIX_FN_MASK, %eax
    movl %eax, %esi
    leal TESTDEV(%rbx), %edi
    call cfg_write
    sti
    movl $NEW_BAR0, %eax
    movl $0, REG_RAISE(%rax)       /* raise MSI-X vector 0 */
    movl $WAIT_LOOPS, %ecx
3:  cmpl $0, MSIX_COUNT
    jne 4f
    decl %ecx
    jnz 3b
    cli
    PRINT_STR "msix timeout\n"
    jmp 5f
4:  cli
    cmpl $0, INTX_COUNT
    jne 6f
    PRINT_STR "msix ok\n"
5:  leal TESTDEV(%rbx), %edi       /* MSI-X off: raises fall back to INTx */
    call cfg_read
    andl $~MSIX_ENABLE, %eax
    movl %eax, %esi
    leal TESTDEV(%rbx), %edi
    call cfg_write
    popq %r12
    popq %rbx
    ret
6:  PRINT_STR "msix also raised intx\n"
    jmp 5b
7:  PRINT_STR "msix capability missing\n"
    popq %r12
    popq %rbx
    ret

test_intx:
    movl $IOAPIC, %eax
    movl $(0x10 + 2 * INTX_PIN + 1), (%rax)
    movl $0, 0x10(%rax)            /* destination: APIC ID 0 */
    movl $(0x10 + 2 * INTX_PIN), (%rax)
    /* fixed, physical, active high (KVM ignores polarity), level-triggered,
     * unmasked: the device holds the line until the handler acks it */
    movl $((1 << 15) | INTX_VECTOR), 0x10(%rax)
    sti
    movl $NEW_BAR0, %eax
    movl $0, REG_RAISE(%rax)       /* with MSI and MSI-X off: assert INTA */
    movl $WAIT_LOOPS, %ecx
1:  cmpl $1, INTX_COUNT
    jae 2f
    decl %ecx
    jnz 1b
    cli
    PRINT_STR "intx timeout\n"
    ret
2:  movl $WAIT_LOOPS / 10, %ecx    /* time for a second, wrong delivery */
3:  decl %ecx
    jnz 3b
    cli
    movl INTX_COUNT, %eax
    cmpl $1, %eax                  /* the ack lowered the line: one interrupt claimed */
    jne 8f
    movl $NEW_BAR0, %eax
    movl REG_INTX(%rax), %eax      /* the device says INTx is deasserted */
    testl %eax, %eax
    jnz 8f
    movl $IOAPIC, %edx
    movl $(0x10 + 2 * INTX_PIN), (%rdx)
    movl 0x10(%rdx), %eax
    testl $(1 << 14), %eax         /* remote IRR: the EOI reached the I/O APIC */
    jnz 8f
    orl $(1 << 16), %eax           /* mask the pin again */
    movl %eax, 0x10(%rdx)
    PRINT_STR "intx ok\n"
    ret
8:  pushq %rax                     /* the value that was wrong */
    PRINT_STR "intx bad "
    popq %rax
    call print_hex8_nl
    ret

msix_handler:
    pushq %rax
    incl MSIX_COUNT
    movl $LAPIC, %eax
    movl $0, LAPIC_EOI(%rax)
    popq %rax
    iretq

/* Like an OS's handler for a shared line, ask the device whether it
 * interrupted and count only what it claims: on kvm_pvm hosts KVM enters the
 * handler of a level-triggered I/O APIC interrupt twice (the vector is still
 * pending in the local APIC's IRR on the first entry; QEMU shows the same on
 * those hosts), and the second entry finds the device quiet. */
intx_handler:
    pushq %rax
    movl $NEW_BAR0, %eax
    cmpl $0, REG_INTX(%rax)
    je 1f
    incl INTX_COUNT
    movl $0, REG_INTX(%rax)        /* ack the device before the EOI, or the */
    jmp 2f                         /* level-triggered line fires again */
1:  incl INTX_UNCLAIMED
2:  movl $LAPIC, %eax
    movl $0, LAPIC_EOI(%rax)
    popq %rax
    iretq

spurious_handler:                  /* the local APIC wants no EOI for it */
    iretq

/* Any other vector (an exception, or a stray interrupt) ends the run. */
unexpected:
    PRINT_STR "unexpected vector "
    movq (%rsp), %rax
    call print_hex8_nl
    POWEROFF

    .balign 16
unexpected_stubs:                  /* 16 bytes per vector: push it, report it */
    .set vector, 0
    .rept 256
    .balign 16
    pushq $vector
    jmp unexpected
    .set vector, vector + 1
    .endr

    .balign 8
idt_descriptor:
    .word 256 * 16 - 1
    .quad IDT

/* --- helpers ------------------------------------------------------------------------ */
#include "lib64.inc"

print_hex8_nl:                     /* %eax as 8 hex digits, then a newline */
    movl %eax, %eax
    movl $8, %ecx
    call puthex
    PRINT_STR "\n"
    ret

print_bdf:                         /* %ebx: function -> "00:SS.F" */
    PRINT_STR "00:"
    movl %ebx, %eax
    shrl $11, %eax
    andl $0x1F, %eax
    movl $2, %ecx
    call puthex
    PRINT_STR "."
    movl %ebx, %eax
    shrl $8, %eax
    andl $7, %eax
    movl $1, %ecx
    call puthex
    ret

hex_digits: .ascii "0123456789abcdef"
str_io:     .asciz "io"
str_mem32:  .asciz "mem32"
str_mem64:  .asciz "mem64"

    RESET_VECTOR start16
