/* The multiboot test kernel: reports what its loader handed it, one fact a
 * line on the debug port 0x402 (read back by tests/test_multiboot.py):
 *
 *   entry eax=<hex> cr0=<hex> eflags=<hex> cs=<hex> ds=<hex> ss=<hex>
 *   flags=<hex>                             (the information block's flags)
 *   mem_lower=<KiB> mem_upper=<KiB>         (flags bit 0)
 *   cmdline: <text>                         (bit 2)
 *   loader: <boot loader name>              (bit 9)
 *   mmap <base> <length> <type> size=<n>    (bit 6; one line an entry)
 *   mmap: <entries> entries, <bytes> ram
 *   mods: <count>                           (bit 3)
 *   mod <i> <bytes> bytes fnv1a=<hex> aligned=<0|1> string: <text>
 *   done
 *
 * then powers off through the PM1a control port bhyve's FADT describes. */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define DEBUG_PORT 0x402
#define PM1A_CNT 0x404
#define S5_SLEEP ((5 << 10) | (1 << 13))

struct mb_info {
    u32 flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr;
    u32 syms[4];
    u32 mmap_length, mmap_addr, drives_length, drives_addr, config_table, boot_loader_name;
};

struct mb_module {
    u32 start, end, string, reserved;
};

struct mb_mmap {
    u32 size;
    u64 base, length;
    u32 type;
} __attribute__((packed));

extern u32 entry_eax, entry_ebx, entry_eflags, entry_cr0;
extern u16 entry_cs, entry_ds, entry_ss;

static void outb(u16 port, u8 value)
{
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static void putc(char c)
{
    outb(DEBUG_PORT, c);
}

static void puts(const char *s)
{
    while (*s)
        putc(*s++);
}

static void put_hex(u64 value)
{
    int shift = 60;
    while (shift > 0 && !((value >> shift) & 0xF))
        shift -= 4;
    for (; shift >= 0; shift -= 4)
        putc("0123456789abcdef"[(value >> shift) & 0xF]);
}

static void put_dec(u32 value)
{
    char digits[12];
    int n = 0;
    do {
        digits[n++] = '0' + value % 10;
        value /= 10;
    } while (value);
    while (n)
        putc(digits[--n]);
}

static u32 fnv1a(const u8 *data, u32 size)
{
    u32 hash = 0x811C9DC5;
    for (u32 i = 0; i < size; i++)
        hash = (hash ^ data[i]) * 0x01000193;
    return hash;
}

void mb_main(void)
{
    struct mb_info *info = (struct mb_info *)entry_ebx;

    puts("entry eax=");
    put_hex(entry_eax);
    puts(" cr0=");
    put_hex(entry_cr0);
    puts(" eflags=");
    put_hex(entry_eflags);
    puts(" cs=");
    put_hex(entry_cs);
    puts(" ds=");
    put_hex(entry_ds);
    puts(" ss=");
    put_hex(entry_ss);
    puts("\nflags=");
    put_hex(info->flags);
    puts("\n");
    if (info->flags & (1 << 0)) {
        puts("mem_lower=");
        put_dec(info->mem_lower);
        puts(" mem_upper=");
        put_dec(info->mem_upper);
        puts("\n");
    }
    if (info->flags & (1 << 2)) {
        puts("cmdline: ");
        puts((const char *)info->cmdline);
        puts("\n");
    }
    if (info->flags & (1 << 9)) {
        puts("loader: ");
        puts((const char *)info->boot_loader_name);
        puts("\n");
    }
    if (info->flags & (1 << 6)) {
        u32 at = info->mmap_addr, end = info->mmap_addr + info->mmap_length, entries = 0;
        u64 ram = 0;
        while (at < end) {
            struct mb_mmap *entry = (struct mb_mmap *)at;
            puts("mmap ");
            put_hex(entry->base);
            puts(" ");
            put_hex(entry->length);
            puts(" ");
            put_dec(entry->type);
            puts(" size=");
            put_dec(entry->size);
            puts("\n");
            if (entry->type == 1)
                ram += entry->length;
            entries++;
            at += entry->size + 4;
        }
        puts("mmap: ");
        put_dec(entries);
        puts(" entries, ");
        put_hex(ram);
        puts(" ram\n");
    }
    if (info->flags & (1 << 3)) {
        struct mb_module *mods = (struct mb_module *)info->mods_addr;
        puts("mods: ");
        put_dec(info->mods_count);
        puts("\n");
        for (u32 i = 0; i < info->mods_count; i++) {
            u32 size = mods[i].end - mods[i].start;
            puts("mod ");
            put_dec(i);
            puts(" ");
            put_dec(size);
            puts(" bytes fnv1a=");
            put_hex(fnv1a((const u8 *)mods[i].start, size));
            puts(" aligned=");
            put_dec((mods[i].start & 0xFFF) == 0);
            puts(" string: ");
            puts((const char *)mods[i].string);
            puts("\n");
        }
    }
    puts("done\n");
    __asm__ volatile("outw %0, %1" : : "a"((u16)S5_SLEEP), "Nd"((u16)PM1A_CNT));
}
