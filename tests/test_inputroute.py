"""The input router sends each event to one device: the ready one activated
last, else the first ready one added."""

from pyhyve.inputroute import POINTER_MAX, InputRouter


class Sink:
    def __init__(self, ready=False):
        self.is_ready, self.keys, self.moves = ready, [], []

    def ready(self):
        return self.is_ready

    def key_event(self, code, down, sync):
        self.keys.append((code, down))

    def key_sync(self):
        self.keys.append("sync")

    def pointer_event(self, x, y, buttons):
        self.moves.append((x, y, buttons))


def test_events_go_to_the_first_ready_sink_else_the_first():
    router = InputRouter()
    assert not router.key(30, True) and not router.pointer(1, 2, 0)
    ps2, virtio = Sink(), Sink()
    router.add_keyboard(ps2)
    router.add_keyboard(virtio)
    router.key(30, True)
    assert (ps2.keys, virtio.keys) == ([(30, True)], [])
    virtio.is_ready = True
    router.key(30, False)
    assert (ps2.keys, virtio.keys) == ([(30, True)], [(30, False)])
    ps2.is_ready = True                         # both ready: the one added first
    router.key(32, True)
    router.activate(virtio)                     # until the other's driver comes up
    router.key(32, False)
    assert (ps2.keys[-1], virtio.keys[-1]) == ((32, True), (32, False))
    router.remove(virtio)
    router.key(31, True)
    assert ps2.keys[-1] == (31, True)


def test_the_sink_activated_last_wins_while_it_is_ready():
    """QEMU's rule: a USB tablet the guest first polls after the virtio tablet's
    driver came up takes the events, until the virtio driver comes up again."""
    router = InputRouter()
    usb, virtio = Sink(ready=True), Sink(ready=True)
    router.add_pointer(usb)
    router.add_pointer(virtio)
    router.activate(virtio)
    router.activate(usb)
    router.pointer(1, 1, 0)
    router.activate(virtio)
    router.pointer(2, 2, 0)
    virtio.is_ready = False                    # its driver unbound: the USB tablet again
    router.pointer(3, 3, 0)
    assert (usb.moves, virtio.moves) == ([(1, 1, 0), (3, 3, 0)], [(2, 2, 0)])


def test_pointer_positions_are_clamped():
    router = InputRouter()
    tablet = Sink(ready=True)
    router.add_pointer(tablet)
    assert router.pointer(-5, POINTER_MAX + 9, 1)
    assert tablet.moves == [(0, POINTER_MAX, 1)]


def test_an_open_key_frame_ends_before_another_keyboard_takes_keys():
    router = InputRouter()
    ps2, virtio = Sink(ready=True), Sink(ready=True)
    router.add_keyboard(ps2)
    router.add_keyboard(virtio)
    router.key(30, True, sync=False)            # to the PS/2 keyboard, its frame open
    router.activate(virtio)
    router.key(31, True)
    router.key_sync()                           # nothing open: nothing to end
    assert (ps2.keys, virtio.keys) == ([(30, True), "sync"], [(31, True)])
