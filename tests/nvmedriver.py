"""A guest's NVMe driver for unit tests: a FakeVm with a PCI bus, and the
register, queue and PRP work a driver does (tests/test_nvme.py,
tests/test_device_fuzz.py)."""

import struct

from fakevm import FakeVm

from pyhyve.nvme import controller as N
from pyhyve.nvme.prp import PAGE
from pyhyve.pci import regs as R
from pyhyve.pci.bus import PciBus

SLOT = 4
MiB = 1 << 20
ASQ, ACQ, IOSQ, IOCQ = 0x100000, 0x101000, 0x102000, 0x103000
LISTS, DATA = 0x104000, 0x200000            # PRP list pages; data buffers (up to 1 MiB)
MSI_ADDRESS = 0xFEE00000
CC_ENABLE = N.CC_EN | (6 << N.CC_IOSQES_SHIFT) | (4 << N.CC_IOCQES_SHIFT)


class NvmeVm(FakeVm):
    """FakeVm with a PCI bus and recorded MSIs."""

    def __init__(self):
        super().__init__(memory_size=16 * MiB)
        self.msis: list[tuple[int, int]] = []
        self.pci = PciBus(self.context)

    def signal_msi(self, address: int, data: int) -> None:
        self.msis.append((address, data))

    def close(self) -> None:
        self.pci.close()
        for closable in reversed(self.closables):
            closable.close()


class NvmeDriver:
    """What an NVMe driver does: registers through BAR 0, queues in guest memory."""

    def __init__(self, vm, device, slot: int = SLOT):
        self.vm, self.device, self.slot = vm, device, slot
        self.cfg_write(R.COMMAND, 2, R.COMMAND_MEMORY | R.COMMAND_MASTER)
        low = self.cfg(R.BAR0, 4)
        self.bar = (low & ~0xF) | (self.cfg(R.BAR0 + 4, 4) << 32)
        self.queues: dict[int, dict] = {}
        self.next_cid = 0

    def cfg(self, offset: int, size: int) -> int:
        return self.vm.pci.config_read(0, self.slot, 0, offset, size)

    def cfg_write(self, offset: int, size: int, value: int) -> None:
        self.vm.pci.config_write(0, self.slot, 0, offset, size, value)

    def reg(self, offset: int, size: int = 4) -> int:
        return self.vm.mmio_read(self.bar + offset, size)

    def set_reg(self, offset: int, value: int, size: int = 4) -> None:
        self.vm.mmio_write(self.bar + offset, size, value)

    def enable(self, entries: int = 16, cq_entries: int | None = None) -> int:
        """Reset the controller, lay out the admin queues, enable; CSTS after."""
        self.set_reg(N.REG_CC, 0)
        cq_entries = cq_entries or entries
        self.set_reg(N.REG_AQA, (entries - 1) | (cq_entries - 1) << 16)
        self.set_reg(N.REG_ASQ, ASQ, 8)
        self.set_reg(N.REG_ACQ, ACQ, 8)
        self.vm.memory.write(ACQ, bytes(16 * cq_entries))
        self.queues = {0: {"sq": ASQ, "sq_size": entries, "tail": 0, "cq": ACQ,
                           "cq_size": cq_entries, "head": 0, "phase": 1}}
        self.set_reg(N.REG_CC, CC_ENABLE)
        return self.reg(N.REG_CSTS)

    def submit(self, qid: int, opcode: int, nsid: int = 0, prp1: int = 0, prp2: int = 0,
               cdw: tuple = (), flags: int = 0, cid: int | None = None,
               ring: bool = True) -> int:
        queue = self.queues[qid]
        if cid is None:
            cid, self.next_cid = self.next_cid, (self.next_cid + 1) & 0xFFFF
        dwords = (tuple(cdw) + (0,) * 6)[:6]
        entry = struct.pack("<BBHI16xQQ6I", opcode, flags, cid, nsid, prp1, prp2, *dwords)
        self.vm.memory.write(queue["sq"] + 64 * queue["tail"], entry)
        queue["tail"] = (queue["tail"] + 1) % queue["sq_size"]
        if ring:
            self.ring(qid)
        return cid

    def ring(self, qid: int) -> None:
        self.set_reg(N.DOORBELLS + 8 * qid, self.queues[qid]["tail"])

    def completions(self, qid: int, acknowledge: bool = True) -> list[tuple]:
        """(DW0, SQ head, SQ id, CID, status) of each new entry, by its phase tag."""
        queue, found = self.queues[qid], []
        cq_qid = queue.get("cqid", qid)
        cq = self.queues[cq_qid]
        while True:
            dw0, _, sqhd, sqid, cid, half = struct.unpack(
                "<IIHHHH", self.vm.memory.read(cq["cq"] + 16 * cq["head"], 16))
            if half & 1 != cq["phase"]:
                break
            status = ((half >> 9) & 7) << 8 | (half >> 1) & 0xFF
            found.append((dw0, sqhd, sqid, cid, status))
            cq["head"] = (cq["head"] + 1) % cq["cq_size"]
            if cq["head"] == 0:
                cq["phase"] ^= 1
        if found and acknowledge:
            self.set_reg(N.DOORBELLS + 8 * cq_qid + 4, cq["head"])
        return found

    def command(self, qid: int, opcode: int, **fields) -> tuple[int, int]:
        """(status, DW0) of one command."""
        cid = self.submit(qid, opcode, **fields)
        done = self.completions(qid)
        assert [entry[3] for entry in done] == [cid], done
        return done[0][4], done[0][0]

    def admin(self, opcode: int, **fields) -> tuple[int, int]:
        return self.command(0, opcode, **fields)

    def create_io_queues(self, qid: int = 1, entries: int = 16, vector: int = 1,
                         ien: bool = True, sq: int = IOSQ, cq: int = IOCQ) -> None:
        self.vm.memory.write(cq, bytes(16 * entries))
        status, _ = self.admin(N.ADMIN_CREATE_CQ, prp1=cq,
                               cdw=((entries - 1) << 16 | qid, vector << 16 | ien << 1 | 1))
        assert status == N.SUCCESS
        status, _ = self.admin(N.ADMIN_CREATE_SQ, prp1=sq,
                               cdw=((entries - 1) << 16 | qid, qid << 16 | 1))
        assert status == N.SUCCESS
        self.queues[qid] = {"sq": sq, "sq_size": entries, "tail": 0, "cq": cq,
                            "cq_size": entries, "head": 0, "phase": 1}

    def identify(self, cns: int, nsid: int = 0) -> tuple[int, bytes]:
        status, _ = self.admin(N.ADMIN_IDENTIFY, nsid=nsid, prp1=DATA, cdw=(cns,))
        return status, self.vm.memory.read(DATA, 4096)

    def io(self, opcode: int, lba: int, blocks: int, prp1: int = DATA, prp2: int = 0,
           qid: int = 1, nsid: int = 1, extra: int = 0) -> int:
        status, _ = self.command(qid, opcode, nsid=nsid, prp1=prp1, prp2=prp2,
                                 cdw=(lba & 0xFFFFFFFF, lba >> 32, (blocks - 1) | extra))
        return status

    def prp_for(self, address: int, length: int) -> tuple[int, int]:
        """PRP1 and PRP2 for a buffer at `address`, with a list at LISTS if needed
        (chained over list pages when it has more than 512 entries)."""
        first = min(length, PAGE - address % PAGE)
        pages_after = [address - address % PAGE + PAGE * (i + 1)
                       for i in range((length - first + PAGE - 1) // PAGE)]
        if len(pages_after) <= 1:
            return address, pages_after[0] if pages_after else 0
        entries, at, list_page = list(pages_after), LISTS, LISTS
        while entries:
            if len(entries) > 512:
                chunk, entries = entries[:511], entries[511:]
                self.vm.memory.write(at, struct.pack("<512Q", *chunk, list_page + PAGE))
                list_page += PAGE
                at = list_page
            else:
                self.vm.memory.write(at, struct.pack(f"<{len(entries)}Q", *entries))
                entries = []
        return address, LISTS


