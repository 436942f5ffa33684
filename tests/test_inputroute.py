"""The input router sends each event to one device: the newest ready one."""

from pyhyve.inputroute import POINTER_MAX, InputRouter


class Sink:
    def __init__(self, ready=False):
        self.is_ready, self.keys, self.moves = ready, [], []

    def ready(self):
        return self.is_ready

    def key_event(self, code, down):
        self.keys.append((code, down))

    def pointer_event(self, x, y, buttons):
        self.moves.append((x, y, buttons))


def test_events_go_to_the_newest_ready_sink_else_the_first():
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
    router.remove(virtio)
    router.key(31, True)
    assert ps2.keys[-1] == (31, True)


def test_pointer_positions_are_clamped():
    router = InputRouter()
    tablet = Sink(ready=True)
    router.add_pointer(tablet)
    assert router.pointer(-5, POINTER_MAX + 9, 1)
    assert tablet.moves == [(0, POINTER_MAX, 1)]
