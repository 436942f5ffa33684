/* The checks both test kernels run once their boot protocol is parsed, and
 * what they print on COM1 (one fact a line, read back by tests/test_kexec.py):
 *
 *   cmdline: <the command line, byte for byte>
 *   <e820|memmap>: <n> entries, <bytes> ram
 *   initrd: <size> bytes fnv1a=<hex>        (or "initrd: none")
 *   rsdp 0x<address> revision <n>
 *   acpi ok <n> tables                      (entries of the XSDT, or RSDT)
 *   acpi s5 slp_typ=<n> from dsdt           (or "default": 5, bhyve's)
 *   madt cpus=<enabled local APICs>
 *   mcfg base=0x<hex>                       (or "mcfg none")
 *   poweroff
 *
 * (the entry first prints "bootproto ok" or "pvh ok").  Anything wrong prints
 * "FAIL <what>" and the checks go on, so that one run shows every problem.
 * The kernel then powers off as an OS does: SLP_TYPa from the DSDT's \_S5
 * (QEMU's is 0, bhyve's 5) with SLP_EN, written to the FADT's PM1a control
 * block; it prints "halt" and halts when there is no FADT to say where that is. */
#include "testkernel.h"

#define COM1 0x3F8
#define LSR_THRE 0x20                  /* transmit holding register empty */

static void putc(char c)
{
    while (!(inb(COM1 + 5) & LSR_THRE))
        ;
    outb(COM1, c);
}

void puts(const char *s)
{
    while (*s)
        putc(*s++);
}

/* Decimal without 64-bit division: the 32-bit PVH kernel has no libgcc. */
void put_dec(u64 value)
{
    static const u64 powers[] = {
        10000000000000000000ULL, 1000000000000000000ULL, 100000000000000000ULL,
        10000000000000000ULL, 1000000000000000ULL, 100000000000000ULL,
        10000000000000ULL, 1000000000000ULL, 100000000000ULL, 10000000000ULL,
        1000000000ULL, 100000000ULL, 10000000ULL, 1000000ULL, 100000ULL, 10000ULL,
        1000ULL, 100ULL, 10ULL, 1ULL,
    };
    int started = 0;
    for (unsigned i = 0; i < sizeof(powers) / sizeof(powers[0]); i++) {
        char digit = '0';
        while (value >= powers[i]) {
            value -= powers[i];
            digit++;
        }
        if (digit != '0' || started || powers[i] == 1) {
            putc(digit);
            started = 1;
        }
    }
}

void put_hex(u64 value)
{
    int shift = 60;
    while (shift > 0 && !((value >> shift) & 0xF))
        shift -= 4;
    for (; shift >= 0; shift -= 4)
        putc("0123456789abcdef"[(value >> shift) & 0xF]);
}

void fail(const char *what)
{
    puts("FAIL ");
    puts(what);
    puts("\n");
}

/* Both kernels can touch the first 4 GiB only (identity-mapped by the
 * bzImage's page tables; the PVH kernel runs without paging). */
int readable(u64 addr, u64 size)
{
    return addr < (1ULL << 32) && size <= (1ULL << 32) - addr;
}

void *memset(void *dst, int c, uptr n)
{
    u8 *d = dst;
    while (n--)
        *d++ = (u8)c;
    return dst;
}

void *memcpy(void *dst, const void *src, uptr n)
{
    u8 *d = dst;
    const u8 *s = src;
    while (n--)
        *d++ = *s++;
    return dst;
}

static int same(const void *a, const char *b, unsigned n)
{
    const u8 *p = a;
    for (unsigned i = 0; i < n; i++)
        if (p[i] != (u8)b[i])
            return 0;
    return 1;
}

/* --- memory map, command line, initrd --------------------------------------- */

static int in_ram(const struct boot_info *info, u64 addr, u64 size)
{
    for (u32 i = 0; i < info->map_entries; i++) {
        const struct map_entry *e = &info->map[i];
        if (e->type == E820_RAM && addr >= e->addr && addr + size <= e->addr + e->size)
            return 1;
    }
    return 0;
}

static void check_map(const struct boot_info *info)
{
    u64 ram = 0, end = 0;
    if (info->map_entries == 0 || info->map_entries > MAX_MAP_ENTRIES) {
        fail("memory map: no entries or too many");
        return;
    }
    for (u32 i = 0; i < info->map_entries; i++) {
        const struct map_entry *e = &info->map[i];
        /* Sorted and non-overlapping: each entry starts where the last ended or later. */
        if (i > 0 && e->addr < end) {
            puts("FAIL memory map: entries unsorted or overlapping at entry ");
            put_dec(i);
            puts(" (0x");
            put_hex(e->addr);
            puts(" below 0x");
            put_hex(end);
            puts(")\n");
            return;
        }
        if (e->addr + e->size < e->addr) {
            fail("memory map: entry wraps around");
            return;
        }
        end = e->addr + e->size;
        if (e->type == E820_RAM)
            ram += e->size;
    }
    puts(info->map_label);
    puts(": ");
    put_dec(info->map_entries);
    puts(" entries, ");
    put_dec(ram);
    puts(" ram\n");
}

static void check_cmdline(const struct boot_info *info)
{
    if (!info->cmdline) {
        puts("cmdline: none\n");
        return;
    }
    if (!readable(info->cmdline, info->cmdline_max + 1)) {
        fail("cmdline: pointer beyond 4 GiB");
        return;
    }
    const char *s = PHYS(info->cmdline);
    u32 length = 0;
    while (length <= info->cmdline_max && s[length])
        length++;
    if (length > info->cmdline_max) {
        fail("cmdline: not terminated within cmdline_size");
        return;
    }
    if (!in_ram(info, info->cmdline, length + 1))
        fail("cmdline: outside RAM in the memory map");
    puts("cmdline: ");
    puts(s);
    puts("\n");
}

static void check_initrd(const struct boot_info *info)
{
    if (!info->initrd_size) {
        puts("initrd: none\n");
        return;
    }
    if (!readable(info->initrd, info->initrd_size)) {
        fail("initrd: beyond 4 GiB");
        return;
    }
    if (!in_ram(info, info->initrd, info->initrd_size))
        fail("initrd: outside RAM in the memory map");
    /* FNV-1a, 32-bit: the test computes the same over the file it wrote. */
    const u8 *p = PHYS(info->initrd);
    u32 hash = 0x811C9DC5;
    for (u64 i = 0; i < info->initrd_size; i++) {
        hash ^= p[i];
        hash *= 0x01000193;
    }
    puts("initrd: ");
    put_dec(info->initrd_size);
    puts(" bytes fnv1a=");
    put_hex(hash);
    puts("\n");
}

/* --- ACPI --------------------------------------------------------------------- */

static u8 checksum(const void *p, u32 length)
{
    const u8 *b = p;
    u8 sum = 0;
    while (length--)
        sum += *b++;
    return sum;
}

static u32 rd32(const void *p, u32 off) { return *(const u32 *)((const u8 *)p + off); }
static u64 rd64(const void *p, u32 off) { return *(const u64 *)((const u8 *)p + off); }

static int rsdp_valid(u64 addr)
{
    if (!readable(addr, 36))
        return 0;
    const u8 *p = PHYS(addr);
    if (!same(p, "RSD PTR ", 8) || checksum(p, 20) != 0)
        return 0;
    /* ACPI 2.0+: the extended checksum covers the whole (36-byte) structure. */
    if (p[15] >= 2 && (rd32(p, 20) < 36 || checksum(p, rd32(p, 20)) != 0))
        return 0;
    return 1;
}

/* Where a PC BIOS leaves the RSDP: the first KiB of the EBDA, then 0xE0000-0xFFFFF. */
static u64 find_rsdp(void)
{
    u64 ebda = (u64)*(const u16 *)PHYS(0x40E) << 4;
    if (ebda >= 0x80000 && ebda < 0xA0000)
        for (u64 a = ebda; a < ebda + 1024; a += 16)
            if (rsdp_valid(a))
                return a;
    for (u64 a = 0xE0000; a < 0x100000; a += 16)
        if (rsdp_valid(a))
            return a;
    return 0;
}

/* A system description table whose header, length and checksum are right. */
static const u8 *table_at(u64 addr)
{
    if (!addr || !readable(addr, 36))
        return 0;
    const u8 *t = PHYS(addr);
    u32 length = rd32(t, 4);
    if (length < 36 || !readable(addr, length) || checksum(t, length) != 0)
        return 0;
    return t;
}

static void put_sig(const u8 *t)
{
    char sig[5] = {t[0], t[1], t[2], t[3], 0};
    puts(sig);
}

/* SLP_TYPa for S5 from the DSDT's \_S5 package, as an OS finds it: the
 * NameOp, "_S5_", PackageOp, PkgLength, NumElements, then the first element. */
static int s5_from_dsdt(const u8 *dsdt)
{
    u32 length = rd32(dsdt, 4);
    for (u32 i = 36; i + 8 < length; i++) {
        if (!same(dsdt + i, "_S5_", 4) || dsdt[i + 4] != 0x12)
            continue;
        if (dsdt[i - 1] != 0x08 && !(dsdt[i - 1] == '\\' && dsdt[i - 2] == 0x08))
            continue;
        u32 at = i + 5;
        at += 1 + (dsdt[at] >> 6);     /* PkgLength: bits 7-6 count the bytes after the first */
        at += 1;                       /* NumElements */
        if (at + 1 >= length)
            return -1;
        switch (dsdt[at]) {
        case 0x00: return 0;           /* ZeroOp */
        case 0x01: return 1;           /* OneOp */
        case 0x0A: return dsdt[at + 1];/* BytePrefix */
        default: return -1;
        }
    }
    return -1;
}

static u16 pm1a_cnt;                   /* from the FADT; 0 when there is none */
static int slp_typ_s5 = 5;             /* bhyve's \_S5; used when the DSDT says nothing */

static void check_fadt(const u8 *fadt)
{
    u32 length = rd32(fadt, 4);
    pm1a_cnt = (u16)rd32(fadt, 64);                    /* PM1a_CNT_BLK */
    if (!pm1a_cnt && length >= 184 && fadt[172] == 1)  /* X_PM1a_CNT_BLK in I/O space */
        pm1a_cnt = (u16)rd64(fadt, 176);
    if (!pm1a_cnt)
        fail("acpi: FADT without PM1a_CNT_BLK");
    u64 dsdt_addr = rd32(fadt, 40);
    if (length >= 148 && rd64(fadt, 140))
        dsdt_addr = rd64(fadt, 140);
    const u8 *dsdt = table_at(dsdt_addr);
    if (!dsdt || !same(dsdt, "DSDT", 4)) {
        fail("acpi: DSDT missing or bad checksum");
        return;
    }
    int s5 = s5_from_dsdt(dsdt);
    if (s5 >= 0)
        slp_typ_s5 = s5 & 7;
    puts("acpi s5 slp_typ=");
    put_dec(slp_typ_s5);
    puts(s5 >= 0 ? " from dsdt\n" : " default\n");
}

static u32 madt_cpus(const u8 *madt)
{
    u32 length = rd32(madt, 4), cpus = 0;
    for (u32 at = 44; at + 2 <= length; at += madt[at + 1]) {
        u8 type = madt[at], size = madt[at + 1];
        if (size < 2 || at + size > length)
            break;
        if (type == 0 && size >= 8 && (rd32(madt, at + 4) & 1))        /* local APIC */
            cpus++;
        if (type == 9 && size >= 16 && (rd32(madt, at + 8) & 1))       /* local x2APIC */
            cpus++;
    }
    return cpus;
}

static void check_acpi(const struct boot_info *info)
{
    u64 rsdp = info->rsdp;
    if (rsdp && !rsdp_valid(rsdp)) {
        fail("acpi: the RSDP the loader gave is bad");
        return;
    }
    if (!rsdp)
        rsdp = find_rsdp();
    if (!rsdp) {
        fail("acpi: no rsdp");
        return;
    }
    const u8 *r = PHYS(rsdp);
    puts("rsdp 0x");
    put_hex(rsdp);
    puts(" revision ");
    put_dec(r[15]);
    puts("\n");
    int xsdt = r[15] >= 2 && rd64(r, 24);
    const u8 *root = table_at(xsdt ? rd64(r, 24) : rd32(r, 16));
    if (!root || !same(root, xsdt ? "XSDT" : "RSDT", 4)) {
        fail(xsdt ? "acpi: bad XSDT" : "acpi: bad RSDT");
        return;
    }
    u32 width = xsdt ? 8 : 4, count = (rd32(root, 4) - 36) / width;
    const u8 *fadt = 0, *madt = 0, *mcfg = 0;
    int bad = 0;
    for (u32 i = 0; i < count; i++) {
        u64 addr = xsdt ? rd64(root, 36 + 8 * i) : rd32(root, 36 + 4 * i);
        const u8 *t = table_at(addr);
        if (!t) {
            puts("FAIL acpi: bad table at 0x");
            put_hex(addr);
            puts("\n");
            bad = 1;
            continue;
        }
        if (same(t, "FACP", 4))
            fadt = t;
        else if (same(t, "APIC", 4))
            madt = t;
        else if (same(t, "MCFG", 4))
            mcfg = t;
    }
    if (!bad) {
        puts("acpi ok ");
        put_dec(count);
        puts(" tables\n");
    }
    if (fadt)
        check_fadt(fadt);
    else
        fail("acpi: no FADT");
    if (madt) {
        puts("madt cpus=");
        put_dec(madt_cpus(madt));
        puts("\n");
    } else {
        fail("acpi: no MADT");
    }
    if (mcfg && rd32(mcfg, 4) >= 44 + 16) {
        puts("mcfg base=0x");
        put_hex(rd64(mcfg, 44));
        puts("\n");
    } else {
        puts("mcfg none\n");
    }
}

void run_checks(struct boot_info *info)
{
    check_cmdline(info);
    check_map(info);
    check_initrd(info);
    check_acpi(info);
    if (pm1a_cnt) {
        puts("poweroff\n");
        outw(pm1a_cnt, (u16)(slp_typ_s5 << 10 | 1 << 13));    /* SLP_TYPa | SLP_EN */
        /* Nothing more on the console: a hypervisor may finish the power-off
         * after this vCPU ran on (QEMU does).  If it never does, halting with
         * interrupts off ends the VM with another exit status, which the
         * tests check. */
    } else {
        puts("halt\n");
    }
    for (;;)
        __asm__ volatile("cli; hlt");
}
