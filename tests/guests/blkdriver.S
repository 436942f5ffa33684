/* A small virtio-blk driver, as a legacy (virtio 0.9.5) OS driver drives the
 * device: tests/test_blkdriver.py runs it on pyhyve, bench/blk.py on pyhyve
 * and on QEMU (which runs no firmware before it: BARs start unassigned).
 *
 *  1. scan bus 0 (config mechanism #1, function 0 of each slot) for
 *     1af4:1001, the transitional virtio-blk; assign its I/O BAR 0 if nobody
 *     did, turn on I/O decode and bus mastering;
 *  2. reset, ACKNOWLEDGE | DRIVER, read the host features, take only FLUSH
 *     (the one optional request it sends), size queue 0 from the device,
 *     place it page-aligned in low RAM through the queue PFN register,
 *     DRIVER_OK;
 *  3. unless READ_ONLY: write TOTAL_KIB of a pattern in CHUNK_KIB requests,
 *     FLUSH, read it back, and compare a checksum of what it wrote with one
 *     of what it read ("blk ok" / "blk mismatch");
 *     with READ_ONLY: read TOTAL_KIB from sector 0 in CHUNK_KIB requests and
 *     touch nothing (bench/blk.py times the device, not the emulated CPU);
 *     with WRITE_ONLY likewise, writing whatever the buffer holds;
 *     with NUMBERED: write TOTAL_KIB of the pattern in CHUNK_KIB blocks in
 *     order, FLUSH after every GROUP of them and print "acked N" (N in hex)
 *     once that flush completed: blocks 0 to N-1 are then on the disk
 *     (tests/test_disk_integrity.py kills pyhyve at random points; built with
 *     GROUP=1 and DEBUG_PORT=0x3F8 it prints each block's line on COM1,
 *     and tests/test_migration.py moves it to another pyhyve meanwhile);
 *  4. power off (PM1a S5; QEMU's isa-debug-exit takes the same write).
 *
 * One request is in flight at a time and the driver polls the used ring: it
 * sets VRING_AVAIL_F_NO_INTERRUPT and needs no interrupt controller.
 *
 * The pattern: dword i (0..127) of sector s is 0x5A000000 + (s << 16) + i, a
 * 32-bit counter seeded by the sector number.  The checksum of a run of
 * qwords is  c = rol64(c, 1) + q  over them in disk order, from c = 0.
 * The guest code is emulated instruction by instruction on the test hosts
 * (about 1M instructions/s), so the pattern and the checksum are unrolled
 * loops of two instructions per qword. */
#include "rom.inc"

#ifndef TOTAL_KIB
#define TOTAL_KIB 1024          /* how much to write (and read back), or to read */
#endif
#ifndef CHUNK_KIB
#define CHUNK_KIB 64            /* bytes per request */
#endif
#ifndef READ_ONLY
#define READ_ONLY 0
#endif
#ifndef WRITE_ONLY
#define WRITE_ONLY 0
#endif
#ifndef NUMBERED
#define NUMBERED 0
#endif
#ifndef GROUP
#define GROUP          8        /* NUMBERED: blocks per FLUSH (a power of two) */
#endif
#define CHUNK          (CHUNK_KIB * 1024)
#define CHUNKS         (TOTAL_KIB / CHUNK_KIB)
#define SECTOR         512
#if CHUNK_KIB > 128 || TOTAL_KIB % CHUNK_KIB
#error "CHUNK_KIB must divide TOTAL_KIB and be at most 128 (the buffer)"
#endif

/* Low RAM, all inside the 2 MiB longmode.inc identity-maps (its page tables
 * are at 0x10000-0x13FFF, its stack below 0x9000). */
#define RING        0x20000     /* queue 0: up to 1024 entries fit below REQ */
#define REQ         0x30000     /* struct virtio_blk_outhdr: type, ioprio, sector */
#define STATUS      0x30010     /* the status byte the device writes */
#define VARS        0x30100
#define V_IOBASE    (VARS + 0)  /* dword: the I/O BAR's base port */
#define V_QMASK     (VARS + 4)  /* dword: queue size - 1 */
#define V_AVAIL_IDX (VARS + 8)  /* dword: the driver's free-running avail index */
#define V_AVAIL     (VARS + 16) /* qword: the avail ring's address */
#define V_USED      (VARS + 24) /* qword: the used ring's address */
#define BUF         0x40000     /* the data buffer, CHUNK bytes */

#define VIRTIO_BLK_ID  0x10011AF4  /* device 0x1001 : vendor 0x1AF4, as config dword 0 */

/* Device config (at VIRTIO_CONFIG): virtio_blk_config, capacity (u64 sectors) first */
#define F_FLUSH       (1 << 9)

#define DESC_F_NEXT   1
#define DESC_F_WRITE  2
#define AVAIL_F_NO_INTERRUPT 1
#define T_IN    0
#define T_OUT   1
#define T_FLUSH 4
#define NO_STATUS 0xFF              /* preset; a device that answered overwrote it */
#define TIMEOUT_STATUS 0x100        /* submit's answer when the device never did */
/* A request that takes more than 2^38 TSC ticks (a minute or more) has hung.
 * Counting TSC ticks, not loop turns, keeps the bound the same whether the
 * guest runs natively or under the host's instruction emulator. */
#define TIMEOUT_TICKS (1 << 38)

#include "virtio_legacy.inc"         /* after V_IOBASE: its routines use it */

    ROM_START
#include "longmode.inc"

main64:
    cld
    call find_device
    call init_device
#if READ_ONLY || WRITE_ONLY
    call transfer_only
#elif NUMBERED
    call write_numbered
#else
    call write_read_verify
#endif
poweroff:
    movw $PM1A_CNT, %dx
    movw $S5_SLEEP, %ax
    outw %ax, %dx
1:  cli
    hlt
    jmp 1b

/* --- 1: the device on PCI ------------------------------------------------------ */
LEGACY_VIRTIO_ROUTINES VIRTIO_BLK_ID, virtio-blk

/* --- 2: legacy initialisation ---------------------------------------------------- */
init_device:
    call virtio_handshake
    andl $F_FLUSH, %eax            /* FLUSH is defined only once negotiated */
    leal VIRTIO_GUEST_FEATURES(%rbx), %edx
    outl %eax, %dx

    leal VIRTIO_QUEUE_SELECT(%rbx), %edx
    xorl %eax, %eax
    outw %ax, %dx
    leal VIRTIO_QUEUE_SIZE(%rbx), %edx
    inw %dx, %ax
    movzwl %ax, %ecx               /* a legacy driver must use the device's size */
    testl %ecx, %ecx
    jz 8f
    cmpl $1024, %ecx
    ja 8f
    leal -1(%rcx), %eax
    movl %eax, V_QMASK
    movl $0, V_AVAIL_IDX
    /* The legacy layout (virtio 0.9.5 2.3): descriptors (16 bytes each), the
     * avail ring right after them, the used ring at the next 4 KiB boundary. */
    movl %ecx, %eax
    shll $4, %eax
    addl $RING, %eax
    movq %rax, V_AVAIL
    leal 6(%rax,%rcx,2), %eax
    addl $4095, %eax
    andl $~4095, %eax
    movq %rax, V_USED
    leal 6(%rax,%rcx,8), %ecx      /* zero everything up to the used ring's end */
    subl $RING, %ecx
    shrl $2, %ecx
    movl $RING, %edi
    xorl %eax, %eax
    rep stosl
    movq V_AVAIL, %rax
    movw $AVAIL_F_NO_INTERRUPT, (%rax)   /* it polls: no interrupts wanted */
    leal VIRTIO_QUEUE_PFN(%rbx), %edx
    movl $(RING >> 12), %eax
    outl %eax, %dx
    leal VIRTIO_STATUS(%rbx), %edx
    movb $(S_ACKNOWLEDGE | S_DRIVER | S_DRIVER_OK), %al
    outb %al, %dx

    PRINT_STR "queue size "            /* the size and the disk's capacity, for the log */
    movl V_QMASK, %eax
    incl %eax
    xorl %ecx, %ecx
    call puthex
    PRINT_STR " capacity "
    leal VIRTIO_CONFIG(%rbx), %edx
    inl %dx, %eax
    movl %eax, %r12d
    addl $4, %edx
    inl %dx, %eax
    shlq $32, %rax
    orq %r12, %rax
    movq %rax, %r12
    xorl %ecx, %ecx
    call puthex
    PRINT_STR "\n"
    cmpq $(TOTAL_KIB * 2), %r12    /* sectors the run needs */
    jb 9f
    ret
8:  PRINT_STR "bad queue size\n"
    jmp poweroff
9:  PRINT_STR "disk too small\n"
    jmp poweroff

/* --- one request ----------------------------------------------------------------- */
/* %edi: type, %rsi: sector, %edx: data bytes (at BUF; 0 for none).  Builds the
 * chain header -> [data ->] status in descriptors 0-2, offers it, notifies the
 * device and polls the used ring.  Returns the status byte in %eax, or
 * TIMEOUT_STATUS.  Clobbers rax-rdx, rsi, rdi, r8. */
submit:
    movl %edi, REQ
    movl $0, REQ + 4
    movq %rsi, REQ + 8
    movb $NO_STATUS, STATUS
    movq $REQ, RING                /* descriptor 0: the header, device-readable */
    movl $16, RING + 8
    movw $DESC_F_NEXT, RING + 12
    movw $1, RING + 14
    testl %edx, %edx
    jnz 1f
    movw $2, RING + 14             /* no data: the header leads to the status */
    jmp 2f
1:  movq $BUF, RING + 16           /* descriptor 1: the data */
    movl %edx, RING + 24
    xorl %eax, %eax
    cmpl $T_IN, %edi
    jne 11f
    movl $DESC_F_WRITE, %eax       /* a read: the device writes the buffer */
11: orl $DESC_F_NEXT, %eax
    movw %ax, RING + 28
    movw $2, RING + 30
2:  movq $STATUS, RING + 32        /* descriptor 2: the status, device-writable */
    movl $1, RING + 40
    movw $DESC_F_WRITE, RING + 44
    movw $0, RING + 46
    movq V_AVAIL, %rcx             /* offer head 0, then publish the new index */
    movl V_AVAIL_IDX, %eax
    movl %eax, %edx
    andl V_QMASK, %edx
    movw $0, 4(%rcx,%rdx,2)
    incl %eax
    movl %eax, V_AVAIL_IDX
    movw %ax, 2(%rcx)              /* x86 keeps stores in order: no fence needed */
    movl V_IOBASE, %edx
    addl $VIRTIO_QUEUE_NOTIFY, %edx
    xorl %eax, %eax
    outw %ax, %dx                  /* queue 0 */
    rdtsc
    shlq $32, %rdx
    orq %rax, %rdx
    movabsq $TIMEOUT_TICKS, %r8
    addq %rdx, %r8                 /* the deadline */
    movq V_USED, %rcx
    movl V_AVAIL_IDX, %esi
3:  cmpw %si, 2(%rcx)              /* the used index caught up: done */
    je 4f
    pause                          /* a spin-wait hint to the CPU */
    rdtsc
    shlq $32, %rdx
    orq %rax, %rdx
    cmpq %r8, %rdx
    jb 3b
    movl $TIMEOUT_STATUS, %eax
    ret
4:  movzbl STATUS, %eax
    ret

/* --- 3: the runs ------------------------------------------------------------------ */
#if READ_ONLY || WRITE_ONLY
#if READ_ONLY
#define TRANSFER T_IN
#define TRANSFER_DONE "read done\n"
#define TRANSFER_STATUS "read status "
#else
#define TRANSFER T_OUT
#define TRANSFER_DONE "write done\n"
#define TRANSFER_STATUS "write status "
#endif
transfer_only:
    xorl %ebx, %ebx                /* the chunk's first sector */
1:  movl $TRANSFER, %edi
    movq %rbx, %rsi
    movl $CHUNK, %edx
    call submit
    testl %eax, %eax
    jnz 8f
    addq $(CHUNK / SECTOR), %rbx
    cmpq $(CHUNKS * CHUNK / SECTOR), %rbx
    jne 1b
    PRINT_STR TRANSFER_DONE
    ret
8:  pushq %rax
    PRINT_STR TRANSFER_STATUS
    popq %rax
    call print_status
    ret

#else
write_read_verify:
    xorl %r14d, %r14d              /* the checksum of what it wrote */
    xorl %r15d, %r15d              /* the checksum of what it read */
    xorl %ebx, %ebx                /* the chunk's first sector */
1:  movq %rbx, %rdi
    call fill_pattern
    movq %r14, %rax
    call checksum
    movq %rax, %r14
    movl $T_OUT, %edi
    movq %rbx, %rsi
    movl $CHUNK, %edx
    call submit
    testq %rbx, %rbx
    jnz 2f
    pushq %rax                     /* the first write's status, ro or not */
    PRINT_STR "write status "
    movq (%rsp), %rax
    call print_status
    popq %rax
2:  testl %eax, %eax
    jnz 8f
    addq $(CHUNK / SECTOR), %rbx
    cmpq $(CHUNKS * CHUNK / SECTOR), %rbx
    jne 1b

    movl $T_FLUSH, %edi
    xorl %esi, %esi
    xorl %edx, %edx
    call submit
    pushq %rax
    PRINT_STR "flush status "
    movq (%rsp), %rax
    call print_status
    popq %rax
    testl %eax, %eax
    jnz 9f

    xorl %ebx, %ebx
3:  movl $T_IN, %edi
    movq %rbx, %rsi
    movl $CHUNK, %edx
    call submit
    testl %eax, %eax
    jnz 7f
    movq %r15, %rax
    call checksum
    movq %rax, %r15
    addq $(CHUNK / SECTOR), %rbx
    cmpq $(CHUNKS * CHUNK / SECTOR), %rbx
    jne 3b

    PRINT_STR "written checksum "
    movq %r14, %rax
    movl $16, %ecx
    call puthex
    PRINT_STR "\nread checksum "
    movq %r15, %rax
    movl $16, %ecx
    call puthex
    PRINT_STR "\n"
    cmpq %r14, %r15
    jne 6f
    PRINT_STR "blk ok\n"
    ret
6:  PRINT_STR "blk mismatch\n"
    ret
7:  pushq %rax
    PRINT_STR "read status "
    popq %rax
    call print_status
    PRINT_STR "blk read failed\n"
    ret
8:  PRINT_STR "blk write failed\n"
    ret
9:  PRINT_STR "blk flush failed\n"
    ret

#if NUMBERED
write_numbered:
    xorl %ebx, %ebx                /* the block's first sector */
    xorl %r12d, %r12d              /* blocks written */
1:  movq %rbx, %rdi
    call fill_pattern
    movl $T_OUT, %edi
    movq %rbx, %rsi
    movl $CHUNK, %edx
    call submit
    testl %eax, %eax
    jnz 8f
    addq $(CHUNK / SECTOR), %rbx
    incl %r12d
    testl $(GROUP - 1), %r12d
    jnz 2f
    movl $T_FLUSH, %edi
    xorl %esi, %esi
    xorl %edx, %edx
    call submit
    testl %eax, %eax
    jnz 9f
    PRINT_STR "acked "
    movl %r12d, %eax
    xorl %ecx, %ecx
    call puthex
    PRINT_STR "\n"
2:  cmpq $(CHUNKS * CHUNK / SECTOR), %rbx
    jne 1b
    PRINT_STR "blk done\n"
    ret
8:  PRINT_STR "blk write failed\n"
    ret
9:  PRINT_STR "blk flush failed\n"
    ret
#endif

/* Fill BUF with the pattern of CHUNK bytes from sector %rdi.  Two dwords per
 * store: the low one is 0x5A000000 + (s << 16) + i (i even), the high one
 * the next counter value; adding 0x0000000200000002 steps both, and i < 128
 * never carries out of the low dword.  Clobbers rax, rcx, rdi, r8, r9, r10. */
fill_pattern:
    movl %edi, %eax
    shll $16, %eax
    addl $0x5A000000, %eax
    movq %rax, %r8
    incl %eax
    shlq $32, %rax
    orq %rax, %r8                  /* the first qword of the first sector */
    movabsq $0x0000000200000002, %r9
    movabsq $0x0001000000010000, %r10  /* from one sector's start to the next's */
    movl $BUF, %edi
    movl $(CHUNK / SECTOR), %ecx
1:  movq %r8, %rax
    .set at, 0
    .rept SECTOR / 8
    movq %rax, at(%rdi)
    addq %r9, %rax
    .set at, at + 8
    .endr
    addq %r10, %r8
    addq $SECTOR, %rdi
    decl %ecx
    jnz 1b
    ret

/* %rax = the running checksum, carried on over BUF's CHUNK bytes.
 * Clobbers rcx, rsi. */
checksum:
    movl $BUF, %esi
    movl $(CHUNK / SECTOR), %ecx
1:  .set at, 0
    .rept SECTOR / 8
    rolq $1, %rax
    addq at(%rsi), %rax
    .set at, at + 8
    .endr
    addq $SECTOR, %rsi
    decl %ecx
    jnz 1b
    ret
#endif

/* --- helpers ------------------------------------------------------------------------ */
print_status:                      /* %eax: a status (or TIMEOUT_STATUS) -> "XX\n" */
    cmpl $TIMEOUT_STATUS, %eax
    je 1f
    movl $2, %ecx
    call puthex
    PRINT_STR "\n"
    ret
1:  PRINT_STR "timeout\n"
    ret

#include "lib64.inc"

hex_digits: .ascii "0123456789abcdef"

    RESET_VECTOR start16
