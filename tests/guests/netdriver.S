/* A small virtio-net driver and IPv4 responder, as a legacy (virtio 0.9.5) OS
 * driver drives the device: tests/test_net_guest.py pings it through a tap
 * on pyhyve and on QEMU (which runs no firmware before it: BARs start
 * unassigned); bench/net.py has it transmit as fast as it can.
 *
 *  1. scan bus 0 (config mechanism #1, function 0 of each slot) for
 *     1af4:1000, the transitional virtio-net; assign its I/O BAR 0 if nobody
 *     did, turn on I/O decode and bus mastering;
 *  2. reset, ACKNOWLEDGE | DRIVER, take only MAC from the host features (so
 *     every frame carries the 10-byte legacy virtio_net_hdr), read the MAC
 *     from device config, place the receive queue (0) and the transmit queue
 *     (1) in low RAM, post RX_BUFFERS receive buffers, DRIVER_OK, and print
 *     "mac xx:xx:xx:xx:xx:xx" and "net ready";
 *  3. without BLAST_FRAMES: answer ARP requests for GUEST_IP and ICMP echo
 *     requests to it, one frame at a time, re-posting each receive buffer;
 *     after PINGS echo replies (0: never) print "pinged N" (N in hex);
 *     with BLAST_FRAMES: send BLAST_FRAMES broadcast frames of FRAME_SIZE
 *     bytes (Ethernet header included, ethertype 0x88B5, the local
 *     experimental one that the host's stack ignores), refilling the
 *     transmit ring each time the device has returned TX_BATCH of them, and
 *     print "blast done";
 *     with RECV_FRAMES: count received frames of ethertype 0x88B5 (others are
 *     ignored), re-posting each receive buffer, until RECV_FRAMES of them
 *     came, and print "receive done" (bench/net.py floods the tap meanwhile);
 *  4. power off (PM1a S5; QEMU's isa-debug-exit takes the same write).
 *
 * The driver polls the used rings and sets VRING_AVAIL_F_NO_INTERRUPT: it
 * needs no interrupt controller.  It notifies a queue unless the device set
 * VRING_USED_F_NO_NOTIFY.
 *
 * Frames are big-endian on the wire and this CPU is little-endian: a 16-bit
 * field loaded with movzwl holds its bytes swapped, so constants are written
 * swapped (ethertype 0x0806 is compared as 0x0608).  The internet checksum
 * does not care about byte order (RFC 1071 2(B)): summed over little-endian
 * words and stored back the same way it comes out right.  The emulator the
 * tests run under lacks bswap; rolw $8 swaps the one field read as a number. */
#include "rom.inc"

#ifndef GUEST_IP
#define GUEST_IP 0x0A000002     /* 10.0.0.2 */
#endif
#ifndef PINGS
#define PINGS 0                 /* echo replies before power-off; 0: serve forever */
#endif
#ifndef BLAST_FRAMES
#define BLAST_FRAMES 0          /* frames to send instead of serving; 0: serve */
#endif
#ifndef RECV_FRAMES
#define RECV_FRAMES 0           /* frames to count instead of serving; 0: serve */
#endif
#ifndef FRAME_SIZE
#define FRAME_SIZE 1514         /* BLAST_FRAMES: bytes per frame, Ethernet header included */
#endif
#if FRAME_SIZE < 60 || FRAME_SIZE > 1514
#error "FRAME_SIZE must be 60 to 1514 (an untagged Ethernet frame without its FCS)"
#endif
/* GUEST_IP as the dword a little-endian load of its 4 wire bytes gives */
#define GUEST_IP_LE (((GUEST_IP >> 24) & 0xFF) | ((GUEST_IP >> 8) & 0xFF00) | \
                     ((GUEST_IP & 0xFF00) << 8) | ((GUEST_IP & 0xFF) << 24))

/* Low RAM, all inside the 2 MiB longmode.inc identity-maps (its page tables
 * are at 0x10000-0x13FFF, its stack below 0x9000).  A legacy ring of up to
 * 1024 entries takes under 32 KiB. */
#define RX_RING     0x20000
#define TX_RING     0x28000
#define VARS        0x30000
#define V_IOBASE    (VARS + 0)  /* dword: the I/O BAR's base port */
#define V_REPLIES   (VARS + 4)  /* dword: echo replies sent */
#define V_MAC       (VARS + 8)  /* 6 bytes: the device's MAC */
#define RXQ         (VARS + 0x40)   /* struct queue (Q_* below) of queue 0 */
#define TXQ         (VARS + 0x80)   /* ... and of queue 1 */
#define RX_BUFS     0x40000     /* RX_BUFFERS buffers of RX_BUF_SIZE bytes */
#define RX_BUFFERS  16
#define RX_BUF_SHIFT 11
#define RX_BUF_SIZE (1 << RX_BUF_SHIFT) /* header and the largest untagged frame fit */
#define TX_BUF      0x50000     /* the header, then the frame being sent */
#define TX_FRAME    (TX_BUF + HDR_LEN)

/* struct queue: what the driver keeps about one virtqueue */
#define Q_MASK      0           /* dword: size - 1 */
#define Q_AVAIL_IDX 4           /* dword: buffers offered, free-running */
#define Q_LAST_USED 8           /* dword: used elements consumed, free-running */
#define Q_INDEX     12          /* dword: the queue's number, for notify */
#define Q_AVAIL     16          /* qword: the avail ring's address */
#define Q_USED      24          /* qword: the used ring's address */

#define VIRTIO_NET_ID  0x10001AF4  /* device 0x1000 : vendor 0x1AF4, as config dword 0 */

/* Device config (at VIRTIO_CONFIG): virtio_net_config, the MAC first */
#define F_MAC         (1 << 5)
#define HDR_LEN       10        /* struct virtio_net_hdr, without MRG_RXBUF */
#define RX_QUEUE      0
#define TX_QUEUE      1
#define TX_BATCH      64        /* BLAST_FRAMES: buffers returned before it refills */

#define DESC_F_WRITE  2
#define AVAIL_F_NO_INTERRUPT 1
#define USED_F_NO_NOTIFY     1
/* A transmission that takes more than 2^38 TSC ticks (a minute or more) has
 * hung; TSC ticks, not loop turns, keep the bound the same whether the guest
 * runs natively or under the host's instruction emulator. */
#define TIMEOUT_TICKS (1 << 38)

/* Frame offsets: Ethernet, then ARP or IPv4 and ICMP */
#define ETH_DST   0
#define ETH_SRC   6
#define ETH_TYPE  12
#define ETH_LEN   14
#define MIN_FRAME 60            /* shorter frames are padded, as a NIC does */
#define ETHERTYPE_ARP_LE  0x0608
#define ETHERTYPE_IPV4_LE 0x0008
#define ETHERTYPE_BLAST_LE 0xB588
#define ARP_HEAD   14           /* htype 1, ptype 0x0800, hlen 6, plen 4, oper */
#define ARP_SHA    22
#define ARP_SPA    28
#define ARP_THA    32
#define ARP_TPA    38
#define ARP_LEN    42
#define ARP_REQUEST_LE 0x0100040600080100  /* the head, oper 1 */
#define ARP_REPLY_LE   0x0200040600080100  /* the head, oper 2 */
#define IP_VIHL    14
#define IP_TOTLEN  16
#define IP_FRAG    20           /* flags and fragment offset */
#define IP_FRAG_LE_MASK 0xFF3F  /* MF and the offset: a fragment */
#define IP_TTL     22
#define IP_PROTO   23
#define IP_CSUM    24
#define IP_SRC     26
#define IP_DST     30
#define IPPROTO_ICMP 1
#define DEFAULT_TTL 64
#define ICMP_TYPE  0            /* offsets in the ICMP message */
#define ICMP_CSUM  2
#define ICMP_HEAD  8
#define ICMP_ECHO_REPLY   0
#define ICMP_ECHO_REQUEST 8     /* as the type and code word: code 0 */

#include "virtio_legacy.inc"         /* after V_IOBASE: its routines use it */

    ROM_START
#include "longmode.inc"

main64:
    cld
    call find_device
    call init_device
#if BLAST_FRAMES
    call blast
#elif RECV_FRAMES
    call receive
#else
    call serve
#endif
poweroff:
    movw $PM1A_CNT, %dx
    movw $S5_SLEEP, %ax
    outw %ax, %dx
1:  cli
    hlt
    jmp 1b

/* --- 1: the device on PCI ------------------------------------------------------ */
LEGACY_VIRTIO_ROUTINES VIRTIO_NET_ID, virtio-net

/* --- 2: legacy initialisation ---------------------------------------------------- */
init_device:
    call virtio_handshake
    testl $F_MAC, %eax
    jz 8f                          /* without a MAC of its own it has no address */
    movl $F_MAC, %eax              /* nothing else: no offloads, 10-byte header */
    leal VIRTIO_GUEST_FEATURES(%rbx), %edx
    outl %eax, %dx

    leal VIRTIO_CONFIG(%rbx), %edx /* the MAC, a byte at a time as legacy config asks */
    xorl %ecx, %ecx
1:  inb %dx, %al
    movb %al, V_MAC(%rcx)
    incl %edx
    incl %ecx
    cmpl $6, %ecx
    jne 1b

    movl $RX_QUEUE, %r12d
    movl $RX_RING, %r13d
    movl $RXQ, %ebp
    call setup_queue
    movl $TX_QUEUE, %r12d
    movl $TX_RING, %r13d
    movl $TXQ, %ebp
    call setup_queue
    cmpl $(RX_BUFFERS - 1), RXQ + Q_MASK
    jb 9f

    movl $RX_RING, %edi            /* descriptor i: receive buffer i, device-writable */
    movl $RX_BUFS, %eax
    xorl %ecx, %ecx
2:  movq %rax, (%rdi)
    movl $RX_BUF_SIZE, 8(%rdi)
    movw $DESC_F_WRITE, 12(%rdi)
    movw $0, 14(%rdi)
    addl $RX_BUF_SIZE, %eax
    addl $16, %edi
    incl %ecx
    cmpl $RX_BUFFERS, %ecx
    jne 2b
    movl $RXQ, %ebp
    xorl %ecx, %ecx
3:  movl %ecx, %eax
    pushq %rcx
    call add_buffer
    popq %rcx
    incl %ecx
    cmpl $RX_BUFFERS, %ecx
    jne 3b
    movl $TX_BUF, %edi             /* the transmit header stays all zeros */
    xorl %eax, %eax
    movl $(RX_BUF_SIZE / 4), %ecx
    rep stosl

    leal VIRTIO_STATUS(%rbx), %edx
    movb $(S_ACKNOWLEDGE | S_DRIVER | S_DRIVER_OK), %al
    outb %al, %dx
    movl $RXQ, %ebp
    call publish                   /* the buffers: the device may fill them now */

    PRINT_STR "mac "
    xorl %ebx, %ebx
4:  movzbl V_MAC(%rbx), %eax
    movl $2, %ecx
    call puthex
    incl %ebx
    cmpl $6, %ebx
    je 5f
    PRINT_STR ":"
    jmp 4b
5:  PRINT_STR "\nnet ready\n"
    ret
8:  PRINT_STR "no MAC feature\n"
    jmp poweroff
9:  PRINT_STR "receive queue too small\n"
    jmp poweroff

/* %r12d: the queue's number, %r13: where its ring goes (4 KiB-aligned),
 * %rbp: its struct queue; %rbx: the I/O base.  The legacy layout (virtio
 * 0.9.5 2.3): descriptors (16 bytes each), the avail ring right after them,
 * the used ring at the next 4 KiB boundary.  Clobbers rax, rcx, rdx, rdi. */
setup_queue:
    leal VIRTIO_QUEUE_SELECT(%rbx), %edx
    movl %r12d, %eax
    outw %ax, %dx
    leal VIRTIO_QUEUE_SIZE(%rbx), %edx
    inw %dx, %ax
    movzwl %ax, %ecx               /* a legacy driver must use the device's size */
    testl %ecx, %ecx
    jz 8f
    cmpl $1024, %ecx
    ja 8f
    leal -1(%rcx), %eax
    testl %eax, %ecx
    jnz 8f                         /* not a power of two */
    movl %eax, Q_MASK(%rbp)
    movl $0, Q_AVAIL_IDX(%rbp)
    movl $0, Q_LAST_USED(%rbp)
    movl %r12d, Q_INDEX(%rbp)
    movl %ecx, %eax
    shll $4, %eax
    addq %r13, %rax
    movq %rax, Q_AVAIL(%rbp)
    leaq 6(%rax,%rcx,2), %rax
    addq $4095, %rax
    andq $~4095, %rax
    movq %rax, Q_USED(%rbp)
    leaq 6(%rax,%rcx,8), %rcx      /* zero everything up to the used ring's end */
    subq %r13, %rcx
    shrl $2, %ecx
    incl %ecx
    movq %r13, %rdi
    xorl %eax, %eax
    rep stosl
    movq Q_AVAIL(%rbp), %rax
    movw $AVAIL_F_NO_INTERRUPT, (%rax)   /* it polls: no interrupts wanted */
    leal VIRTIO_QUEUE_PFN(%rbx), %edx
    movq %r13, %rax
    shrq $12, %rax
    outl %eax, %dx
    ret
8:  PRINT_STR "bad queue size\n"
    jmp poweroff

/* --- the rings ------------------------------------------------------------------- */
/* Offer descriptor chain %eax on queue %rbp, unpublished.  Clobbers rcx, rdx. */
add_buffer:
    movq Q_AVAIL(%rbp), %rcx
    movl Q_AVAIL_IDX(%rbp), %edx
    andl Q_MASK(%rbp), %edx
    movw %ax, 4(%rcx,%rdx,2)
    incl Q_AVAIL_IDX(%rbp)
    ret

/* Publish queue %rbp's new avail index, and notify the device unless it asked
 * not to be.  Clobbers rax, rcx, rdx. */
publish:
    movq Q_AVAIL(%rbp), %rcx
    movl Q_AVAIL_IDX(%rbp), %eax
    movw %ax, 2(%rcx)              /* x86 keeps stores in order: the ring entries first */
    mfence                         /* ... but lets the flag load pass this store */
    movq Q_USED(%rbp), %rcx
    testw $USED_F_NO_NOTIFY, (%rcx)
    jnz 1f
    movl V_IOBASE, %edx
    addl $VIRTIO_QUEUE_NOTIFY, %edx
    movl Q_INDEX(%rbp), %eax
    outw %ax, %dx
1:  ret

/* The next used element of queue %rbp: %eax its head, %edx its length; ZF
 * set (and nothing consumed) when the device has returned nothing new.
 * A device that returns more buffers than the driver offered, or a head out
 * of the ring, stops the guest.  Clobbers rcx. */
next_used:
    movq Q_USED(%rbp), %rcx
    movzwl 2(%rcx), %edx
    subw Q_LAST_USED(%rbp), %dx    /* returned and not yet consumed */
    jz 1f
    movzwl %dx, %edx
    movl Q_AVAIL_IDX(%rbp), %eax
    subl Q_LAST_USED(%rbp), %eax   /* offered and not yet consumed */
    cmpl %eax, %edx
    ja bad_used_idx
    movl Q_LAST_USED(%rbp), %eax
    andl Q_MASK(%rbp), %eax
    movl 8(%rcx,%rax,8), %edx      /* used elements start at +4: id, then len */
    movl 4(%rcx,%rax,8), %eax
    cmpl Q_MASK(%rbp), %eax
    ja bad_head
    incl Q_LAST_USED(%rbp)         /* clears ZF: it was not -1 */
1:  ret
bad_head:
    PRINT_STR "device returned a bad head\n"
    jmp poweroff
bad_used_idx:
    PRINT_STR "device's used index ran past the buffers offered\n"
    jmp poweroff

/* Wait, up to TIMEOUT_TICKS, for queue %rbp's next used element (next_used's
 * answer); past that, say so and power off.  Clobbers rcx, r8, r9. */
wait_used:
    rdtsc
    shlq $32, %rdx
    orq %rax, %rdx
    movabsq $TIMEOUT_TICKS, %r8
    addq %rdx, %r8                 /* the deadline */
1:  call next_used
    jnz 2f
    pause                          /* a spin-wait hint to the CPU */
    rdtsc
    shlq $32, %rdx
    orq %rax, %rdx
    cmpq %r8, %rdx
    jb 1b
    PRINT_STR "timed out waiting for the device\n"
    jmp poweroff
2:  ret

#if BLAST_FRAMES
/* --- 3b: transmit as fast as the device takes frames ------------------------------ */
blast:
    movl $TX_FRAME, %edi           /* the frame: broadcast, from us, type 0x88B5 */
    movl $0xFFFFFFFF, ETH_DST(%rdi)
    movw $0xFFFF, ETH_DST + 4(%rdi)
    movl V_MAC, %eax
    movl %eax, ETH_SRC(%rdi)
    movw V_MAC + 4, %ax
    movw %ax, ETH_SRC + 4(%rdi)
    movw $ETHERTYPE_BLAST_LE, ETH_TYPE(%rdi)
    movl $TX_RING, %edi            /* every descriptor: that frame, device-readable */
    movl TXQ + Q_MASK, %ecx
    incl %ecx
1:  movq $TX_BUF, (%rdi)
    movl $(HDR_LEN + FRAME_SIZE), 8(%rdi)
    movl $0, 12(%rdi)
    addl $16, %edi
    decl %ecx
    jnz 1b
    movl $TXQ, %ebp
    xorl %ebx, %ebx                /* frames offered */
2:  movl %ebx, %eax                /* fill the ring once */
    call add_buffer
    incl %ebx
    cmpl $BLAST_FRAMES, %ebx
    je 3f
    cmpl Q_MASK(%rbp), %eax
    jne 2b
3:  call publish
    movq Q_USED(%rbp), %r13        /* the ring in registers from here on */
    movq Q_AVAIL(%rbp), %r14
    movl Q_MASK(%rbp), %r15d
    xorl %esi, %esi                /* used elements consumed */
4:  call wait_batch                /* then offer each head again as it comes back */
    movl %ebx, %r12d               /* offered before this batch */
5:  cmpw %si, %di
    je 7f
    movl %esi, %eax
    andl %r15d, %eax
    movl 4(%r13,%rax,8), %eax      /* the element's head */
    cmpl %r15d, %eax
    ja bad_head
    incl %esi
    cmpl $BLAST_FRAMES, %ebx
    je 5b
    movl %ebx, %edx
    andl %r15d, %edx
    movw %ax, 4(%r14,%rdx,2)
    incl %ebx
    jmp 5b
7:  movl %esi, Q_LAST_USED(%rbp)
    movl %ebx, Q_AVAIL_IDX(%rbp)
    cmpl %ebx, %r12d
    je 8f                          /* the tail: nothing new to tell the device */
    call publish
8:  cmpl $BLAST_FRAMES, %esi
    jne 4b
    PRINT_STR "blast done\n"
    ret

/* Wait, up to TIMEOUT_TICKS, until the device has returned TX_BATCH buffers
 * or all it holds (%ebx offered, %esi consumed, %r13 the used ring): refilling
 * and notifying once per batch, not once per frame, keeps the guest's VM
 * exits out of the figure.  %edi: the used index then.  Clobbers rax, rcx,
 * rdx, r8. */
wait_batch:
    rdtsc
    shlq $32, %rdx
    orq %rax, %rdx
    movabsq $TIMEOUT_TICKS, %r8
    addq %rdx, %r8                 /* the deadline */
1:  movzwl 2(%r13), %edi
    movl %edi, %ecx
    subw %si, %cx
    movzwl %cx, %ecx               /* returned and not yet consumed */
    movl %ebx, %edx
    subl %esi, %edx                /* offered and not yet consumed */
    cmpl %edx, %ecx
    ja bad_used_idx
    je 2f
    cmpl $TX_BATCH, %ecx
    jae 2f
    pause
    rdtsc
    shlq $32, %rdx
    orq %rax, %rdx
    cmpq %r8, %rdx
    jb 1b
    PRINT_STR "timed out waiting for the device\n"
    jmp poweroff
2:  ret

#elif RECV_FRAMES
/* --- 3c: take frames as fast as the device gives them ------------------------------ */
receive:
    xorl %ebx, %ebx                /* 0x88B5 frames counted */
1:  movl $RXQ, %ebp
    call wait_used
    cmpl $RX_BUFFERS, %eax
    jae bad_head
    movl %eax, %esi
    shll $RX_BUF_SHIFT, %esi
    cmpl $(HDR_LEN + ETH_LEN), %edx
    jb 3f                          /* no Ethernet header: not counted */
    cmpw $ETHERTYPE_BLAST_LE, RX_BUFS + HDR_LEN + ETH_TYPE(%rsi)
    jne 3f
    incl %ebx
3:  call add_buffer                /* the buffer goes back to the device */
    call publish
    cmpl $RECV_FRAMES, %ebx
    jne 1b
    PRINT_STR "receive done\n"
    ret
#else
/* --- 3a: answer ARP and ping --------------------------------------------------------- */
serve:
    movl $0, V_REPLIES
1:  movl $RXQ, %ebp
    call next_used
    jnz 2f
    pause
    jmp 1b
2:  cmpl $RX_BUFFERS, %eax
    jae bad_head
    pushq %rax                     /* the buffer's head */
    movl %eax, %esi
    shll $RX_BUF_SHIFT, %esi
    addl $(RX_BUFS + HDR_LEN), %esi
    movl %edx, %ecx
    subl $HDR_LEN, %ecx
    jb 3f                          /* shorter than the header: nothing to read */
    cmpl $(RX_BUF_SIZE - HDR_LEN), %ecx
    ja 3f                          /* longer than the buffer: the device lied */
    call handle_frame
3:  popq %rax
    movl $RXQ, %ebp
    call add_buffer                /* the buffer goes back to the device */
    call publish
#if PINGS
    cmpl $PINGS, V_REPLIES
    jne 1b
    PRINT_STR "pinged "
    movl V_REPLIES, %eax
    xorl %ecx, %ecx
    call puthex
    PRINT_STR "\n"
    ret
#else
    jmp 1b
#endif

/* One received frame: %rsi its first byte, %ecx its length. */
handle_frame:
    cmpl $ETH_LEN, %ecx
    jb 9f
    movzwl ETH_TYPE(%rsi), %eax
    cmpw $ETHERTYPE_ARP_LE, %ax
    je arp
    cmpw $ETHERTYPE_IPV4_LE, %ax
    je ipv4
9:  ret

/* Is the frame at %rsi for our MAC (ZF set)?  With %edi = 1, broadcast counts too. */
for_us:
    movl V_MAC, %eax
    cmpl %eax, ETH_DST(%rsi)
    jne 1f
    movw V_MAC + 4, %ax
    cmpw %ax, ETH_DST + 4(%rsi)
    je 2f
1:  cmpl $1, %edi
    jne 2f
    cmpl $0xFFFFFFFF, ETH_DST(%rsi)
    jne 2f
    cmpw $0xFFFF, ETH_DST + 4(%rsi)
2:  ret

arp:                               /* a request for GUEST_IP: reply who we are */
    cmpl $ARP_LEN, %ecx
    jb 9f
    movl $1, %edi
    call for_us
    jne 9f
    movabsq $ARP_REQUEST_LE, %rax
    cmpq %rax, ARP_HEAD(%rsi)
    jne 9f
    cmpl $GUEST_IP_LE, ARP_TPA(%rsi)
    jne 9f
    movl $TX_FRAME, %edi
    movl ARP_SHA(%rsi), %eax       /* to the asker, at the Ethernet and ARP levels */
    movl %eax, ETH_DST(%rdi)
    movl %eax, ARP_THA(%rdi)
    movw ARP_SHA + 4(%rsi), %ax
    movw %ax, ETH_DST + 4(%rdi)
    movw %ax, ARP_THA + 4(%rdi)
    movl ARP_SPA(%rsi), %eax
    movl %eax, ARP_TPA(%rdi)
    movl V_MAC, %eax               /* from us */
    movl %eax, ETH_SRC(%rdi)
    movl %eax, ARP_SHA(%rdi)
    movw V_MAC + 4, %ax
    movw %ax, ETH_SRC + 4(%rdi)
    movw %ax, ARP_SHA + 4(%rdi)
    movl $GUEST_IP_LE, ARP_SPA(%rdi)
    movw $ETHERTYPE_ARP_LE, ETH_TYPE(%rdi)
    movabsq $ARP_REPLY_LE, %rax
    movq %rax, ARP_HEAD(%rdi)
    movl $ARP_LEN, %ecx
    call transmit
9:  ret

ipv4:                              /* an unfragmented echo request to GUEST_IP: echo it */
    xorl %edi, %edi
    call for_us
    jne 9f
    cmpl $(ETH_LEN + 20 + ICMP_HEAD), %ecx
    jb 9f
    movl %ecx, %r10d               /* the frame's length */
    movzbl IP_VIHL(%rsi), %eax
    movl %eax, %r8d
    andl $0x0F, %r8d
    shll $2, %r8d                  /* %r8d: the IP header's length */
    shrl $4, %eax
    cmpl $4, %eax
    jne 9f
    cmpl $20, %r8d
    jb 9f
    movzwl IP_TOTLEN(%rsi), %r9d
    rolw $8, %r9w                  /* %r9d: the datagram's length */
    leal ICMP_HEAD(%r8), %eax
    cmpl %eax, %r9d
    jb 9f
    leal ETH_LEN(%r9), %eax
    cmpl %r10d, %eax
    ja 9f                          /* longer than the frame */
    testw $IP_FRAG_LE_MASK, IP_FRAG(%rsi)
    jnz 9f
    cmpb $IPPROTO_ICMP, IP_PROTO(%rsi)
    jne 9f
    cmpl $GUEST_IP_LE, IP_DST(%rsi)
    jne 9f
    leaq ETH_LEN(%rsi,%r8), %r11   /* %r11: the ICMP message */
    cmpw $ICMP_ECHO_REQUEST, ICMP_TYPE(%r11)
    jne 9f
    pushq %rsi
    leaq ETH_LEN(%rsi), %rsi       /* both checksums must hold */
    movl %r8d, %ecx
    call checksum
    testl %eax, %eax
    jnz 8f
    movq %r11, %rsi
    movl %r9d, %ecx
    subl %r8d, %ecx
    call checksum
    testl %eax, %eax
    jnz 8f
    movq (%rsp), %rsi              /* the reply: a copy, turned around */
    movl $TX_FRAME, %edi
    leal ETH_LEN(%r9), %ecx
    rep movsb
    popq %rsi
    movl $TX_FRAME, %edi
    movl ETH_SRC(%rsi), %eax
    movl %eax, ETH_DST(%rdi)
    movw ETH_SRC + 4(%rsi), %ax
    movw %ax, ETH_DST + 4(%rdi)
    movl V_MAC, %eax
    movl %eax, ETH_SRC(%rdi)
    movw V_MAC + 4, %ax
    movw %ax, ETH_SRC + 4(%rdi)
    movb $DEFAULT_TTL, IP_TTL(%rdi)
    movl IP_SRC(%rsi), %eax
    movl %eax, IP_DST(%rdi)
    movl $GUEST_IP_LE, IP_SRC(%rdi)
    movw $0, IP_CSUM(%rdi)
    leaq ETH_LEN(%rdi), %rsi
    movl %r8d, %ecx
    call checksum
    movw %ax, TX_FRAME + IP_CSUM
    leaq TX_FRAME + ETH_LEN(%r8), %rsi
    movb $ICMP_ECHO_REPLY, ICMP_TYPE(%rsi)
    movw $0, ICMP_CSUM(%rsi)
    pushq %rsi
    movl %r9d, %ecx
    subl %r8d, %ecx
    call checksum
    popq %rsi
    movw %ax, ICMP_CSUM(%rsi)
    leal ETH_LEN(%r9), %ecx
    call transmit
    incl V_REPLIES
9:  ret
8:  popq %rsi                      /* a bad checksum: dropped */
    ret

/* The internet checksum (RFC 1071) of %ecx bytes at %rsi, as the 16-bit
 * word to store little-endian; 0 when the bytes include a correct checksum.
 * Clobbers rcx, rdx, rsi. */
checksum:
    xorl %eax, %eax
1:  cmpl $2, %ecx
    jb 2f
    movzwl (%rsi), %edx
    addl %edx, %eax                /* 757 words at most: no carry out of 32 bits */
    addq $2, %rsi
    subl $2, %ecx
    jmp 1b
2:  testl %ecx, %ecx
    jz 3f
    movzbl (%rsi), %edx            /* an odd last byte: on the wire the high byte of */
    addl %edx, %eax                /* a zero-padded word, so the low byte of ours */
3:  movl %eax, %edx                /* fold the carries back in, twice */
    shrl $16, %edx
    andl $0xFFFF, %eax
    addl %edx, %eax
    movl %eax, %edx
    shrl $16, %edx
    andl $0xFFFF, %eax
    addl %edx, %eax
    notl %eax
    andl $0xFFFF, %eax
    ret

/* Send the %ecx-byte frame at TX_FRAME and wait until the device took it. */
transmit:
    cmpl $MIN_FRAME, %ecx
    jae 1f
    leal TX_FRAME(%rcx), %edi      /* pad with zeros */
    negl %ecx
    addl $MIN_FRAME, %ecx
    xorl %eax, %eax
    rep stosb
    movl $MIN_FRAME, %ecx
1:  movq $TX_BUF, TX_RING          /* descriptor 0: header and frame, device-readable */
    addl $HDR_LEN, %ecx
    movl %ecx, TX_RING + 8
    movl $0, TX_RING + 12
    movl $TXQ, %ebp
    xorl %eax, %eax
    call add_buffer
    call publish
    call wait_used
    ret
#endif

#include "lib64.inc"

hex_digits: .ascii "0123456789abcdef"

    RESET_VECTOR start16
