"""Virtio devices: the virtio-pci transport, the split virtqueue, and device models."""
