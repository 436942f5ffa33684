/* The PVH test kernel's C entry: called by pvhhead.S at the
 * XEN_ELFNOTE_PHYS32_ENTRY point with the hvm_start_info that EBX pointed at
 * (xen/include/public/arch-x86/hvm/start_info.h). */
#include "testkernel.h"

#define HVM_START_MAGIC 0x336EC578

struct hvm_start_info {
    u32 magic, version, flags, nr_modules;
    u64 modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    u32 memmap_entries, reserved;
};

struct hvm_modlist_entry {
    u64 paddr, size, cmdline_paddr, reserved;
};

struct hvm_memmap_table_entry {
    u64 addr, size;
    u32 type, reserved;
};

static struct boot_info info;

void pvh_main(u32 start_info_addr)
{
    if (!start_info_addr || !readable(start_info_addr, sizeof(struct hvm_start_info))) {
        fail("pvh: EBX is not an hvm_start_info");
        run_checks(&info);
    }
    const struct hvm_start_info *si = PHYS(start_info_addr);
    if (si->magic != HVM_START_MAGIC)
        fail("pvh: bad hvm_start_info magic");
    else if (si->version < 1)
        fail("pvh: hvm_start_info version 0 has no memory map");
    else
        puts("pvh ok\n");

    info.map_label = "memmap";
    info.map_entries = si->memmap_entries;
    if (info.map_entries > MAX_MAP_ENTRIES)
        info.map_entries = MAX_MAP_ENTRIES + 1;         /* check_map reports it */
    else if (!readable(si->memmap_paddr, info.map_entries * sizeof(struct hvm_memmap_table_entry)))
        info.map_entries = 0;
    const struct hvm_memmap_table_entry *map = PHYS(si->memmap_paddr);
    for (u32 i = 0; i < info.map_entries && i < MAX_MAP_ENTRIES; i++) {
        info.map[i].addr = map[i].addr;
        info.map[i].size = map[i].size;
        info.map[i].type = map[i].type;
    }
    info.cmdline = si->cmdline_paddr;
    info.cmdline_max = 4095;                            /* PVH has no cmdline_size: any sane length */
    if (si->nr_modules) {
        if (readable(si->modlist_paddr, sizeof(struct hvm_modlist_entry))) {
            const struct hvm_modlist_entry *module = PHYS(si->modlist_paddr);
            info.initrd = module->paddr;
            info.initrd_size = module->size;
        } else {
            fail("pvh: modlist_paddr beyond 4 GiB");
        }
    }
    info.rsdp = si->rsdp_paddr;
    run_checks(&info);
}
