"""USB: the xHCI host controller (xhci.py) and the devices on its ports (tablet.py)."""
