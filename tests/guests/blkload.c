/* blkload: a disk workload for the Linux test guest (bench/blk.py), the same
 * program under pyhyve and QEMU.
 *
 *     blkload DEVICE MODE DEPTH OPS SPAN_MIB
 *
 * MODE is seqread, randread, seqwrite or randwrite: OPS 4 KiB transfers with
 * O_DIRECT (so each one reaches the device) within the first SPAN_MIB of
 * DEVICE.  The guest kernel has neither AIO nor io_uring, so queue depth
 * DEPTH comes from DEPTH processes, each doing synchronous pread/pwrite:
 * sequential blocks are dealt out round robin (process k takes k, k+DEPTH,
 * ...), random ones come from a per-process LCG.  Prints
 *     RESULT MODE DEPTH OPS NANOSECONDS
 * timed in the guest from the first fork to the last child's exit, and exits
 * non-zero if any transfer fell short.
 *
 * Freestanding (no libc): raw system calls, no SSE (-mgeneral-regs-only),
 * nothing the host's instruction emulator lacks.
 */

typedef unsigned long u64;
typedef long i64;

enum { SYS_WRITE = 1, SYS_OPEN = 2, SYS_PREAD = 17, SYS_PWRITE = 18, SYS_FORK = 57,
       SYS_EXIT = 60, SYS_WAIT4 = 61, SYS_CLOCK_GETTIME = 228 };
enum { O_RDONLY = 0, O_RDWR = 2, O_DIRECT = 040000, CLOCK_MONOTONIC = 1, BLOCK = 4096 };

static unsigned char buffer[BLOCK] __attribute__((aligned(BLOCK)));

static i64 sys(i64 number, i64 a, i64 b, i64 c, i64 d)
{
    register i64 r10 __asm__("r10") = d;
    i64 result;
    __asm__ volatile("syscall" : "=a"(result) : "a"(number), "D"(a), "S"(b), "d"(c), "r"(r10)
                     : "rcx", "r11", "memory");
    return result;
}

static __attribute__((noreturn)) void quit(int status)
{
    for (;;)
        sys(SYS_EXIT, status, 0, 0, 0);
}

static u64 length(const char *text)
{
    u64 n = 0;
    while (text[n])
        n++;
    return n;
}

static void print(const char *text)
{
    sys(SYS_WRITE, 1, (i64)text, (i64)length(text), 0);
}

static void print_number(u64 value)
{
    char digits[24];
    int at = sizeof digits - 1;
    digits[at] = 0;
    do {
        digits[--at] = (char)('0' + value % 10);
        value /= 10;
    } while (value);
    print(digits + at);
}

static u64 number(const char *text)
{
    u64 value = 0;
    while (*text >= '0' && *text <= '9')
        value = value * 10 + (u64)(*text++ - '0');
    return value;
}

static int same(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return *a == *b;
}

static u64 now_ns(void)
{
    i64 clock[2];
    sys(SYS_CLOCK_GETTIME, CLOCK_MONOTONIC, (i64)clock, 0, 0);
    return (u64)clock[0] * 1000000000ul + (u64)clock[1];
}

/* One process's share: `count` transfers, the k-th of `depth`. */
static int run(i64 fd, int writing, int random, u64 k, u64 depth, u64 count, u64 blocks)
{
    u64 state = 0x9E3779B97F4A7C15ul * (k + 1);
    for (u64 i = 0; i < count; i++) {
        u64 block;
        if (random) {
            state = state * 6364136223846793005ul + 1442695040888963407ul;
            block = (state >> 33) % blocks;
        } else {
            block = (i * depth + k) % blocks;
        }
        i64 done = sys(writing ? SYS_PWRITE : SYS_PREAD, fd, (i64)buffer, BLOCK,
                       (i64)(block * BLOCK));
        if (done != BLOCK)
            return 1;
    }
    return 0;
}

void start(u64 *stack)
{
    u64 argc = stack[0];
    char **argv = (char **)(stack + 1);
    if (argc != 6) {
        print("usage: blkload DEVICE seqread|randread|seqwrite|randwrite DEPTH OPS SPAN_MIB\n");
        quit(2);
    }
    const char *mode = argv[2];
    int writing = same(mode, "seqwrite") || same(mode, "randwrite");
    int random = same(mode, "randread") || same(mode, "randwrite");
    u64 depth = number(argv[3]), ops = number(argv[4]);
    u64 blocks = number(argv[5]) * (1ul << 20) / BLOCK;
    if (!depth || !blocks || (!writing && !same(mode, "seqread") && !same(mode, "randread"))) {
        print("blkload: bad arguments\n");
        quit(2);
    }
    for (u64 i = 0; i < BLOCK; i++)
        buffer[i] = (unsigned char)(i * 7);
    i64 fd = sys(SYS_OPEN, (i64)argv[1], (writing ? O_RDWR : O_RDONLY) | O_DIRECT, 0, 0);
    if (fd < 0) {
        print("blkload: cannot open the device\n");
        quit(1);
    }
    u64 start_ns = now_ns();
    for (u64 k = 0; k < depth; k++) {
        i64 pid = sys(SYS_FORK, 0, 0, 0, 0);
        if (pid == 0)
            quit(run(fd, writing, random, k, depth, ops / depth + (k < ops % depth), blocks));
        if (pid < 0) {
            print("blkload: fork failed\n");
            quit(1);
        }
    }
    int failed = 0;
    for (u64 k = 0; k < depth; k++) {
        int status = 0;
        if (sys(SYS_WAIT4, -1, (i64)&status, 0, 0) < 0 || status != 0)
            failed = 1;
    }
    u64 elapsed = now_ns() - start_ns;
    if (failed) {
        print("blkload: a transfer failed\n");
        quit(1);
    }
    print("RESULT ");
    print(mode);
    print(" ");
    print_number(depth);
    print(" ");
    print_number(ops);
    print(" ");
    print_number(elapsed);
    print("\n");
    quit(0);
}

__asm__(".globl _start\n"
        "_start:\n"
        "    xor %rbp, %rbp\n"
        "    mov %rsp, %rdi\n"
        "    and $-16, %rsp\n"
        "    call start\n");
