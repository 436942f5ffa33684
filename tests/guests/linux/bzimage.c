/* The bzImage test kernel's C entry: called by head64.S at the 64-bit entry
 * point with the zero page (struct boot_params) that RSI pointed at. */
#include "testkernel.h"

/* struct boot_params offsets (Documentation/arch/x86/zero-page.rst, boot.rst) */
#define ACPI_RSDP_ADDR   0x070
#define EXT_RAMDISK_IMG  0x0C0
#define EXT_RAMDISK_SIZE 0x0C4
#define EXT_CMD_LINE_PTR 0x0C8
#define E820_ENTRIES     0x1E8
#define BOOT_FLAG        0x1FE
#define HEADER           0x202
#define VERSION          0x206
#define TYPE_OF_LOADER   0x210
#define RAMDISK_IMAGE    0x218
#define RAMDISK_SIZE     0x21C
#define CMD_LINE_PTR     0x228
#define CMDLINE_SIZE     0x238
#define E820_TABLE       0x2D0

static struct boot_info info;

static u16 u16_at(const u8 *zp, u32 off) { return *(const u16 *)(zp + off); }
static u32 u32_at(const u8 *zp, u32 off) { return *(const u32 *)(zp + off); }
static u64 u64_at(const u8 *zp, u32 off) { return *(const u64 *)(zp + off); }

void bzimage_main(u64 zero_page)
{
    if (!readable(zero_page, 4096)) {
        fail("bootproto: RSI does not point at a zero page below 4 GiB");
        run_checks(&info);
    }
    const u8 *zp = PHYS(zero_page);
    /* The setup header is the loader's copy of ours: the same signature and
     * version, plus the loader's own id (never 0 for a boot-protocol loader). */
    if (u16_at(zp, BOOT_FLAG) != 0xAA55)
        fail("bootproto: boot_flag is not 0xAA55");
    else if (u32_at(zp, HEADER) != 0x53726448)
        fail("bootproto: no HdrS signature");
    else if (u16_at(zp, VERSION) != BOOT_PROTOCOL_VERSION)
        fail("bootproto: wrong version");
    else if (zp[TYPE_OF_LOADER] == 0)
        fail("bootproto: type_of_loader is 0");
    else
        puts("bootproto ok\n");

    info.map_label = "e820";
    info.map_entries = zp[E820_ENTRIES];
    if (info.map_entries > MAX_MAP_ENTRIES)
        info.map_entries = MAX_MAP_ENTRIES + 1;     /* check_map reports it */
    for (u32 i = 0; i < info.map_entries && i < MAX_MAP_ENTRIES; i++) {
        const u8 *e = zp + E820_TABLE + 20 * i;     /* packed: u64 addr, u64 size, u32 type */
        info.map[i].addr = u64_at(e, 0);
        info.map[i].size = u64_at(e, 8);
        info.map[i].type = u32_at(e, 16);
    }
    info.cmdline = u32_at(zp, CMD_LINE_PTR) | (u64)u32_at(zp, EXT_CMD_LINE_PTR) << 32;
    info.cmdline_max = u32_at(zp, CMDLINE_SIZE);
    info.initrd = u32_at(zp, RAMDISK_IMAGE) | (u64)u32_at(zp, EXT_RAMDISK_IMG) << 32;
    info.initrd_size = u32_at(zp, RAMDISK_SIZE) | (u64)u32_at(zp, EXT_RAMDISK_SIZE) << 32;
    info.rsdp = u64_at(zp, ACPI_RSDP_ADDR);        /* protocol 2.14+; 0: scan for it */
    run_checks(&info);
}
