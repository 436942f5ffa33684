"""Displays: the standard VGA (stdvga.py), how it is drawn, and its screenshots."""


def find_display(devices):
    """The VM's first display device (one that has a Screen), or None."""
    return next((device for device in devices if hasattr(device, "screen")), None)
