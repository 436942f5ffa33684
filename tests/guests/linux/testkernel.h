/* What the two test kernels (bzImage and PVH) share: a COM1 console, the
 * checks of the memory map, command line and initrd, the ACPI walk and the
 * power-off.  Each kernel's entry (bzimage.c, pvh.c) turns its boot protocol's
 * structure into a struct boot_info and calls run_checks(). */
#ifndef TESTKERNEL_H
#define TESTKERNEL_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned long uptr;            /* pointer-sized: 32 bits in PVH, 64 in bzImage */

#define MAX_MAP_ENTRIES 128            /* as boot_params.e820_table */
#define E820_RAM 1

struct map_entry {
    u64 addr, size;
    u32 type;
};

struct boot_info {
    const char *map_label;             /* "e820" or "memmap", the name printed */
    struct map_entry map[MAX_MAP_ENTRIES];
    u32 map_entries;
    u64 cmdline;                       /* physical address, 0 if none */
    u32 cmdline_max;                   /* the longest command line the kernel takes */
    u64 initrd, initrd_size;           /* initrd_size 0: none */
    u64 rsdp;                          /* from the boot protocol; 0: scan for it */
};

void puts(const char *s);
void put_dec(u64 value);
void put_hex(u64 value);
void fail(const char *what);          /* prints "FAIL <what>" */
int readable(u64 addr, u64 size);      /* below 4 GiB, where our page tables reach */
void run_checks(struct boot_info *info) __attribute__((noreturn));

void *memset(void *dst, int c, uptr n);
void *memcpy(void *dst, const void *src, uptr n);

static inline void outb(u16 port, u8 value)
{
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static inline void outw(u16 port, u16 value)
{
    __asm__ volatile("outw %0, %1" : : "a"(value), "Nd"(port));
}

static inline u8 inb(u16 port)
{
    u8 value;
    __asm__ volatile("inb %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}

/* A physical address as a pointer: identity-mapped in both kernels. */
#define PHYS(addr) ((void *)(uptr)(addr))

#endif
